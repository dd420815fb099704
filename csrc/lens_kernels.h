// Host API of the lens_kernels CUDA kernels: plain structs of raw pointers and a launcher per op.
// Torch-free, so that the kernels compile in about a second and the standalone test binary
// (csrc/test/test_kernels.cu) links them without torch; csrc/bindings.cpp adapts torch tensors.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace lens {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Rows of a [B, T, V] or [N, V] view with stride 1 on V: row r = b * inner + t sits at element
// offset b * stride_outer + t * stride_inner. A logits[:, :-1] slice is read in place this way.
struct RowLayout {
  int64_t inner;         // T (1 for [N, V])
  int64_t stride_outer;  // elements between consecutive b
  int64_t stride_inner;  // elements between consecutive t
};

// Which kernel variant runs a row-wise op (docs/design.md, Kernel designs).
enum class RowPath : int {
  kAuto = -1,
  kStream = 0,   // one CTA per row, every sweep reads global memory (any arch, any V)
  kSmemRow = 1,  // one CTA per row, the row cached in shared memory between the two sweeps
  kCluster = 2,  // sm_90: a thread-block cluster per row, the row split over its CTAs' shared memory
};

// Forward log-probs: logp = z_t / tau - logsumexp(z / tau), entropy, lse, optional sequence sums.
struct LogprobFwdArgs {
  // data
  const void* logits;       // [rows, vocab] view, dtype ``dtype``
  const int64_t* targets;   // [rows]; ignored on masked rows
  const bool* mask;         // [rows] or nullptr (all kept); masked rows skip the vocab loop
  const float* tau_rows;    // [rows] temperature per row, or nullptr to use ``tau``
  float tau;
  // shapes and layout
  int64_t rows;
  int64_t vocab;
  RowLayout layout;
  DType dtype;
  // outputs (fp32, [rows]); masked rows get logp = entropy = 0
  float* logp;
  float* entropy;
  float* lse;               // logsumexp(z / tau), kept for backward
};

// Backward of token_logprobs: dz = (1/tau) [g_l (onehot - p) - g_H p (log p + H)].
struct LogprobBwdArgs {
  const void* logits;
  const int64_t* targets;
  const bool* mask;         // masked rows get an exact-zero gradient row
  const float* tau_rows;
  float tau;
  const float* lse;         // from forward
  const float* entropy;     // from forward (read only when g_entropy is given)
  const float* g_logp;      // [rows] upstream gradient of logp
  const float* g_entropy;   // [rows] or nullptr
  int64_t rows;
  int64_t vocab;
  RowLayout layout;
  DType dtype;
  void* grad;               // output, dtype ``dtype``; may be ``logits`` itself (in place)
  RowLayout grad_layout;
};

// The per-token policy loss options of LossConfig (docs/design.md, Policy loss) that the fused kernel evaluates.
enum class PolicyLoss : int { kPPO = 0, kCISPO = 1, kSAPO = 2 };
enum class KLEstimator : int { kK1 = 0, kK2 = 1, kK3 = 2 };

struct LossParams {
  PolicyLoss policy_loss;
  float epsilon_low;
  float epsilon_high;
  float delta;            // <= 0: off
  float dual_clip;        // <= 0: off
  float cispo_ratio_cap;
  float sapo_temperature_pos;
  float sapo_temperature_neg;
  float log_ratio_clamp;  // <= 0: off
  float beta;             // KL weight; 0: off
  KLEstimator kl_estimator;
  float kl_clamp;         // <= 0: off
  float grad_scale;       // the upstream gradient the written dL/dz assumes (the grad-scale contract, docs/design.md, Kernel designs)
};

// LossParams from the flat list of numbers the torch op takes (bindings.cpp, cuda.py _loss_params),
// in this order: policy_loss, epsilon_low, epsilon_high, delta, dual_clip, cispo_ratio_cap,
// sapo_temperature_pos, sapo_temperature_neg, log_ratio_clamp, beta, kl_estimator, kl_clamp, grad_scale.
constexpr int kNumLossParams = 13;

inline LossParams loss_params_from_array(const double* p) {
  LossParams q{};
  q.policy_loss = static_cast<PolicyLoss>(static_cast<int>(p[0]));
  q.epsilon_low = static_cast<float>(p[1]);
  q.epsilon_high = static_cast<float>(p[2]);
  q.delta = static_cast<float>(p[3]);
  q.dual_clip = static_cast<float>(p[4]);
  q.cispo_ratio_cap = static_cast<float>(p[5]);
  q.sapo_temperature_pos = static_cast<float>(p[6]);
  q.sapo_temperature_neg = static_cast<float>(p[7]);
  q.log_ratio_clamp = static_cast<float>(p[8]);
  q.beta = static_cast<float>(p[9]);
  q.kl_estimator = static_cast<KLEstimator>(static_cast<int>(p[10]));
  q.kl_clamp = static_cast<float>(p[11]);
  q.grad_scale = static_cast<float>(p[12]);
  return q;
}

// The 2-pass fused policy loss of token-level ratios: per row, log-prob and entropy (pass 1), the
// per-token gradient coefficients, then dL/dz written (pass 2) from the row held on chip.
struct FusedLossArgs {
  const void* logits;
  const int64_t* targets;
  const bool* mask;
  const float* tau_rows;
  float tau;
  // per-token inputs, fp32 [rows]
  const float* advantages;
  const float* loss_weight;     // aggregation weight w of the loss (LossConfig.loss_agg_mode, dp_size)
  const float* entropy_weight;  // dL/dH per token (-entropy_coef * w_H), or nullptr
  const float* old_logp;        // nullptr: on-policy (rho = 1 with its gradient)
  const float* ref_logp;        // required when params.beta != 0
  const float* is_weights;      // nullptr: none
  LossParams params;
  int64_t rows;
  int64_t vocab;
  RowLayout layout;
  DType dtype;
  RowPath path;                 // kAuto picks the fastest variant the device can run
  unsigned int debug_flags;     // 0, or kDebugNoClusterOccupancy (tests: take the fallback of the choice)
  // outputs
  void* grad;                   // dL/dz (dtype ``dtype``), may be ``logits`` (in place)
  RowLayout grad_layout;
  float* logp;                  // [rows]
  float* entropy;               // [rows]
  float* g_logp;                // [rows] dL/dl per token (grad_scale excluded), for metrics and tests
};

// Grad-scale contract (docs/design.md, Kernel designs): grad *= ratio, ratio = grad_output / grad_scale read on the device.
// Each row leaves at once when ratio == 1, so the declared scale costs no pass and no host sync.
struct RescaleArgs {
  void* grad;
  RowLayout layout;
  const float* ratio;  // [1]
  int64_t rows;
  int64_t vocab;
  DType dtype;
};

cudaError_t launch_token_logprobs_fwd(const LogprobFwdArgs& args, cudaStream_t stream);
cudaError_t launch_token_logprobs_bwd(const LogprobBwdArgs& args, cudaStream_t stream);
cudaError_t launch_fused_policy_loss(const FusedLossArgs& args, cudaStream_t stream);
cudaError_t launch_rescale_grad(const RescaleArgs& args, cudaStream_t stream);

// The kernel variant of the fused loss, as launch_fused_policy_loss chooses it for ``rows`` rows of
// ``vocab`` on the current device: the path, the CTAs per row (cluster_size, 1 off the cluster
// path), the elements of the row each CTA holds (segment) and its dynamic shared memory.
struct FusedLossPlan {
  RowPath path;
  int cluster_size;
  int64_t segment;
  int64_t smem_bytes;
};

// FusedLossArgs::debug_flags: treat every cluster as unschedulable (cudaOccupancyMaxActiveClusters
// = 0), so that tests exercise the fallback the launcher takes on a device that cannot hold one.
constexpr unsigned int kDebugNoClusterOccupancy = 1u;

// The plan launch_fused_policy_loss follows for this shape on the current device (kAuto resolved,
// occupancy checked): deterministic, so it is what the launch runs.
FusedLossPlan fused_loss_plan(int64_t rows, int64_t vocab, DType dtype, RowPath requested, unsigned int flags);
// The plan of the last launch_fused_policy_loss on this host thread ({kAuto, 0, 0, 0} before any).
FusedLossPlan fused_loss_last_launch();
// fused_loss_plan(1, vocab, dtype, requested, 0).path
RowPath fused_loss_path(int64_t vocab, DType dtype, RowPath requested);

}  // namespace lens
