// token_logprobs: forward (log-prob, entropy, lse and optional per-sequence sums in one read of the
// logits) and backward (dL/dz in one read and one write, optionally in place). The math is
// backends/torch/_common.py rows_forward / rows_backward; reference.py is the oracle the tests compare against.
#include "common.cuh"

namespace lens {

constexpr int kRowThreads = 512;

// ---------------------------------------------------------------------------------------------
// Forward: one CTA per row, one pass over the row (online softmax with the shifted entropy sum).
// ---------------------------------------------------------------------------------------------
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) token_logprobs_fwd_kernel(LogprobFwdArgs a) {
  __shared__ SoftmaxState scratch[kThreads / 32];
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    // masked rows never touch their logits (their targets may be padding ids)
    if (!row_kept(a.mask, row)) {
      if (threadIdx.x == 0) {
        a.logp[row] = 0.f;
        a.entropy[row] = 0.f;
        a.lse[row] = 0.f;
      }
      continue;
    }
    const T* z = logits + row_offset(row, a.layout);
    const float scale = row_scale(1.f / row_temperature(row, a.tau_rows, a.tau));
    SoftmaxState state = sweep_softmax<T, kThreads>(z, 0, a.vocab, scale);
    state = block_merge<kThreads>(state, scratch);
    if (threadIdx.x == 0) {
      // NaN for a target outside [0, V): never clamped to probability 1
      a.logp[row] = state.log_prob(target_raw(z, a.targets[row], a.vocab) * scale);
      a.entropy[row] = state.entropy();
      a.lse[row] = state.log_sum();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: dz = (1/tau) [g_l (onehot - p) - g_H p (log p + H)], one read and one write per row.
// ---------------------------------------------------------------------------------------------
template <typename T, int kThreads, bool kHasEntropyGrad>
__global__ void __launch_bounds__(kThreads) token_logprobs_bwd_kernel(LogprobBwdArgs a) {
  // in place, grad is logits: neither pointer may be __restrict__
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    T* out = grad + row_offset(row, a.grad_layout);
    if (zero_if_masked<T, kThreads>(a, row, out)) continue;
    const T* z = logits + row_offset(row, a.layout);
    const float inv_tau = 1.f / row_temperature(row, a.tau_rows, a.tau);
    const int64_t target = a.targets[row];
    // a kept target outside [0, V) has a NaN log-prob: its gradient row is NaN too
    const float g_l = target_in_row(target, a.vocab) ? a.g_logp[row] : NAN;
    const float g_h = kHasEntropyGrad ? a.g_entropy[row] : 0.f;
    const float entropy = kHasEntropyGrad ? a.entropy[row] : 0.f;
    const GradCoefficients c = GradCoefficients::make(inv_tau, row_scale(inv_tau), a.lse[row] * kLog2e, entropy, g_l, g_h);
    // thread 0 reads the target logit before any thread overwrites the row (in place)
    const float z_t = threadIdx.x == 0 ? target_raw(z, target, a.vocab) : 0.f;
    __syncthreads();
    sweep_write<T, kThreads, false>(z, out, 0, a.vocab, [&](int64_t, float x) { return c(x); });
    __syncthreads();  // the sweep's store of out[target] comes first
    if (threadIdx.x == 0) write_target_grad(out, target, a.vocab, z_t, c);
  }
}

// ---------------------------------------------------------------------------------------------
// Rescale of a gradient written in forward (the fused loss) when backward's grad_output differs
// from the declared grad_scale; a no-op costing one scalar load per row otherwise.
// ---------------------------------------------------------------------------------------------
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) rescale_grad_kernel(RescaleArgs a) {
  const float ratio = *a.ratio;
  if (ratio == 1.f) return;
  T* grad = static_cast<T*>(a.grad);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    T* g = grad + row_offset(row, a.layout);
    sweep_write<T, kThreads, false>(g, g, 0, a.vocab, [&](int64_t, float x) { return x * ratio; });
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
cudaError_t launch_token_logprobs_fwd(const LogprobFwdArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (args.vocab < 1 || args.layout.inner < 1) return cudaErrorInvalidValue;
  LENS_DISPATCH_DTYPE(args.dtype, T, {
    token_logprobs_fwd_kernel<T, kRowThreads><<<row_grid(args.rows), kRowThreads, 0, stream>>>(args);
    return cudaGetLastError();
  })
}

cudaError_t launch_token_logprobs_bwd(const LogprobBwdArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (args.vocab < 1 || args.layout.inner < 1 || args.grad_layout.inner < 1) return cudaErrorInvalidValue;
  LENS_DISPATCH_DTYPE(args.dtype, T, {
    if (args.g_entropy != nullptr) {
      token_logprobs_bwd_kernel<T, kRowThreads, true><<<row_grid(args.rows), kRowThreads, 0, stream>>>(args);
    } else {
      token_logprobs_bwd_kernel<T, kRowThreads, false><<<row_grid(args.rows), kRowThreads, 0, stream>>>(args);
    }
    return cudaGetLastError();
  })
}

cudaError_t launch_rescale_grad(const RescaleArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (args.vocab < 1 || args.layout.inner < 1) return cudaErrorInvalidValue;
  LENS_DISPATCH_DTYPE(args.dtype, T, {
    rescale_grad_kernel<T, kRowThreads><<<row_grid(args.rows), kRowThreads, 0, stream>>>(args);
    return cudaGetLastError();
  })
}

}  // namespace lens
