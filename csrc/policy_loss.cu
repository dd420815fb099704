// The 2-pass fused policy loss (SPEC 5) for token-level ratios: per row, pass 1 reads the logits
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
  float lse;
  float entropy;
  float g_l;  // grad_scale included
  float g_h;  // grad_scale included
};

// From the merged softmax state and the target logit (y_t = z_t / tau): the token's outputs and
// the coefficients of pass 2. Run by one thread per CTA.
__device__ __forceinline__ RowCoefficients row_coefficients(const FusedLossArgs& a, int64_t row,
                                                            const SoftmaxState& state, float y_t,
                                                            bool write_outputs) {
  RowCoefficients c;
  c.lse = state.log_sum();
  c.entropy = fmaxf(state.entropy(), 0.f);
  const float logp = fminf(y_t - c.lse, 0.f);
  const bool has_old = a.old_logp != nullptr;
  const TokenTerms t = token_terms(logp, has_old ? a.old_logp[row] : 0.f, has_old,
                                   a.ref_logp != nullptr ? a.ref_logp[row] : 0.f, a.advantages[row],
                                   a.loss_weight[row], a.is_weights != nullptr ? a.is_weights[row] : 1.f, a.params);
  const float g_h = a.entropy_weight != nullptr ? a.entropy_weight[row] : 0.f;
  if (write_outputs) {
    a.logp[row] = logp;
    a.entropy[row] = c.entropy;
    a.g_logp[row] = t.g_l;
  }
  c.g_l = t.g_l * a.params.grad_scale;
  c.g_h = g_h * a.params.grad_scale;
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
    T* cache = kCacheRow ? cache_view(reinterpret_cast<T*>(smem_cache), z, 0) : nullptr;
    if (kCacheRow) __syncthreads();  // the previous row's pass 2 may still read the cache
    SoftmaxState state = SoftmaxState::empty();
    sweep_read<T, kThreads>(z, 0, a.vocab, [&](int64_t, float x) { state.add(x * inv_tau); }, cache);
    state = block_merge<kThreads>(state, scratch);  // its barriers also publish the cache
    if (threadIdx.x == 0) {
      const float y_t = target_logit(kCacheRow ? static_cast<const T*>(cache) : z, a.targets[row], a.vocab, inv_tau);
      coef = row_coefficients(a, row, state, y_t, true);
    }
    __syncthreads();
    const RowCoefficients c = coef;
    const int64_t target = a.targets[row];
    sweep_write<T, kThreads>(kCacheRow ? static_cast<const T*>(cache) : z, out, 0, a.vocab, [&](int64_t v, float x) {
      return softmax_grad(x, v == target, inv_tau, c.lse, c.entropy, c.g_l, c.g_h);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// kCluster (sm_90): cluster of ``cluster_size`` CTAs per row, CTA ``rank`` owns the segment
// [rank * segment, (rank + 1) * segment) of the row in its shared memory.
// ---------------------------------------------------------------------------------------------
struct SegmentPartial {
  SoftmaxState state = SoftmaxState::empty();
  float y_t;  // z_t / tau if the target is in this segment, else -inf
};

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) fused_loss_cluster_kernel(FusedLossArgs a, int64_t segment) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ SoftmaxState scratch[kThreads / 32];
  __shared__ SoftmaxState partial_state;  // this segment's softmax partial
  __shared__ float partial_y_t;           // z_t / tau if the target is in this segment, else -inf
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
  if (a.mask != nullptr && !a.mask[row]) {
    sweep_zero<T, kThreads>(out, begin, end);
    if (rank == 0 && threadIdx.x == 0) write_masked_outputs(a, row);
    return;
  }
  const T* z = static_cast<const T*>(a.logits) + row_offset(row, a.layout);
  const float inv_tau = 1.f / row_temperature(row, a.tau_rows, a.tau);
  const int64_t target = a.targets[row];
  T* cache = cache_view(reinterpret_cast<T*>(smem_cache), z, begin);

  // pass 1: this segment's partial, from HBM into shared memory
  SoftmaxState state = SoftmaxState::empty();
  sweep_read<T, kThreads>(z, begin, end, [&](int64_t, float x) { state.add(x * inv_tau); }, cache);
  state = block_merge<kThreads>(state, scratch);
  if (threadIdx.x == 0) {
    partial_state = state;
    partial_y_t = (target >= begin && target < end) ? to_float(cache[target]) * inv_tau : -INFINITY;
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
      if (!(target >= 0 && target < a.vocab)) y_t = NAN;
      coef = row_coefficients(a, row, s, y_t, rank == 0);
    }
  }
  cluster.barrier_arrive();  // done reading the other CTAs' partials; they may exit after pass 2
  __syncthreads();
  const RowCoefficients c = coef;

  // pass 2: dL/dz of this segment from shared memory
  sweep_write<T, kThreads>(static_cast<const T*>(cache), out, begin, end, [&](int64_t v, float x) {
    return softmax_grad(x, v == target, inv_tau, c.lse, c.entropy, c.g_l, c.g_h);
  });
  cluster.barrier_wait();  // keep this CTA's shared memory alive until every CTA has read its partial
#else
  __trap();  // the host launches this variant only on sm_90+
#endif
}

// ---------------------------------------------------------------------------------------------
// Path choice and launchers
// ---------------------------------------------------------------------------------------------
namespace {

struct DeviceLimits {
  int major;
  int max_smem_optin;  // dynamic shared memory a block may opt into
};

DeviceLimits device_limits() {
  DeviceLimits d{0, 48 << 10};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return d;
  cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return d;
}

int64_t elem_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Static shared memory of the kernels (scratch, partial, coefficients) plus slack.
constexpr int64_t kStaticSmemBytes = 1 << 10;

int64_t segment_elems(int64_t vocab, int cluster_size, int64_t vec) {
  const int64_t per = (vocab + cluster_size - 1) / cluster_size;
  return (per + vec - 1) / vec * vec;
}

int64_t cache_bytes(int64_t elems, int64_t esize) { return (elems + 16 / esize) * esize; }

struct PathChoice {
  RowPath path;
  int cluster_size;
  int64_t segment;
  int64_t smem_bytes;
};

PathChoice choose_path(int64_t rows, int64_t vocab, DType dtype, RowPath requested) {
  const DeviceLimits dev = device_limits();
  const int64_t esize = elem_size(dtype);
  const int64_t vec = 16 / esize;
  const int64_t smem_limit = dev.max_smem_optin - kStaticSmemBytes;
  const int64_t row_bytes = cache_bytes(vocab, esize);
  const bool cluster_ok = dev.major >= 9;
  PathChoice stream{RowPath::kStream, 1, vocab, 0};
  PathChoice smem_row{RowPath::kSmemRow, 1, vocab, row_bytes};
  auto cluster_for = [&](int64_t budget) -> PathChoice {
    for (int c = 2; c <= kMaxCluster; c *= 2) {
      const int64_t seg = segment_elems(vocab, c, vec);
      const int64_t bytes = cache_bytes(seg, esize);
      if (bytes <= budget && rows * c < (int64_t{1} << 31)) return PathChoice{RowPath::kCluster, c, seg, bytes};
    }
    return PathChoice{RowPath::kStream, 1, vocab, 0};
  };
  switch (requested) {
    case RowPath::kStream:
      return stream;
    case RowPath::kSmemRow:
      return row_bytes <= smem_limit ? smem_row : stream;
    case RowPath::kCluster:
      return cluster_ok ? cluster_for(smem_limit) : stream;
    default:
      break;
  }
  if (row_bytes <= std::min<int64_t>(kTargetSegmentBytes, smem_limit)) return smem_row;
  if (cluster_ok) {
    PathChoice c = cluster_for(std::min<int64_t>(kTargetSegmentBytes, smem_limit));
    if (c.path == RowPath::kStream) c = cluster_for(smem_limit);
    if (c.path == RowPath::kCluster) return c;
  }
  return row_bytes <= smem_limit ? smem_row : stream;
}

template <typename T>
cudaError_t launch_cluster(const FusedLossArgs& a, const PathChoice& p, cudaStream_t stream) {
  auto kernel = fused_loss_cluster_kernel<T, kClusterThreads>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(p.smem_bytes));
  if (err != cudaSuccess) return err;
  if (p.cluster_size > 8) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned int>(a.rows * p.cluster_size), 1, 1);
  config.blockDim = dim3(kClusterThreads, 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(p.smem_bytes);
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = p.cluster_size;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  int active_clusters = 0;
  err = cudaOccupancyMaxActiveClusters(&active_clusters, kernel, &config);
  if (err != cudaSuccess || active_clusters < 1) {
    cudaGetLastError();  // clear, and let the caller fall back
    return cudaErrorNotSupported;
  }
  err = cudaLaunchKernelEx(&config, kernel, a, p.segment);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <typename T>
cudaError_t launch_row(const FusedLossArgs& a, const PathChoice& p, cudaStream_t stream) {
  if (p.path == RowPath::kSmemRow) {
    auto kernel = fused_loss_row_kernel<T, kStreamThreads, true>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(p.smem_bytes));
    if (err != cudaSuccess) return err;
    kernel<<<row_grid(a.rows), kStreamThreads, p.smem_bytes, stream>>>(a);
  } else {
    fused_loss_row_kernel<T, kStreamThreads, false><<<row_grid(a.rows), kStreamThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

RowPath fused_loss_path(int64_t vocab, DType dtype, RowPath requested) {
  return choose_path(1, vocab, dtype, requested).path;
}

cudaError_t launch_fused_policy_loss(const FusedLossArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (args.vocab < 1 || args.layout.inner < 1 || args.grad_layout.inner < 1) return cudaErrorInvalidValue;
  if (args.params.beta != 0.f && args.ref_logp == nullptr) return cudaErrorInvalidValue;
  const PathChoice choice = choose_path(args.rows, args.vocab, args.dtype, args.path);
  LENS_DISPATCH_DTYPE(args.dtype, T, {
    if (choice.path == RowPath::kCluster) {
      const cudaError_t err = launch_cluster<T>(args, choice, stream);
      if (err != cudaErrorNotSupported) return err;
      // the cluster does not fit next to this shared-memory request on this device: stream
      return launch_row<T>(args, PathChoice{RowPath::kStream, 1, args.vocab, 0}, stream);
    }
    return launch_row<T>(args, choice, stream);
  })
}

}  // namespace lens
