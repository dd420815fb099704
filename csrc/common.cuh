// Shared device helpers of the lens_kernels CUDA kernels: dtype conversion, 16-byte vector access
// with scalar heads and tails (any V, any row alignment), block reductions, and the online-softmax
// state of a row. Torch-free on purpose: a .cu that includes torch takes ~1.5 min to compile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "lens_kernels.h"

namespace lens {

// ---------------------------------------------------------------------------------------------
// dtypes
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements per 16-byte vector: 4 fp32, 8 fp16/bf16.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  union {
    uint4 raw;
    T elem[kSize];
  };
};

// Elements from ``p`` up to the next 16-byte boundary (0 when aligned). Rows of a logits[:, :-1]
// view with odd V start anywhere, so every sweep begins with such a scalar head.
template <typename T>
__device__ __forceinline__ int64_t head_elems(const T* p) {
  return static_cast<int64_t>(((16u - (reinterpret_cast<uintptr_t>(p) & 15u)) & 15u) / sizeof(T));
}

// ---------------------------------------------------------------------------------------------
// Online softmax of a row, in the shifted form: m_i = running max, l_i = sum exp(y - m_i),
// s_i = sum exp(y - m_i) (y - m_i). Keeping s_i shifted avoids the cancellation of sum p y - lse
// when logits are large; entropy = log l_i - s_i / l_i.
// ---------------------------------------------------------------------------------------------
struct SoftmaxState {
  float m_i;
  float l_i;
  float s_i;

  // no constructor: the struct must stay trivial to live in __shared__ arrays
  static __device__ __forceinline__ SoftmaxState empty() { return SoftmaxState{-INFINITY, 0.f, 0.f}; }

  __device__ __forceinline__ void add(float y) {
    if (y > m_i) {
      // rescale what was summed against the old max; l_i == 0 on the first element
      const float shift = m_i - y;  // <= 0, -inf on the first element
      const float a = l_i > 0.f ? __expf(shift) : 0.f;
      s_i = l_i > 0.f ? a * (s_i + shift * l_i) : 0.f;
      l_i = a * l_i;
      m_i = y;
    }
    const float d = y - m_i;
    const float e = __expf(d);
    l_i += e;
    s_i += e * d;
  }

  __device__ __forceinline__ void merge(const SoftmaxState& o) {
    if (o.l_i == 0.f) return;
    if (l_i == 0.f) {
      *this = o;
      return;
    }
    const float m = fmaxf(m_i, o.m_i);
    const float sa = m_i - m, sb = o.m_i - m;
    const float a = __expf(sa), b = __expf(sb);
    s_i = a * (s_i + sa * l_i) + b * (o.s_i + sb * o.l_i);
    l_i = a * l_i + b * o.l_i;
    m_i = m;
  }

  __device__ __forceinline__ float log_sum() const { return m_i + __logf(l_i); }  // logsumexp(y)
  __device__ __forceinline__ float entropy() const { return __logf(l_i) - s_i / l_i; }
};

__device__ __forceinline__ SoftmaxState shfl_xor(const SoftmaxState& s, int lane_mask) {
  SoftmaxState o = s;
  o.m_i = __shfl_xor_sync(0xffffffffu, s.m_i, lane_mask);
  o.l_i = __shfl_xor_sync(0xffffffffu, s.l_i, lane_mask);
  o.s_i = __shfl_xor_sync(0xffffffffu, s.s_i, lane_mask);
  return o;
}

// Lanes of a butterfly can differ in the last bit (contracted multiply-adds are not symmetric);
// taking lane 0's value makes every thread, and every CTA of a cluster, use bitwise the same state.
__device__ __forceinline__ SoftmaxState broadcast_lane0(const SoftmaxState& s) {
  SoftmaxState o = s;
  o.m_i = __shfl_sync(0xffffffffu, s.m_i, 0);
  o.l_i = __shfl_sync(0xffffffffu, s.l_i, 0);
  o.s_i = __shfl_sync(0xffffffffu, s.s_i, 0);
  return o;
}

// Block-wide merge; every thread gets the result. ``scratch`` holds kThreads / 32 states.
template <int kThreads>
__device__ __forceinline__ SoftmaxState block_merge(SoftmaxState s, SoftmaxState* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads must be a multiple of 32, at most 1024");
  constexpr int kWarps = kThreads / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s.merge(shfl_xor(s, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  SoftmaxState r = lane < kWarps ? scratch[lane] : SoftmaxState::empty();
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) r.merge(shfl_xor(r, off));
  return broadcast_lane0(r);
}

template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  constexpr int kWarps = kThreads / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < kWarps ? scratch[lane] : 0.f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) r += __shfl_xor_sync(0xffffffffu, r, off);
  return __shfl_sync(0xffffffffu, r, 0);
}

// ---------------------------------------------------------------------------------------------
// Row sweeps. A row segment [begin, end) is walked by the threads of a block with 16-byte loads,
// kUnroll vectors in flight per thread, after a scalar head up to the first aligned address and
// before a scalar tail. ``op(index, value)`` sees every element exactly once. Plain loads, not
// __ldg: the fused loss may later overwrite the row in the same kernel (in place). With ``cache`` (a
// row-indexed view of shared memory with the row's 16-byte alignment, see ``cache_view``) the raw
// elements are also kept on chip for a second sweep.
// ---------------------------------------------------------------------------------------------
constexpr int kUnroll = 4;

// A pointer p such that p[i] for i in [begin, end) lies in ``smem`` (16-byte aligned) with the same
// alignment modulo 16 bytes as row + i, so that cached rows keep 16-byte vector access.
template <typename T>
__device__ __forceinline__ T* cache_view(T* smem, const T* row, int64_t begin) {
  const int64_t lead = static_cast<int64_t>((reinterpret_cast<uintptr_t>(row + begin) & 15u) / sizeof(T));
  // plain pointer arithmetic, no integer round trip, so that the compiler keeps the shared address
  // space and emits ld.shared/st.shared (only indices in [begin, end) are ever dereferenced)
  return smem + (lead - begin);
}

// Shared-memory elements a cached segment of n elements needs (the alignment lead included).
template <typename T>
__host__ __device__ constexpr int64_t cache_elems(int64_t n) {
  return n + 16 / static_cast<int64_t>(sizeof(T));
}

// body(k, v) for each 16-byte vector k in [0, n_vec) this thread owns (k = threadIdx.x + i *
// kThreads, coalesced across the warp), with kUnroll loads issued before the first use.
template <typename T, int kThreads, typename Body>
__device__ __forceinline__ void for_each_vector(const uint4* src, int64_t n_vec, Body&& body) {
  int64_t k = threadIdx.x;
  for (; k + (kUnroll - 1) * kThreads < n_vec; k += kUnroll * kThreads) {
    Vec<T> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u].raw = src[k + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) body(k + u * kThreads, v[u]);
  }
  for (; k < n_vec; k += kThreads) {
    Vec<T> v;
    v.raw = src[k];
    body(k, v);
  }
}

template <typename T, int kThreads, typename Op>
__device__ __forceinline__ void sweep_read(const T* __restrict__ row, int64_t begin, int64_t end, Op&& op,
                                           T* cache = nullptr) {
  constexpr int kVec = Vec<T>::kSize;
  auto scalar = [&](int64_t i) {
    const T x = row[i];
    if (cache != nullptr) cache[i] = x;
    op(i, to_float(x));
  };
  const int64_t head = min(head_elems(row + begin), end - begin);
  for (int64_t i = begin + threadIdx.x; i < begin + head; i += kThreads) scalar(i);
  const int64_t vbegin = begin + head;
  const int64_t n_vec = (end - vbegin) / kVec;
  const uint4* vrow = reinterpret_cast<const uint4*>(row + vbegin);
  for_each_vector<T, kThreads>(vrow, n_vec, [&](int64_t k, Vec<T>& v) {
    if (cache != nullptr) reinterpret_cast<uint4*>(cache + vbegin)[k] = v.raw;
#pragma unroll
    for (int j = 0; j < kVec; ++j) op(vbegin + k * kVec + j, to_float(v.elem[j]));
  });
  for (int64_t i = vbegin + n_vec * kVec + threadIdx.x; i < end; i += kThreads) scalar(i);
}

// out[i] = op(i, src[i]) over [begin, end). Vector stores when src and out share their alignment
// (always for in-place, and for contiguous rows with V a multiple of the vector); scalar otherwise.
// ``src`` may be shared memory (the cached row) or global memory.
// Neither pointer is __restrict__: in place, src and out are the same row.
template <typename T, int kThreads, typename Op>
__device__ __forceinline__ void sweep_write(const T* src, T* out, int64_t begin, int64_t end, Op&& op) {
  constexpr int kVec = Vec<T>::kSize;
  auto scalar = [&](int64_t i) { out[i] = from_float<T>(op(i, to_float(src[i]))); };
  const int64_t head = head_elems(src + begin);
  if (head != head_elems(out + begin)) {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) scalar(i);
    return;
  }
  const int64_t h = min(head, end - begin);
  for (int64_t i = begin + threadIdx.x; i < begin + h; i += kThreads) scalar(i);
  const int64_t vbegin = begin + h;
  const int64_t n_vec = (end - vbegin) / kVec;
  const uint4* vsrc = reinterpret_cast<const uint4*>(src + vbegin);
  uint4* vout = reinterpret_cast<uint4*>(out + vbegin);
  for_each_vector<T, kThreads>(vsrc, n_vec, [&](int64_t k, Vec<T>& v) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) v.elem[j] = from_float<T>(op(vbegin + k * kVec + j, to_float(v.elem[j])));
    vout[k] = v.raw;
  });
  for (int64_t i = vbegin + n_vec * kVec + threadIdx.x; i < end; i += kThreads) scalar(i);
}

// Writes zeros over [begin, end): the exact-zero gradient of a masked row, without reading it.
template <typename T, int kThreads>
__device__ __forceinline__ void sweep_zero(T* __restrict__ out, int64_t begin, int64_t end) {
  constexpr int kVec = Vec<T>::kSize;
  const int64_t h = min(head_elems(out + begin), end - begin);
  const T zero = from_float<T>(0.f);
  for (int64_t i = begin + threadIdx.x; i < begin + h; i += kThreads) out[i] = zero;
  const int64_t vbegin = begin + h;
  const int64_t n_vec = (end - vbegin) / kVec;
  uint4* vout = reinterpret_cast<uint4*>(out + vbegin);
  for (int64_t k = threadIdx.x; k < n_vec; k += kThreads) vout[k] = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t i = vbegin + n_vec * kVec + threadIdx.x; i < end; i += kThreads) out[i] = zero;
}

// Masked rows skip the vocab loop: their gradient row is written as exact zeros, never read.
template <typename T, int kThreads, typename Args>
__device__ __forceinline__ bool zero_if_masked(const Args& a, int64_t row, T* out) {
  if (a.mask == nullptr || a.mask[row]) return false;
  sweep_zero<T, kThreads>(out, 0, a.vocab);
  return true;
}

// Row r of a [B, T, V] (or [N, V]) view: int64 offsets, so 16k x 152k logits never overflow.
__device__ __forceinline__ int64_t row_offset(int64_t row, const RowLayout& layout) {
  return (row / layout.inner) * layout.stride_outer + (row % layout.inner) * layout.stride_inner;
}

// Targets are validated on the host only on request (a device check would sync): a target outside
// [0, V) gives NaN instead of an out-of-bounds read.
template <typename T>
__device__ __forceinline__ float target_logit(const T* row, int64_t target, int64_t vocab, float inv_tau) {
  return (target >= 0 && target < vocab) ? to_float(row[target]) * inv_tau : NAN;
}

__device__ __forceinline__ float row_temperature(int64_t row, const float* tau_rows, float tau) {
  return tau_rows != nullptr ? tau_rows[row] : tau;
}

// dL/dz_v of one element, with y = z / tau and log p_v = y - lse:
// (1/tau) [g_l (onehot_v - p_v) - g_H p_v (log p_v + H)], the formula of torch_ops._rows_backward.
__device__ __forceinline__ float softmax_grad(float z, bool is_target, float inv_tau, float lse, float entropy,
                                              float g_l, float g_h) {
  const float log_p = z * inv_tau - lse;
  const float p = __expf(log_p);
  const float onehot = is_target ? 1.f : 0.f;
  return inv_tau * (g_l * (onehot - p) - g_h * p * (log_p + entropy));
}

// Dispatch a launcher templated on the element type.
#define LENS_DISPATCH_DTYPE(dtype, T, ...)                     \
  switch (dtype) {                                             \
    case DType::kFloat32: { using T = float; __VA_ARGS__ }     \
    case DType::kFloat16: { using T = __half; __VA_ARGS__ }    \
    case DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__ } \
    default: return cudaErrorInvalidValue;                     \
  }

// Blocks of a one-CTA-per-row grid: x is limited to 2^31 - 1, and kernels loop over the rest.
inline unsigned int row_grid(int64_t rows) {
  const int64_t cap = (int64_t{1} << 31) - 1;
  return static_cast<unsigned int>(rows < 1 ? 1 : (rows < cap ? rows : cap));
}

}  // namespace lens
