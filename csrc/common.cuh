// Shared device helpers of the lens_kernels CUDA kernels: dtype conversion, 16-byte vector access
// with scalar heads and tails (any V, any row alignment), block reductions, and the online-softmax
// state of a row. Torch-free on purpose: a .cu that includes torch takes ~1.5 min to compile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <float.h>
#include <stdint.h>

#include "lens_kernels.h"

namespace lens {

// The softmax state and the gradient coefficients are host and device code, so that the host test
// (csrc/test/softmax_host.cu) runs the very same arithmetic on the CPU; ex2/lg2 are the MUFU
// approximations on the device and exp2f/log2f on the host.
#define LENS_HOST_DEVICE __host__ __device__ __forceinline__

// ---------------------------------------------------------------------------------------------
// dtypes
// ---------------------------------------------------------------------------------------------
LENS_HOST_DEVICE float to_float(float x) { return x; }
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

// A vector's elements as floats. bf16 -> fp32 is a shift (low half) or a mask (high half) of each
// 32-bit word: one integer instruction per element.
template <typename T>
LENS_HOST_DEVICE void unpack(const Vec<T>& v, float (&f)[Vec<T>::kSize]) {
#pragma unroll
  for (int j = 0; j < Vec<T>::kSize; ++j) f[j] = to_float(v.elem[j]);
}
__device__ __forceinline__ void unpack(const Vec<__nv_bfloat16>& v, float (&f)[8]) {
  const uint32_t w[4] = {v.raw.x, v.raw.y, v.raw.z, v.raw.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = __uint_as_float(w[j] << 16);
    f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}

// Elements from ``p`` up to the next 16-byte boundary (0 when aligned). Rows of a logits[:, :-1]
// view with odd V start anywhere, so every sweep begins with such a scalar head.
template <typename T>
__device__ __forceinline__ int64_t head_elems(const T* p) {
  return static_cast<int64_t>(((16u - (reinterpret_cast<uintptr_t>(p) & 15u)) & 15u) / sizeof(T));
}

// ---------------------------------------------------------------------------------------------
// Online softmax of a row, in base 2 and in the shifted form. With y = z * scale, scale = log2(e) /
// tau: m_i = running max of y, l_i = sum 2^(y - m_i), s_i = sum 2^(y - m_i) (y - m_i). Base 2 folds
// 1/tau and log2(e) into one FMA per element before a bare ex2; keeping s_i shifted avoids the
// cancellation of sum p y - lse when logits are large. In natural units: lse = ln2 (m_i + log2 l_i),
// entropy = ln2 (log2 l_i - s_i / l_i).
//
// Special values (docs/inputs.md): a -inf logit adds 2^-inf = 0 to l_i and
// exactly 0 to s_i (its shift is clamped to -FLT_MAX, so 0 * -inf never happens), a row that is -inf
// so far keeps the empty state (m_i = -inf, l_i = s_i = 0: no -inf - (-inf)); a NaN or +inf logit
// makes its own term NaN, so l_i, the log-prob and the entropy of the row are NaN.
// ---------------------------------------------------------------------------------------------
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x on the MUFU unit whatever the compile flags (ex2.approx: 2^-inf = +0, NaN stays NaN).
LENS_HOST_DEVICE float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}
LENS_HOST_DEVICE float fast_log2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return log2f(x);
#endif
}

// Max of a vector's elements as float. 16-bit elements are compared two at a time (max.bf16x2 /
// max.f16x2, sm_80+): half an instruction per element. A NaN is dropped here as fmaxf drops it; the
// row still becomes NaN through that element's own exponential.
LENS_HOST_DEVICE float vec_max(const uint4& raw, float) {
  const float4 f = reinterpret_cast<const float4&>(raw);
  return fmaxf(fmaxf(f.x, f.y), fmaxf(f.z, f.w));
}
__device__ __forceinline__ float vec_max(const uint4& raw, __half) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
  const __half2 m = __hmax2(__hmax2(h[0], h[1]), __hmax2(h[2], h[3]));
  return fmaxf(__low2float(m), __high2float(m));
}
__device__ __forceinline__ float vec_max(const uint4& raw, __nv_bfloat16) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  const __nv_bfloat162 m = __hmax2(__hmax2(h[0], h[1]), __hmax2(h[2], h[3]));
  return fmaxf(__low2float(m), __high2float(m));
}

struct SoftmaxState {
  float m_i;
  float l_i;
  float s_i;

  // no constructor: the struct must stay trivial to live in __shared__ arrays
  static LENS_HOST_DEVICE SoftmaxState empty() { return SoftmaxState{-INFINITY, 0.f, 0.f}; }

  // Rescale the running state to the new maximum ``m_new`` once per fragment (not per element);
  // returns the shift the fragment's elements use: ``m_new``, or 0 while everything is -inf.
  LENS_HOST_DEVICE float rescale(float m_new) {
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    // The shift is clamped at -256, where 2^shift is already 0: the empty state (m_i = -inf, l_i = s_i
    // = 0) gives a = 0 and stays empty, and a shift that overflowed to -inf drops the old state without
    // 0 * -inf (fmaf(shift, l_i, s_i) stays finite).
    const float shift = fmaxf(m_i - m_use, -256.f);
    const float a = fast_exp2(shift);
    s_i = a * fmaf(shift, l_i, s_i);
    l_i = a * l_i;
    m_i = m_new;
    return m_use;
  }

  // The branch-free body: one FMA, one ex2, one add, one clamp and one FMA per element.
  LENS_HOST_DEVICE void accumulate(float z, float scale, float m_use) {
    const float d = fmaf(z, scale, -m_use);
    const float e = fast_exp2(d);
    l_i += e;
    s_i = fmaf(e, fmaxf(d, -FLT_MAX), s_i);  // a -inf logit: e = 0 times a finite shift
  }

  // A register fragment of U 16-byte vectors of raw elements: its max first, one rescale, then
  // the elements. ``scale`` = log2(e) / tau > 0, so max(z) * scale = max(z * scale).
  template <typename T, int U>
  LENS_HOST_DEVICE void add_vectors(const Vec<T> (&v)[U], float scale) {
    float mx = vec_max(v[0].raw, T{});
#pragma unroll
    for (int u = 1; u < U; ++u) mx = fmaxf(mx, vec_max(v[u].raw, T{}));
    const float m_use = rescale(fmaxf(m_i, mx * scale));
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float f[Vec<T>::kSize];
      unpack(v[u], f);
#pragma unroll
      for (int j = 0; j < Vec<T>::kSize; ++j) accumulate(f[j], scale, m_use);
    }
  }

  // One raw element (the scalar head and tail of a row).
  LENS_HOST_DEVICE void add(float z, float scale) { accumulate(z, scale, rescale(fmaxf(m_i, z * scale))); }

  LENS_HOST_DEVICE void merge(const SoftmaxState& o) {
    if (o.l_i == 0.f) return;
    if (l_i == 0.f) {
      *this = o;
      return;
    }
    const float m = fmaxf(m_i, o.m_i);
    const float sa = m_i - m, sb = o.m_i - m;  // NaN only with a +inf logit: the row is NaN anyway
    const float a = fast_exp2(sa), b = fast_exp2(sb);
    // a side whose shift overflowed to -inf (maxima of both signs near the fp32 maximum) adds 0
    s_i = (a == 0.f ? 0.f : a * fmaf(sa, l_i, s_i)) + (b == 0.f ? 0.f : b * fmaf(sb, o.l_i, o.s_i));
    l_i = a * l_i + b * o.l_i;
    m_i = m;
  }

  LENS_HOST_DEVICE float log2_sum() const { return m_i + fast_log2(l_i); }  // log2 sum 2^y
  LENS_HOST_DEVICE float log_sum() const { return kLn2 * log2_sum(); }    // logsumexp(z / tau)
  // Entropy in nats; rounding can leave it a hair below 0 for a one-hot row (NaN stays NaN).
  LENS_HOST_DEVICE float entropy() const {
    const float h = kLn2 * (fast_log2(l_i) - s_i / l_i);
    return h < 0.f ? 0.f : h;
  }
  // log p of the element whose scaled logit is y_t = z_t * scale (same rounding as the max): exact 0
  // shift when z_t is the max. NaN for a NaN y_t (a target outside [0, V)); never above 0.
  LENS_HOST_DEVICE float log_prob(float y_t) const {
    const float lp = kLn2 * ((y_t - m_i) - fast_log2(l_i));
    return lp > 0.f ? 0.f : lp;
  }
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

// Loads of a row in global memory that the kernel may overwrite (in place): ld.global.cg, coherent
// at L2, never the read-only ld.global.nc path the compiler may otherwise infer (a row is read once
// per pass, so L1 caching gains nothing). kShared: the source is the row cached in shared memory.
template <bool kShared>
__device__ __forceinline__ uint4 load_vec(const uint4* p) {
  if constexpr (kShared) return *p;
  else return __ldcg(p);
}
template <bool kShared, typename T>
__device__ __forceinline__ T load_elem(const T* p) {
  if constexpr (kShared) return *p;
  else return __ldcg(p);
}

// body(k, v) for each 16-byte vector k in [0, n_vec) this thread owns (k = threadIdx.x + i *
// kThreads, coalesced across the warp), with kUnroll loads issued before the first use.
template <typename T, int kThreads, bool kShared, typename Body>
__device__ __forceinline__ void for_each_vector(const uint4* src, int64_t n_vec, Body&& body) {
  int64_t k = threadIdx.x;
  for (; k + (kUnroll - 1) * kThreads < n_vec; k += kUnroll * kThreads) {
    Vec<T> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u].raw = load_vec<kShared>(src + k + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) body(k + u * kThreads, v[u]);
  }
  for (; k < n_vec; k += kThreads) {
    Vec<T> v;
    v.raw = load_vec<kShared>(src + k);
    body(k, v);
  }
}

// Pass 1: this thread's softmax partial of the row segment [begin, end), z scaled by ``scale`` =
// log2(e) / tau. The kUnroll vectors in flight form one register fragment: its max first, one
// rescale of the running state, then the branch-free body per element (SoftmaxState). With
// ``cache`` the raw elements are also kept in shared memory for pass 2. Plain loads (no __restrict__,
// no ld.global.nc): in place, the fused loss overwrites this row later in the same kernel.
template <typename T, int kThreads>
__device__ __forceinline__ SoftmaxState sweep_softmax(const T* row, int64_t begin, int64_t end, float scale,
                                                      T* cache = nullptr) {
  constexpr int kVec = Vec<T>::kSize;
  SoftmaxState state = SoftmaxState::empty();
  auto scalar = [&](int64_t i) {
    const T x = load_elem<false>(row + i);
    if (cache != nullptr) cache[i] = x;
    state.add(to_float(x), scale);
  };
  const int64_t head = min(head_elems(row + begin), end - begin);
  for (int64_t i = begin + threadIdx.x; i < begin + head; i += kThreads) scalar(i);
  const int64_t vbegin = begin + head;
  const int64_t n_vec = (end - vbegin) / kVec;
  const uint4* vrow = reinterpret_cast<const uint4*>(row + vbegin);
  uint4* vcache = cache != nullptr ? reinterpret_cast<uint4*>(cache + vbegin) : nullptr;
  int64_t k = threadIdx.x;
  for (; k + (kUnroll - 1) * kThreads < n_vec; k += kUnroll * kThreads) {
    Vec<T> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u].raw = load_vec<false>(vrow + k + u * kThreads);
    if (vcache != nullptr) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) vcache[k + u * kThreads] = v[u].raw;
    }
    state.add_vectors(v, scale);
  }
  for (; k < n_vec; k += kThreads) {
    Vec<T> v[1];
    v[0].raw = load_vec<false>(vrow + k);
    if (vcache != nullptr) vcache[k] = v[0].raw;
    state.add_vectors(v, scale);
  }
  for (int64_t i = vbegin + n_vec * kVec + threadIdx.x; i < end; i += kThreads) scalar(i);
  return state;
}

// out[i] = op(i, src[i]) over [begin, end). Vector stores when src and out share their alignment
// (always for in-place, and for contiguous rows with V a multiple of the vector); scalar otherwise.
// ``src`` may be shared memory (the cached row) or global memory.
// Neither pointer is __restrict__: in place, src and out are the same row.
template <typename T, int kThreads, bool kSrcShared, typename Op>
__device__ __forceinline__ void sweep_write(const T* src, T* out, int64_t begin, int64_t end, Op&& op) {
  constexpr int kVec = Vec<T>::kSize;
  auto scalar = [&](int64_t i) { out[i] = from_float<T>(op(i, to_float(load_elem<kSrcShared>(src + i)))); };
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
  for_each_vector<T, kThreads, kSrcShared>(vsrc, n_vec, [&](int64_t k, Vec<T>& v) {
    float f[kVec];
    unpack(v, f);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v.elem[j] = from_float<T>(op(vbegin + k * kVec + j, f[j]));
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
// A row counts when its mask byte is nonzero (read as bytes: a bool tensor holds 0/1, and any
// other nonzero byte still means kept rather than undefined behaviour).
__device__ __forceinline__ bool row_kept(const bool* mask, int64_t row) {
  return mask == nullptr || reinterpret_cast<const uint8_t*>(mask)[row] != 0;
}

template <typename T, int kThreads, typename Args>
__device__ __forceinline__ bool zero_if_masked(const Args& a, int64_t row, T* out) {
  if (row_kept(a.mask, row)) return false;
  sweep_zero<T, kThreads>(out, 0, a.vocab);
  return true;
}

// Row r of a [B, T, V] (or [N, V]) view: int64 offsets, so 16k x 152k logits never overflow.
__device__ __forceinline__ int64_t row_offset(int64_t row, const RowLayout& layout) {
  return (row / layout.inner) * layout.stride_outer + (row % layout.inner) * layout.stride_inner;
}

// Targets are validated on the host only on request (a device check would sync): a kept target
// outside [0, V) reads nothing and gives NaN (log-prob, loss and gradient row), never probability 1.
LENS_HOST_DEVICE bool target_in_row(int64_t target, int64_t vocab) { return target >= 0 && target < vocab; }

template <typename T>
__device__ __forceinline__ float target_raw(const T* row, int64_t target, int64_t vocab) {
  return target_in_row(target, vocab) ? to_float(row[target]) : NAN;
}

__device__ __forceinline__ float row_temperature(int64_t row, const float* tau_rows, float tau) {
  return tau_rows != nullptr ? tau_rows[row] : tau;
}

// The base-2 scale of a row's logits, log2(e) / tau, computed one way everywhere (pass 1, the
// target's log-prob and pass 2 must round it identically).
LENS_HOST_DEVICE float row_scale(float inv_tau) { return inv_tau * kLog2e; }

// dL/dz_v = (1/tau) [g_l (onehot_v - p_v) - g_H p_v (log p_v + H)] (backends/torch/_common.py rows_backward), in base
// 2: with t = z scale - lse2 = log2 p_v, dz_v = onehot_v k0 - p_v (k1 + k2 t), k0 = g_l / tau,
// k1 = (g_l + g_H H) / tau, k2 = g_H ln2 / tau. Per element: FMA, ex2, clamp, FMA, multiply. The
// one-hot term is added once per row by the thread that writes the target (``at_target``) instead
// of a compare per element. A -inf logit: p = 0 times a finite factor (t clamped), exactly 0; a NaN
// coefficient (NaN log-prob) makes the whole row NaN.
struct GradCoefficients {
  float scale;  // log2(e) / tau
  float lse2;   // log2 sum 2^(z scale)
  float k0, k1, k2;

  // ``scale`` must be the pass-1 scale (row_scale) so that t uses the rounding the lse was built with
  static LENS_HOST_DEVICE GradCoefficients make(float inv_tau, float scale, float lse2, float entropy,
                                                           float g_l, float g_h) {
    GradCoefficients c;
    c.scale = scale;
    c.lse2 = lse2;
    c.k0 = inv_tau * g_l;
    c.k1 = inv_tau * fmaf(g_h, entropy, g_l);
    c.k2 = inv_tau * g_h * kLn2;
    return c;
  }
  LENS_HOST_DEVICE float operator()(float z) const {
    const float t = fmaf(z, scale, -lse2);
    return -fast_exp2(t) * fmaf(k2, fmaxf(t, -1024.f), k1);
  }
  LENS_HOST_DEVICE float at_target(float z) const { return k0 + (*this)(z); }
};

// The one-hot term of a row's gradient, after its sweep_write (call after a barrier that orders the
// sweep's stores before this one): out[target] rewritten from the raw target logit z_t.
template <typename T>
__device__ __forceinline__ void write_target_grad(T* out, int64_t target, int64_t vocab, float z_t,
                                                  const GradCoefficients& c) {
  if (target_in_row(target, vocab)) out[target] = from_float<T>(c.at_target(z_t));
}

// Dispatch a launcher templated on the element type.
#define LENS_DISPATCH_DTYPE(dtype, T, ...)                     \
  switch (dtype) {                                             \
    case DType::kFloat32: { using T = float; __VA_ARGS__ }     \
    case DType::kFloat16: { using T = __half; __VA_ARGS__ }    \
    case DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__ } \
    default: return cudaErrorInvalidValue;                     \
  }

// The same, for a function returning ``fallback`` on an unknown dtype.
#define LENS_DISPATCH_DTYPE_VALUE(dtype, T, fallback, ...)     \
  switch (dtype) {                                             \
    case DType::kFloat32: { using T = float; __VA_ARGS__ }     \
    case DType::kFloat16: { using T = __half; __VA_ARGS__ }    \
    case DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__ } \
    default: return fallback;                                  \
  }

// Blocks of a one-CTA-per-row grid: x is limited to 2^31 - 1, and kernels loop over the rest.
inline unsigned int row_grid(int64_t rows) {
  const int64_t cap = (int64_t{1} << 31) - 1;
  return static_cast<unsigned int>(rows < 1 ? 1 : (rows < cap ? rows : cap));
}

}  // namespace lens
