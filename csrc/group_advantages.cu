// Group advantages of a whole rollout batch in one launch (SPEC 2.1 and 5): GRPO, Dr. GRPO, RLOO and
// LENS, with group or batch scaling and TRL's NaN-reward convention. The semantics are those of
// advantages._group_advantages, step for step: group statistics are sums over a dense group index
// (slots of groups with no member stay empty), so the number of groups is never read on the host.
//
// One launch, no host sync (the target: < 1% of a training step). The only large input, old_logp
// [n, T] for LENS, is reduced by the whole grid, one warp per row with coalesced loads; the CTA that
// finishes last (a counter after a __threadfence, the pattern of CUDA's threadFenceReduction sample)
// then runs the group phases alone: they need block-wide barriers and a batch is a few thousand
// completions. Without LENS the grid is that one CTA. 512 threads: at 1024, ptxas capped the kernel
// at 32 registers on sm_90a and spilled.
#include <algorithm>

#include "common.cuh"

namespace lens {

constexpr int kAdvThreads = 512;

// Workspace: per group slot g (n slots each).
enum GroupSlot : int {
  kCount = 0,   // valid members
  kCorrect,     // correct members k
  kMaxConf,     // max pbar over valid members
  kSumInvQ,     // sum over correct members of 1 / q (D_imp)
  kTotal,       // sum of (calibrated) rewards x
  kSumSq,       // sum of (x - mean)^2
  kRewardMax,   // max / min of valid rewards (zero-std groups)
  kRewardMin,
  kCalibrated,  // per completion: x_i
  kLogQ,        // per completion: log q_i (mean or sum of the masked log-probs)
};
static_assert(kLogQ + 1 == kAdvWorkspacePerItem, "workspace layout");

// Metrics: sums the host divides (no host sync inside the op).
enum AdvMetric : int {
  kGroups = 0, kNegGroups, kMixedGroups, kAllGroups, kZeroStdGroups,
  kAbsNeg, kCntNeg, kAbsMixed, kCntMixed, kAbsAll, kCntAll,
  kConfWrong, kCntWrong, kConfRight, kCntRight,
};

// Float max / min through integer atomics: non-negative floats order like their int bits, negative
// ones reversed like their unsigned bits. -0.0 is folded to +0.0 first.
__device__ __forceinline__ void atomic_max_float(float* addr, float v) {
  v += 0.f;
  if (v >= 0.f) atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMin(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
}
__device__ __forceinline__ void atomic_min_float(float* addr, float v) {
  v += 0.f;
  if (v >= 0.f) atomicMin(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMax(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
}

// One completion's reward as the phases read it: NaN rewards are left out (v = 0).
struct Completion {
  bool valid;
  float v;   // 1 if valid
  float r0;  // the reward, 0 if NaN
  float c;   // correct (given, or reward > 0), 0 if NaN
  int64_t g;
};

__device__ __forceinline__ Completion load_completion(const GroupAdvArgs& a, int64_t i) {
  Completion x;
  const float r = a.rewards[i];
  x.valid = !isnan(r);
  x.v = x.valid ? 1.f : 0.f;
  x.r0 = x.valid ? r : 0.f;
  x.c = (a.correct != nullptr ? (a.correct[i] ? 1.f : 0.f) : (x.r0 > 0.f ? 1.f : 0.f)) * x.v;
  x.g = a.group[i];
  return x;
}

// Kinds of a group from its valid count and correct count.
struct GroupKind {
  bool neg, all, mixed;
};

__device__ __forceinline__ GroupKind group_kind(float count, float k) {
  const bool exists = count > 0.f;
  GroupKind kind;
  kind.neg = exists && k == 0.f;
  kind.all = exists && k == count;
  kind.mixed = exists && !kind.neg && !kind.all;
  return kind;
}

__global__ void __launch_bounds__(kAdvThreads) group_advantages_kernel(GroupAdvArgs a) {
  __shared__ float scratch[kAdvThreads / 32];
  __shared__ float metric[kAdvMetrics];
  __shared__ bool last_cta;
  const int64_t n = a.n;
  float* ws = a.workspace;
  auto slot = [&](int which, int64_t g) -> float& { return ws[which * n + g]; };
  const bool lens = a.estimator == Estimator::kLENS;
  const bool lens_on_neg = lens && a.lens_groups != LensGroups::kMixed;
  const bool lens_on_mixed = lens && a.lens_groups != LensGroups::kNegative;

  // LENS confidence, the whole grid: pbar_i = exp(masked mean of old_logp_i), one warp per row
  if (lens) {
    constexpr int kWarps = kAdvThreads / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp; i < n; i += static_cast<int64_t>(gridDim.x) * kWarps) {
      const float* lp = a.old_logp + i * a.old_stride;
      const uint8_t* m = a.old_mask != nullptr ? reinterpret_cast<const uint8_t*>(a.old_mask) + i * a.seq_len : nullptr;
      float sum = 0.f, count = 0.f;
      for (int64_t t = lane; t < a.seq_len; t += 32) {
        const bool keep = m == nullptr || m[t] != 0;
        sum += keep ? lp[t] : 0.f;  // a masked entry is never read into the sum (NaN stays out)
        count += keep ? 1.f : 0.f;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, off);
        count += __shfl_xor_sync(0xffffffffu, count, off);
      }
      if (lane == 0) {
        const float mean = sum / fmaxf(count, 1.f);
        slot(kLogQ, i) = a.lens_d_sequence ? sum : mean;
        if (a.confidence != nullptr) a.confidence[i] = expf(mean);
        slot(kCalibrated, i) = expf(mean);  // pbar, until the calibrated reward replaces it
      }
    }
    if (gridDim.x > 1) {
      __threadfence();  // this CTA's rows are visible to the grid before its ticket
      __syncthreads();
      if (threadIdx.x == 0) last_cta = atomicAdd(a.counter, 1u) == gridDim.x - 1;
      __syncthreads();
      if (!last_cta) return;
      __threadfence();
    }
  }

  for (int64_t g = threadIdx.x; g < n; g += kAdvThreads) {
    slot(kCount, g) = 0.f;
    slot(kCorrect, g) = 0.f;
    slot(kMaxConf, g) = 0.f;  // pbar * v >= 0, and scatter_reduce(amax) starts from 0 too
    slot(kSumInvQ, g) = 0.f;
    slot(kTotal, g) = 0.f;
    slot(kSumSq, g) = 0.f;
    slot(kRewardMax, g) = -INFINITY;
    slot(kRewardMin, g) = INFINITY;
  }
  if (threadIdx.x < kAdvMetrics) metric[threadIdx.x] = 0.f;

  __syncthreads();

  // group counts, maxima and D_imp sums
  for (int64_t i = threadIdx.x; i < n; i += kAdvThreads) {
    const Completion it = load_completion(a, i);
    const bool valid = it.valid;
    const float v = it.v, r0 = it.r0, c = it.c;
    const int64_t g = it.g;
    atomicAdd(&slot(kCount, g), v);
    atomicAdd(&slot(kCorrect, g), c);
    if (valid) {
      atomic_max_float(&slot(kRewardMax, g), r0);
      atomic_min_float(&slot(kRewardMin, g), r0);
    }
    if (lens) {
      atomic_max_float(&slot(kMaxConf, g), slot(kCalibrated, i) * v);
      if (c > 0.f) atomicAdd(&slot(kSumInvQ, g), expf(-slot(kLogQ, i)));  // may be inf: then D_imp = 0
    }
  }
  __syncthreads();

  // calibrated rewards x (LENS) and group totals
  float batch_total = 0.f, batch_valid = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kAdvThreads) {
    const Completion it = load_completion(a, i);
    const float v = it.v, r0 = it.r0, c = it.c;
    const int64_t g = it.g;
    float x = r0;
    if (lens) {
      const float count = slot(kCount, g);
      const GroupKind kind = group_kind(count, slot(kCorrect, g));
      const bool neg = kind.neg, mixed = kind.mixed;
      const float pbar = slot(kCalibrated, i);
      const float max_p = slot(kMaxConf, g);
      const float d_imp = count / slot(kSumInvQ, g);
      const float D = mixed ? fmaxf(d_imp, 2.f * max_p) : 2.f * max_p;
      const float denom = D - pbar;
      const float penalty = denom > 0.f ? pbar / denom : 0.f;
      const bool applies = (neg && lens_on_neg) || (mixed && lens_on_mixed);
      x = applies ? r0 - (1.f - c) * penalty / fmaxf(count, 1.f) : r0;
    }
    slot(kCalibrated, i) = x;  // each i is owned by one thread: no race with its pbar read above
    atomicAdd(&slot(kTotal, g), x * v);
    batch_total += x * v;
    batch_valid += v;
  }
  batch_total = block_sum<kAdvThreads>(batch_total, scratch);
  batch_valid = block_sum<kAdvThreads>(batch_valid, scratch);
  const float batch_mean = batch_total / fmaxf(batch_valid, 1.f);
  __syncthreads();

  float batch_sq = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kAdvThreads) {
    const bool valid = !isnan(a.rewards[i]);
    const int64_t g = a.group[i];
    const float x = slot(kCalibrated, i);
    const float mean = slot(kTotal, g) / fmaxf(slot(kCount, g), 1.f);
    const float centered = valid ? x - mean : 0.f;
    atomicAdd(&slot(kSumSq, g), centered * centered);
    const float bc = valid ? x - batch_mean : 0.f;
    batch_sq += bc * bc;
  }
  batch_sq = block_sum<kAdvThreads>(batch_sq, scratch);
  float batch_std = sqrtf(batch_sq / fmaxf(a.std_unbiased ? batch_valid - 1.f : batch_valid, 1.f));
  batch_std = batch_valid > 1.f ? batch_std : 0.f;
  __syncthreads();

  // advantages and per-completion metrics
  for (int64_t i = threadIdx.x; i < n; i += kAdvThreads) {
    const Completion it = load_completion(a, i);
    const bool valid = it.valid;
    const float c = it.c;
    const int64_t g = it.g;
    const float count = slot(kCount, g);
    const GroupKind kind = group_kind(count, slot(kCorrect, g));
    const bool neg = kind.neg, all = kind.all, mixed = kind.mixed;
    const float x = slot(kCalibrated, i);
    const float total = slot(kTotal, g);
    const float mean = total / fmaxf(count, 1.f);
    const float sq = slot(kSumSq, g);
    const float std_g = a.std_unbiased ? (count > 1.f ? sqrtf(sq / fmaxf(count - 1.f, 1.f)) : 0.f)
                                       : sqrtf(sq / fmaxf(count, 1.f));
    float base;
    if (a.estimator == Estimator::kRLOO) {
      const float loo_mean = (total - x) / fmaxf(count - 1.f, 1.f);
      base = count > 1.f ? x - loo_mean : 0.f;
    } else {
      base = x - mean;
    }
    const float scaled = a.scale == Scale::kGroup ? base / (std_g + a.eps)
                         : a.scale == Scale::kBatch ? base / (batch_std + a.eps) : base;
    float adv = scaled;
    if (lens) {
      adv = mixed ? scaled : 0.f;
      if (neg) adv = lens_on_neg ? a.lens_alpha * base : 0.f;
    }
    adv = valid ? adv : 0.f;
    a.advantages[i] = adv;

    const float abs_adv = fabsf(adv);
    if (neg && valid) { atomicAdd(&metric[kAbsNeg], abs_adv); atomicAdd(&metric[kCntNeg], 1.f); }
    if (mixed && valid) { atomicAdd(&metric[kAbsMixed], abs_adv); atomicAdd(&metric[kCntMixed], 1.f); }
    if (all && valid) { atomicAdd(&metric[kAbsAll], abs_adv); atomicAdd(&metric[kCntAll], 1.f); }
    if (lens && a.confidence != nullptr) {
      const float pbar = a.confidence[i];
      if (valid && c == 0.f) { atomicAdd(&metric[kConfWrong], pbar); atomicAdd(&metric[kCntWrong], 1.f); }
      if (c > 0.f) { atomicAdd(&metric[kConfRight], pbar); atomicAdd(&metric[kCntRight], 1.f); }
    }
  }
  // group kinds, one group slot at a time
  for (int64_t g = threadIdx.x; g < n; g += kAdvThreads) {
    const float count = slot(kCount, g), k = slot(kCorrect, g);
    if (!(count > 0.f)) continue;
    atomicAdd(&metric[kGroups], 1.f);
    if (k == 0.f) atomicAdd(&metric[kNegGroups], 1.f);
    else if (k == count) atomicAdd(&metric[kAllGroups], 1.f);
    else atomicAdd(&metric[kMixedGroups], 1.f);
    if (slot(kRewardMax, g) == slot(kRewardMin, g)) atomicAdd(&metric[kZeroStdGroups], 1.f);
  }
  __syncthreads();
  if (threadIdx.x < kAdvMetrics) a.metrics[threadIdx.x] = metric[threadIdx.x];
}

cudaError_t launch_group_advantages(const GroupAdvArgs& args, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;  // empty work: no launch
  const bool lens = args.estimator == Estimator::kLENS;
  if (lens && (args.old_logp == nullptr || args.seq_len < 0)) return cudaErrorInvalidValue;
  // LENS: enough CTAs for one warp per row (at most 1024); the group phases run in the last one
  constexpr int64_t kWarps = kAdvThreads / 32;
  const unsigned int grid = lens ? static_cast<unsigned int>(std::min<int64_t>((args.n + kWarps - 1) / kWarps, 1024)) : 1u;
  GroupAdvArgs a = args;
  a.counter = reinterpret_cast<unsigned int*>(args.workspace + int64_t{kAdvWorkspacePerItem} * args.n);
  if (grid > 1) {
    const cudaError_t err = cudaMemsetAsync(a.counter, 0, sizeof(unsigned int), stream);
    if (err != cudaSuccess) return err;
  }
  group_advantages_kernel<<<grid, kAdvThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace lens
