// The 2-pass fused policy loss (docs/design.md, Kernel designs) for token-level ratios: per row, pass 1 reads the logits
// once (online softmax: lse, entropy, log-prob), the per-token coefficients dL/dl and dL/dH follow
// from loss_math.cuh, and pass 2 writes dL/dz = grad_scale (1/tau) [g_l (onehot - p) - g_H p
// (log p + H)], optionally over the logits themselves. Pass 2 must not read HBM again, so the row
// stays on chip:
//   - kCluster (sm_90): a thread-block cluster per row; each CTA caches its segment of the row in
//     shared memory and the CTAs exchange their (m_i, l_i, s_i) partials through distributed
//     shared memory, so a 152k-vocab bf16 row (304 KB) is read from HBM exactly once;
//   - kSmemRow: one CTA caches the whole row (rows up to the shared-memory limit, e.g. sm_80);
//   - kStream: one CTA re-reads its row (any V, any arch; the second read may hit L2).
#include <cooperative_groups.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"
#include "loss_math.cuh"

namespace lens {

namespace cg = cooperative_groups;

constexpr int kStreamThreads = 512;
constexpr int kClusterThreads = 256;
// Per-CTA cache a cluster segment aims for: small enough that several CTAs share an SM, so that
// one CTA's loads overlap another's exchange and write pass. A heuristic, not yet measured.
constexpr int64_t kTargetSegmentBytes = 64 << 10;
constexpr int kMaxCluster = 16;

struct RowCoefficients {
  GradCoefficients grad;  // grad_scale included
  float z_t;              // the raw target logit (NaN for a target outside [0, V))
};

// From the merged softmax state and the target's scaled logit y_t = z_t log2(e) / tau: the token's
// outputs and the coefficients of pass 2. Run by one thread per row.
__device__ __forceinline__ RowCoefficients row_coefficients(const FusedLossArgs& a, int64_t row,
                                                            const SoftmaxState& state, float y_t, float inv_tau,
                                                            float scale, bool write_outputs) {
  const float logp = state.log_prob(y_t);
  const float entropy = state.entropy();
  const bool has_old = a.old_logp != nullptr;
  const TokenTerms t = token_terms(logp, has_old ? a.old_logp[row] : 0.f, has_old,
                                   a.ref_logp != nullptr ? a.ref_logp[row] : 0.f, a.advantages[row],
                                   a.loss_weight[row], a.is_weights != nullptr ? a.is_weights[row] : 1.f, a.params);
  // a NaN log-prob (a target outside [0, V), a NaN or +inf logit) gives a NaN gradient row whatever
  // the loss's formula does with it
  const float g_l = isnan(logp) ? NAN : t.g_l;
  const float g_h = a.entropy_weight != nullptr ? a.entropy_weight[row] : 0.f;
  if (write_outputs) {
    a.logp[row] = logp;
    a.entropy[row] = entropy;
    a.g_logp[row] = g_l;
  }
  RowCoefficients c;
  c.grad = GradCoefficients::make(inv_tau, scale, state.log2_sum(), entropy, g_l * a.params.grad_scale,
                                  g_h * a.params.grad_scale);
  c.z_t = NAN;
  return c;
}

__device__ __forceinline__ void write_masked_outputs(const FusedLossArgs& a, int64_t row) {
  a.logp[row] = 0.f;
  a.entropy[row] = 0.f;
  a.g_logp[row] = 0.f;
}

// ---------------------------------------------------------------------------------------------
// kStream / kSmemRow: one CTA per row
// ---------------------------------------------------------------------------------------------
template <typename T, int kThreads, bool kCacheRow>
__global__ void __launch_bounds__(kThreads) fused_loss_row_kernel(FusedLossArgs a) {
  __shared__ SoftmaxState scratch[kThreads / 32];
  __shared__ RowCoefficients coef;
  extern __shared__ uint4 smem_cache[];
  // in place, grad is logits: neither pointer may be __restrict__
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    T* out = grad + row_offset(row, a.grad_layout);
    if (zero_if_masked<T, kThreads>(a, row, out)) {
      if (threadIdx.x == 0) write_masked_outputs(a, row);
      continue;
    }
    const T* z = logits + row_offset(row, a.layout);
    const float inv_tau = 1.f / row_temperature(row, a.tau_rows, a.tau);
    const float scale = row_scale(inv_tau);
    T* cache = kCacheRow ? cache_view(reinterpret_cast<T*>(smem_cache), z, 0) : nullptr;
    if (kCacheRow) __syncthreads();  // the previous row's pass 2 may still read the cache
    SoftmaxState state = sweep_softmax<T, kThreads>(z, 0, a.vocab, scale, cache);
    state = block_merge<kThreads>(state, scratch);  // its barriers also publish the cache
    const int64_t target = a.targets[row];
    if (threadIdx.x == 0) {
      // read before pass 2 starts: in place, pass 2 overwrites z
      const float z_t = target_raw(kCacheRow ? static_cast<const T*>(cache) : z, target, a.vocab);
      RowCoefficients c = row_coefficients(a, row, state, z_t * scale, inv_tau, scale, true);
      c.z_t = z_t;
      coef = c;
    }
    __syncthreads();
    const RowCoefficients c = coef;
    sweep_write<T, kThreads, kCacheRow>(kCacheRow ? static_cast<const T*>(cache) : z, out, 0, a.vocab,
                             [&](int64_t, float x) { return c.grad(x); });
    __syncthreads();  // the sweep's store of out[target] comes first
    if (threadIdx.x == 0) write_target_grad(out, target, a.vocab, c.z_t, c.grad);
  }
}

// ---------------------------------------------------------------------------------------------
// kCluster (sm_90): cluster of ``cluster_size`` CTAs per row, CTA ``rank`` owns the segment
// [rank * segment, (rank + 1) * segment) of the row in its shared memory.
// ---------------------------------------------------------------------------------------------
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) fused_loss_cluster_kernel(FusedLossArgs a, int64_t segment) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ SoftmaxState scratch[kThreads / 32];
  __shared__ SoftmaxState partial_state;  // this segment's softmax partial
  __shared__ float partial_y_t;           // z_t log2(e) / tau if the target is in this segment, else -inf
  __shared__ RowCoefficients coef;
  extern __shared__ uint4 smem_cache[];
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned int rank = cluster.block_rank();
  const unsigned int cluster_size = cluster.num_blocks();
  const int64_t row = blockIdx.x / cluster_size;  // uniform over the cluster: no CTA skips a barrier alone
  if (row >= a.rows) return;
  const int64_t begin = min(a.vocab, static_cast<int64_t>(rank) * segment);
  const int64_t end = min(a.vocab, begin + segment);
  T* out = static_cast<T*>(a.grad) + row_offset(row, a.grad_layout);
  if (!row_kept(a.mask, row)) {
    sweep_zero<T, kThreads>(out, begin, end);
    if (rank == 0 && threadIdx.x == 0) write_masked_outputs(a, row);
    return;
  }
  const T* z = static_cast<const T*>(a.logits) + row_offset(row, a.layout);
  const float inv_tau = 1.f / row_temperature(row, a.tau_rows, a.tau);
  const float scale = row_scale(inv_tau);
  const int64_t target = a.targets[row];
  const bool owns_target = target >= begin && target < end;  // uniform over the CTA
  T* cache = cache_view(reinterpret_cast<T*>(smem_cache), z, begin);

  // pass 1: this segment's partial, from HBM into shared memory
  SoftmaxState state = sweep_softmax<T, kThreads>(z, begin, end, scale, cache);
  state = block_merge<kThreads>(state, scratch);
  if (threadIdx.x == 0) {
    partial_state = state;
    partial_y_t = owns_target ? to_float(cache[target]) * scale : -INFINITY;
  }
  cluster.sync();  // every CTA's partial is published

  // the exchange: lane j of warp 0 reads CTA j's partial through distributed shared memory
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    SoftmaxState s = SoftmaxState::empty();
    float y_t = -INFINITY;
    if (lane < static_cast<int>(cluster_size)) {
      s = *cluster.map_shared_rank(&partial_state, lane);
      y_t = *cluster.map_shared_rank(&partial_y_t, lane);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      s.merge(shfl_xor(s, off));
      y_t = fmaxf(y_t, __shfl_xor_sync(0xffffffffu, y_t, off));
    }
    s = broadcast_lane0(s);
    if (lane == 0) {
      // a target outside [0, V) was claimed by no segment: NaN, as the one-CTA kernels give
      if (!target_in_row(target, a.vocab)) y_t = NAN;
      coef = row_coefficients(a, row, s, y_t, inv_tau, scale, rank == 0);
    }
  }
  cluster.barrier_arrive();  // done reading the other CTAs' partials; they may exit after pass 2
  __syncthreads();
  const RowCoefficients c = coef;

  // pass 2: dL/dz of this segment from shared memory
  sweep_write<T, kThreads, true>(static_cast<const T*>(cache), out, begin, end,
                           [&](int64_t, float x) { return c.grad(x); });
  if (owns_target) {
    __syncthreads();  // the sweep's store of out[target] comes first
    if (threadIdx.x == 0) write_target_grad(out, target, a.vocab, to_float(cache[target]), c.grad);
  }
  cluster.barrier_wait();  // keep this CTA's shared memory alive until every CTA has read its partial
#else
  __trap();  // the host launches this variant only when its code was compiled for sm_90+ (ptxVersion)
#endif
}

// ---------------------------------------------------------------------------------------------
// Path choice and launchers. Everything the choice needs from the driver (device limits, the
// kernels' attributes, cudaFuncSetAttribute, the cluster occupancy) is queried once per device
// (kernel, configuration) and cached, thread-safely: a launch costs a cudaGetDevice and a lookup.
// ---------------------------------------------------------------------------------------------
namespace {

constexpr int kMaxDevices = 64;

struct DeviceLimits {
  int major = 0;
  int max_smem_optin = 48 << 10;  // dynamic shared memory a block may opt into
};

DeviceLimits query_device(int dev) {
  DeviceLimits d;
  cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaGetLastError();
  return d;
}

// Per-device values computed once; devices beyond kMaxDevices are queried on every call.
template <typename V, typename F>
V per_device(int dev, V (&values)[kMaxDevices], std::once_flag (&once)[kMaxDevices], F&& compute) {
  if (dev < 0 || dev >= kMaxDevices) return compute();
  std::call_once(once[dev], [&] { values[dev] = compute(); });
  return values[dev];
}

DeviceLimits device_limits(int dev) {
  static DeviceLimits values[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  return per_device(dev, values, once, [&] { return query_device(dev); });
}

// Static shared memory of the kernels (scratch, partial, coefficients) plus slack.
constexpr int64_t kStaticSmemBytes = 1 << 10;

struct KernelSetup {
  bool runnable = false;      // machine code for this device whose body is the real kernel
  bool non_portable = false;  // clusters of 16 allowed
};

// The cluster kernel's body is real only where it was compiled for sm_90+: a build with only
// compute_80 PTX JIT-compiles the __trap() variant on an sm_90 device. So the decision is the
// kernel's ptxVersion (the virtual architecture its code came from) and binaryVersion (the machine
// code that runs), not the device's compute capability. The attributes are set once per device,
// to the device's maximum (an upper bound only: occupancy follows each launch's actual request).
template <typename T>
KernelSetup cluster_kernel_setup(int dev) {
  static KernelSetup values[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  return per_device(dev, values, once, [&] {
    KernelSetup k;
    auto kernel = fused_loss_cluster_kernel<T, kClusterThreads>;
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
      cudaGetLastError();
      return k;
    }
    const DeviceLimits d = device_limits(dev);
    k.runnable = d.major >= 9 && attr.ptxVersion >= 90 && attr.binaryVersion >= 90 &&
                 cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      d.max_smem_optin - static_cast<int>(attr.sharedSizeBytes)) == cudaSuccess;
    k.non_portable = k.runnable &&
                     cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
    cudaGetLastError();
    return k;
  });
}

template <typename T>
KernelSetup smem_row_kernel_setup(int dev) {
  static KernelSetup values[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  return per_device(dev, values, once, [&] {
    KernelSetup k;
    auto kernel = fused_loss_row_kernel<T, kStreamThreads, true>;
    cudaFuncAttributes attr{};
    const DeviceLimits d = device_limits(dev);
    k.runnable = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess &&
                 cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      d.max_smem_optin - static_cast<int>(attr.sharedSizeBytes)) == cudaSuccess;
    cudaGetLastError();
    return k;
  });
}

int64_t segment_elems(int64_t vocab, int cluster_size, int64_t vec) {
  const int64_t per = (vocab + cluster_size - 1) / cluster_size;
  return (per + vec - 1) / vec * vec;
}

int64_t cache_bytes(int64_t elems, int64_t esize) { return (elems + 16 / esize) * esize; }

cudaLaunchConfig_t cluster_config(const FusedLossPlan& p, int64_t rows, cudaLaunchAttribute* attr,
                                  cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned int>(rows * p.cluster_size), 1, 1);
  config.blockDim = dim3(kClusterThreads, 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(p.smem_bytes);
  config.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = p.cluster_size;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

// Clusters of this size and shared-memory request that the device can hold at once (0: none, the
// launch would fail), cached per (device, dtype, cluster size, bytes).
template <typename T>
int active_clusters(int dev, const FusedLossPlan& p) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, int64_t>, int> cache;
  const auto key = std::make_tuple(dev, p.cluster_size, p.smem_bytes);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t config = cluster_config(p, 1, attr, nullptr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, fused_loss_cluster_kernel<T, kClusterThreads>, &config) != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  std::lock_guard<std::mutex> lock(mu);
  cache.emplace(key, n);
  return n;
}

template <typename T>
FusedLossPlan plan_for(int64_t rows, int64_t vocab, RowPath requested, unsigned int flags) {
  constexpr int64_t esize = sizeof(T);
  constexpr int64_t vec = 16 / esize;
  const FusedLossPlan stream{RowPath::kStream, 1, vocab, 0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return stream;
  }
  const DeviceLimits d = device_limits(dev);
  const int64_t smem_limit = d.max_smem_optin - kStaticSmemBytes;
  const int64_t row_bytes = cache_bytes(vocab, esize);
  const FusedLossPlan smem_row{RowPath::kSmemRow, 1, vocab, row_bytes};
  const bool smem_row_ok = row_bytes <= smem_limit && smem_row_kernel_setup<T>(dev).runnable;
  const KernelSetup cluster = cluster_kernel_setup<T>(dev);
  // a cluster of c CTAs, if its segments fit ``budget`` bytes and the device can schedule it
  auto cluster_of = [&](int c, int64_t budget, FusedLossPlan* out) {
    if (!cluster.runnable || (c > 8 && !cluster.non_portable) || rows * c >= (int64_t{1} << 31)) return false;
    const int64_t seg = segment_elems(vocab, c, vec);
    const FusedLossPlan p{RowPath::kCluster, c, seg, cache_bytes(seg, esize)};
    if (p.smem_bytes > budget) return false;
    if ((flags & kDebugNoClusterOccupancy) != 0 || active_clusters<T>(dev, p) < 1) return false;
    *out = p;
    return true;
  };
  FusedLossPlan p;
  switch (requested) {
    case RowPath::kStream:
      return stream;
    case RowPath::kSmemRow:
      return smem_row_ok ? smem_row : stream;
    case RowPath::kCluster:
      // the smallest cluster whose segments fit the device's shared memory
      for (int c = 2; c <= kMaxCluster; c *= 2)
        if (cluster_of(c, smem_limit, &p)) return p;
      return stream;
    default:
      break;
  }
  const int64_t target = std::min<int64_t>(kTargetSegmentBytes, smem_limit);
  if (smem_row_ok && row_bytes <= target) return smem_row;
  // the smallest cluster with segments of at most kTargetSegmentBytes (8 for a 152k bf16 row, the
  // non-portable 16 for 262k fp16 or 152k fp32); if the device cannot schedule it, the portable
  // sizes below it with larger segments, then one CTA per row
  int preferred = 0;
  for (int c = 2; c <= kMaxCluster && preferred == 0; c *= 2)
    if (segment_elems(vocab, c, vec) * esize + 16 <= target) preferred = c;
  if (preferred != 0) {
    if (cluster_of(preferred, target, &p)) return p;
    for (int c = std::min(preferred / 2, 8); c >= 2; c /= 2)
      if (cluster_of(c, smem_limit, &p)) return p;
  }
  return smem_row_ok ? smem_row : stream;
}

thread_local FusedLossPlan g_last_launch{RowPath::kAuto, 0, 0, 0};

template <typename T>
cudaError_t launch_cluster(const FusedLossArgs& a, const FusedLossPlan& p, cudaStream_t stream) {
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t config = cluster_config(p, a.rows, attr, stream);
  const cudaError_t err = cudaLaunchKernelEx(&config, fused_loss_cluster_kernel<T, kClusterThreads>, a, p.segment);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <typename T>
cudaError_t launch_row(const FusedLossArgs& a, const FusedLossPlan& p, cudaStream_t stream) {
  if (p.path == RowPath::kSmemRow) {
    fused_loss_row_kernel<T, kStreamThreads, true><<<row_grid(a.rows), kStreamThreads, p.smem_bytes, stream>>>(a);
  } else {
    fused_loss_row_kernel<T, kStreamThreads, false><<<row_grid(a.rows), kStreamThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

FusedLossPlan fused_loss_plan(int64_t rows, int64_t vocab, DType dtype, RowPath requested, unsigned int flags) {
  if (vocab < 1) return FusedLossPlan{RowPath::kStream, 1, vocab, 0};
  LENS_DISPATCH_DTYPE_VALUE(dtype, T, (FusedLossPlan{RowPath::kStream, 1, vocab, 0}),
                            { return plan_for<T>(std::max<int64_t>(rows, 1), vocab, requested, flags); })
}

RowPath fused_loss_path(int64_t vocab, DType dtype, RowPath requested) {
  return fused_loss_plan(1, vocab, dtype, requested, 0).path;
}

FusedLossPlan fused_loss_last_launch() { return g_last_launch; }

cudaError_t launch_fused_policy_loss(const FusedLossArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;  // empty work: no launch (a grid of 0 blocks is an error)
  if (args.vocab < 1 || args.layout.inner < 1 || args.grad_layout.inner < 1) return cudaErrorInvalidValue;
  if (args.params.beta != 0.f && args.ref_logp == nullptr) return cudaErrorInvalidValue;
  LENS_DISPATCH_DTYPE(args.dtype, T, {
    const FusedLossPlan plan = plan_for<T>(args.rows, args.vocab, args.path, args.debug_flags);
    g_last_launch = plan;
    return plan.path == RowPath::kCluster ? launch_cluster<T>(args, plan, stream) : launch_row<T>(args, plan, stream);
  })
}

}  // namespace lens
