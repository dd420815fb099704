// C entry point to loss_math.cuh's token_terms compiled for the CPU, so that pytest checks the
// per-token math of the fused CUDA kernel against the torch backend on a machine without a GPU
// (tests/test_cuda_build.py compiles this file with the host compiler and loads it with ctypes).
#include "loss_math.cuh"

extern "C" void lens_token_terms(long n, const float* l, const float* l_old, int has_old, const float* l_ref,
                                 const float* advantages, const float* w, const float* isw, const double* params,
                                 float* loss, float* g_l, float* rho) {
  const lens::LossParams p = lens::loss_params_from_array(params);
  for (long i = 0; i < n; ++i) {
    const lens::TokenTerms t = lens::token_terms(l[i], l_old[i], has_old != 0, l_ref[i], advantages[i], w[i], isw[i], p);
    loss[i] = t.loss;
    g_l[i] = t.g_l;
    rho[i] = t.rho;
  }
}
