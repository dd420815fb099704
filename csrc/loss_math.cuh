// Per-token policy-loss terms for token-level ratios: the value and the closed-form dL/dl of
// backends/torch/policy_loss.py token_coefficients and kl_and_grad, branch for branch (ties of min/clamp
// split the gradient exactly as torch does). Host and device, so that the standalone test binary
// can check the kernel's coefficients against the same function evaluated on the CPU.
#pragma once

#include <math.h>

#include "lens_kernels.h"

#if defined(__CUDACC__)
#define LENS_HD __host__ __device__ __forceinline__
#else
#define LENS_HD inline
#endif

namespace lens {

struct TokenTerms {
  float loss;  // w * f + beta * w * kl (the entropy bonus is added by the caller from H)
  float g_l;   // dL/dl
  float rho;   // the importance ratio (metrics)
};

// min / max / clamp that keep a NaN, as torch.minimum / torch.maximum / torch.clamp do (fminf and
// fmaxf drop it): a NaN log-prob (a kept target outside [0, V)) must reach the loss and the
// gradient, never turn into a clamp bound.
LENS_HD float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }
LENS_HD float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
LENS_HD float clampf(float x, float lo, float hi) { return nan_min(nan_max(x, lo), hi); }

// l: log-prob of the current policy; l_old: of the sampling policy (has_old false: on-policy,
// l_old = l, so rho = 1 with the gradient of rho); l_ref: of the reference policy (used when
// beta != 0); A: advantage; w: aggregation weight; isw: importance-sampling weight.
LENS_HD TokenTerms token_terms(float l, float l_old, bool has_old, float l_ref, float A, float w, float isw,
                               const LossParams& p) {
  float log_r = has_old ? l - l_old : 0.f;
  bool inside = true;
  if (p.log_ratio_clamp > 0.f) {
    inside = log_r >= -p.log_ratio_clamp && log_r <= p.log_ratio_clamp;
    log_r = clampf(log_r, -p.log_ratio_clamp, p.log_ratio_clamp);
  }
  // rho is +inf above ~88.7 nats: every gate below selects, never multiplies (0 * inf = NaN)
  const float rho = expf(log_r);
  float f, df, direct = 0.f;
  if (p.policy_loss == PolicyLoss::kPPO) {
    const float lo = 1.f - p.epsilon_low, hi = 1.f + p.epsilon_high;
    const bool has_delta = p.delta > 0.f;
    const float t1 = has_delta ? nan_min(rho, p.delta) * A : (A == 0.f ? 0.f : rho * A);
    const float d1 = has_delta ? (rho <= p.delta ? A : 0.f) : A;
    const float t2 = clampf(rho, lo, hi) * A;
    const float d2 = (rho >= lo && rho <= hi) ? A : 0.f;
    f = -nan_min(t1, t2);
    df = -(t1 < t2 ? d1 : (t2 < t1 ? d2 : 0.5f * (d1 + d2)));
    if (p.dual_clip > 0.f && A < 0.f) {
      const float bound = -p.dual_clip * A;
      df = f > bound ? 0.f : (f == bound ? 0.5f * df : df);
      f = nan_min(f, bound);
    }
  } else if (p.policy_loss == PolicyLoss::kCISPO) {
    const float capped = nan_min(rho, p.cispo_ratio_cap);
    f = -capped * A * l;
    df = 0.f;
    direct = -capped * A;
  } else {  // SAPO
    const float tau = A > 0.f ? p.sapo_temperature_pos : p.sapo_temperature_neg;
    const float s = 1.f / (1.f + expf(-tau * (rho - 1.f)));
    f = -(4.f / tau) * s * A;
    df = -4.f * s * (1.f - s) * A;
  }
  f = isw == 0.f ? 0.f : f * isw;
  df *= isw;
  direct *= isw;
  TokenTerms out;
  out.rho = rho;
  out.loss = w * f;
  // d rho / d log-ratio is rho, 0 where the clamp is active
  out.g_l = w * direct + ((df == 0.f || !inside) ? 0.f : w * df * rho);
  if (p.beta != 0.f) {
    const float d = l_ref - l;
    float kl, dkl;
    if (p.kl_estimator == KLEstimator::kK1) {
      kl = -d;
      dkl = 1.f;
    } else if (p.kl_estimator == KLEstimator::kK2) {
      kl = 0.5f * d * d;
      dkl = -d;
    } else {
      // at an infinite difference: the limit +inf with derivative 0 (IEEE: inf - inf = NaN)
      const bool infinite = isinf(d);
      const float ds = infinite ? 0.f : d;
      const float ed = expf(ds);
      kl = infinite ? INFINITY : ed - ds - 1.f;
      dkl = infinite ? 0.f : 1.f - ed;
    }
    if (p.kl_clamp > 0.f) {
      dkl = (kl >= -p.kl_clamp && kl <= p.kl_clamp) ? dkl : 0.f;
      kl = clampf(kl, -p.kl_clamp, p.kl_clamp);
    }
    out.loss += p.beta * w * kl;
    out.g_l += p.beta * w * dkl;
  }
  return out;
}

}  // namespace lens
