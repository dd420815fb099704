// Standalone check of the torch-free kernels against a float64 CPU reference, for the GPU machine
// (built by CMakeLists.txt as lens_kernels_test; run by csrc/test/device_check.sh). Fresh random
// inputs, NaN-poisoned outputs, every dtype, odd V, strided and misaligned rows, masked rows, every
// row-kernel path the device supports, ``auto`` at the production shapes with the cluster size
// asserted (8, and the non-portable 16) and with the occupancy fallback, -inf logits (the first
// element of every vector, whole blocks, a -inf target), kept targets outside [0, V), rows outside
// a strided in-place view untouched, rescale_grad, the in-place backward, a scalar temperature,
// PPO/CISPO/SAPO with k1/k2/k3 KL (a float64 loss reference written here), shuffled group ids with
// n > 1024, and empty work. Exit code 0 only if every check passes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "lens_kernels.h"
#include "loss_math.cuh"

using namespace lens;

#define CHECK_CUDA(call)                                                                       \
  do {                                                                                         \
    cudaError_t err_ = (call);                                                                 \
    if (err_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

static int g_failures = 0;
static std::mt19937_64 g_rng(20261126);

// The larger error, with NaN counted as infinite (std::max would drop a NaN argument).
static double worst(double e, double x) { return std::isnan(x) ? INFINITY : std::max(e, x); }

static void report(const std::string& name, double err, double tol) {
  const bool ok = std::isfinite(err) && err <= tol;
  if (!ok) ++g_failures;
  std::printf("%-72s err %.3e tol %.1e %s\n", name.c_str(), err, tol, ok ? "ok" : "FAIL");
}

// Host-side storage of one dtype, rounded the way the device sees it.
struct HostLogits {
  DType dtype;
  std::vector<uint16_t> half_bits;
  std::vector<float> f32;
  std::vector<double> value;  // the rounded values, for the reference
};

static uint16_t to_bits(float x, DType d) {
  if (d == DType::kFloat16) { __half h = __float2half_rn(x); uint16_t b; std::memcpy(&b, &h, 2); return b; }
  __nv_bfloat16 h = __float2bfloat16_rn(x); uint16_t b; std::memcpy(&b, &h, 2); return b;
}
static float from_bits(uint16_t b, DType d) {
  if (d == DType::kFloat16) { __half h; std::memcpy(&h, &b, 2); return __half2float(h); }
  __nv_bfloat16 h; std::memcpy(&h, &b, 2); return __bfloat162float(h);
}
static size_t esize(DType d) { return d == DType::kFloat32 ? 4 : 2; }
static const char* dname(DType d) { return d == DType::kFloat32 ? "fp32" : d == DType::kFloat16 ? "fp16" : "bf16"; }
static const char* pname(RowPath p) { return p == RowPath::kStream ? "stream" : p == RowPath::kSmemRow ? "smem_row" : "cluster"; }

static HostLogits make_logits(size_t count, DType d) {
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  HostLogits h{d, {}, {}, {}};
  h.value.resize(count);
  if (d == DType::kFloat32) h.f32.resize(count); else h.half_bits.resize(count);
  for (size_t i = 0; i < count; ++i) {
    float x = normal(g_rng) + (uni(g_rng) < 1e-3f ? 12.f : 0.f);  // a few dominant logits
    if (d == DType::kFloat32) { h.f32[i] = x; h.value[i] = x; }
    else { h.half_bits[i] = to_bits(x, d); h.value[i] = from_bits(h.half_bits[i], d); }
  }
  return h;
}

static void* upload(const HostLogits& h) {
  void* p = nullptr;
  const size_t bytes = h.value.size() * esize(h.dtype);
  CHECK_CUDA(cudaMalloc(&p, bytes));
  CHECK_CUDA(cudaMemcpy(p, h.dtype == DType::kFloat32 ? (const void*)h.f32.data() : (const void*)h.half_bits.data(),
                        bytes, cudaMemcpyHostToDevice));
  return p;
}
template <typename T>
static T* upload_vec(const std::vector<T>& v) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(1, v.size()) * sizeof(T)));
  if (!v.empty()) CHECK_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}
static std::vector<double> download(const void* p, size_t count, DType d) {
  std::vector<double> out(count);
  if (d == DType::kFloat32) {
    std::vector<float> f(count);
    CHECK_CUDA(cudaMemcpy(f.data(), p, count * 4, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < count; ++i) out[i] = f[i];
  } else {
    std::vector<uint16_t> b(count);
    CHECK_CUDA(cudaMemcpy(b.data(), p, count * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < count; ++i) out[i] = from_bits(b[i], d);
  }
  return out;
}
static std::vector<float> download_f(const float* p, size_t count) {
  std::vector<float> f(count);
  CHECK_CUDA(cudaMemcpy(f.data(), p, count * 4, cudaMemcpyDeviceToHost));
  return f;
}
static float* poisoned(size_t count) {  // NaN everywhere: an unwritten output cannot pass
  float* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(1, count) * 4));
  CHECK_CUDA(cudaMemset(p, 0xFF, std::max<size_t>(1, count) * 4));
  return p;
}

// A case: B sequences of T rows of V, stored in a [B, T + pad, V] buffer (pad > 0: a strided,
// misaligned logits[:, :-pad] view).
struct Case {
  int64_t B, T, V, pad;
  DType dtype;
};

// How a case runs: the row path, in place or not, one scalar temperature or one per row, special
// values (-inf logits at the first element of every vector and in whole blocks, a -inf target, kept
// targets outside [0, V)), the loss options, the debug flags of the launch and the cluster size
// ``auto`` must pick on sm_90 (0: not checked).
struct Variant {
  RowPath path = RowPath::kStream;
  bool inplace = false;
  bool scalar_tau = false;
  bool special = false;
  LossParams params{PolicyLoss::kPPO, 0.2f, 0.28f, -1.f, 3.f, 5.f, 1.f, 1.05f, 20.f, 0.04f, KLEstimator::kK3, 10.f, 0.5f};
  const char* loss = "ppo_k3";
  unsigned int flags = 0;
  int expect_cluster = 0;
};

struct RowRef {
  double lse, logp, entropy;
};

// float64 reference of one row: -inf entries have probability 0 and add 0 to the entropy.
static RowRef row_reference(const double* z, int64_t V, int64_t target, double inv_tau) {
  double m = -INFINITY;
  for (int64_t v = 0; v < V; ++v) m = std::max(m, z[v] * inv_tau);
  double l = 0, s = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (z[v] == -INFINITY) continue;
    const double d = z[v] * inv_tau - m, e = std::exp(d);
    l += e;
    s += e * d;
  }
  RowRef r;
  r.lse = m + std::log(l);
  r.logp = (target >= 0 && target < V) ? z[target] * inv_tau - r.lse : NAN;
  r.entropy = std::log(l) - s / l;
  return r;
}

// float64 dL/dl of one token, written from docs/design.md, Policy loss / the torch backend independently of loss_math.cuh
// (ties of min split the gradient, clamps zero it outside their range; is_weights = 1).
static double ref_g_l(double l, double l_old, double l_ref, double A, double w, const LossParams& p) {
  double log_r = l - l_old, drho_scale = 1.0;
  if (p.log_ratio_clamp > 0) {
    if (log_r < -p.log_ratio_clamp || log_r > p.log_ratio_clamp) drho_scale = 0.0;
    log_r = std::min<double>(std::max<double>(log_r, -p.log_ratio_clamp), p.log_ratio_clamp);
  }
  const double rho = std::exp(log_r), drho = rho * drho_scale;
  double g = 0;
  if (p.policy_loss == PolicyLoss::kPPO) {
    const double lo = 1.0 - p.epsilon_low, hi = 1.0 + p.epsilon_high;
    const double t1 = (p.delta > 0 ? std::min<double>(rho, p.delta) : rho) * A;
    const double d1 = (p.delta > 0 && rho > p.delta) ? 0.0 : A;
    const double t2 = std::min(std::max(rho, lo), hi) * A;
    const double d2 = (rho >= lo && rho <= hi) ? A : 0.0;
    double f = -std::min(t1, t2);
    double df = -(t1 < t2 ? d1 : t2 < t1 ? d2 : 0.5 * (d1 + d2));
    if (p.dual_clip > 0 && A < 0) {
      const double bound = -p.dual_clip * A;
      df = f > bound ? 0.0 : f == bound ? 0.5 * df : df;
    }
    g = w * df * drho;
  } else if (p.policy_loss == PolicyLoss::kCISPO) {
    g = -w * std::min<double>(rho, p.cispo_ratio_cap) * A;  // the capped ratio is detached
  } else {
    const double tau = A > 0 ? p.sapo_temperature_pos : p.sapo_temperature_neg;
    const double sg = 1.0 / (1.0 + std::exp(-tau * (rho - 1.0)));
    g = w * (-4.0 * sg * (1.0 - sg) * A) * drho;
  }
  if (p.beta != 0) {
    const double d = l_ref - l;
    double kl, dkl;
    if (p.kl_estimator == KLEstimator::kK1) { kl = -d; dkl = 1.0; }
    else if (p.kl_estimator == KLEstimator::kK2) { kl = 0.5 * d * d; dkl = -d; }
    else { kl = std::exp(d) - d - 1.0; dkl = 1.0 - std::exp(d); }
    if (p.kl_clamp > 0 && (kl < -p.kl_clamp || kl > p.kl_clamp)) dkl = 0.0;
    g += p.beta * w * dkl;
  }
  return g;
}

static double grad_tol(DType d) { return d == DType::kFloat32 ? 2e-5 : d == DType::kFloat16 ? 2e-3 : 1.6e-2; }

static bool is_cluster_device() {
  int dev = 0, major = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return major >= 9;
}

static bool same_plan(const FusedLossPlan& a, const FusedLossPlan& b) {
  return a.path == b.path && a.cluster_size == b.cluster_size && a.segment == b.segment && a.smem_bytes == b.smem_bytes;
}

static void check_case(const Case& c, const Variant& x) {
  const int64_t rows = c.B * c.T, V = c.V, Tp = c.T + c.pad;
  const size_t total = static_cast<size_t>(c.B * Tp * V);
  HostLogits h = make_logits(total, c.dtype);
  std::uniform_int_distribution<int64_t> tok(0, V - 1);
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<int64_t> targets(rows);
  std::vector<uint8_t> mask(rows);
  std::vector<float> tau(rows), adv(rows), w(rows), ew(rows), old(rows), ref(rows);
  const float scalar_tau = 0.8f;
  for (int64_t r = 0; r < rows; ++r) {
    mask[r] = (r % c.T == c.T - 1 && c.T > 1) || uni(g_rng) < 0.15f ? 0 : 1;  // masked rows, incl. each sequence's last
    targets[r] = mask[r] ? tok(g_rng) : -100;  // padding ids under the mask
    tau[r] = x.scalar_tau ? scalar_tau : 0.6f + uni(g_rng);
    adv[r] = normal(g_rng);
    w[r] = mask[r] ? 1.f / rows : 0.f;
    ew[r] = mask[r] ? -0.01f / rows : 0.f;
    ref[r] = -uni(g_rng) * 3.f;
  }
  auto row_at = [&](int64_t r) { return static_cast<size_t>(((r / c.T) * Tp + r % c.T) * V); };
  auto set_logit = [&](size_t i, float v) {
    if (c.dtype == DType::kFloat32) h.f32[i] = v; else h.half_bits[i] = to_bits(v, c.dtype);
    h.value[i] = v;
  };
  std::vector<uint8_t> bad_target(rows, 0);
  if (x.special) {
    for (int64_t r = 0; r < rows; ++r) {
      if (r % 3 == 1) continue;  // some rows stay finite
      for (int64_t v = 0; v < V; v += 8) set_logit(row_at(r) + v, -INFINITY);  // first element of vectors
      for (int64_t v = V / 3; v < std::min<int64_t>(V, V / 3 + 3000); ++v) set_logit(row_at(r) + v, -INFINITY);
      if (r % 3 == 2)  // every thread's first fragment (512 threads x 4 vectors of up to 8) is all -inf
        for (int64_t v = 0; v < std::min<int64_t>(V - 1, 512 * 4 * 8 + 64); ++v) set_logit(row_at(r) + v, -INFINITY);
      set_logit(row_at(r) + V - 1, 1.5f);  // at least one finite logit
      // targets on finite logits (a -inf target, log-prob -inf, is in csrc/test/softmax_host.cu)
      while (mask[r] && h.value[row_at(r) + targets[r]] == -INFINITY) targets[r] = (targets[r] + 1) % V;
    }
    // kept targets outside [0, V): NaN log-prob, loss and gradient row, never probability 1
    int marked = 0;
    for (int64_t r = 0; r < rows && marked < 2; ++r)
      if (mask[r]) { targets[r] = marked == 0 ? V : -100; bad_target[r] = 1; ++marked; }
  }
  std::vector<bool> keep(mask.begin(), mask.end());
  std::vector<RowRef> rr(rows);
  for (int64_t r = 0; r < rows; ++r) {
    if (!mask[r]) continue;
    rr[r] = row_reference(h.value.data() + row_at(r), V, targets[r], 1.0 / tau[r]);
    old[r] = bad_target[r] ? -1.f : static_cast<float>(rr[r].logp + 0.3 * normal(g_rng));  // ratios around the clip range
  }
  const std::vector<double> original = h.value;
  void* d_logits = upload(h);
  int64_t* d_targets = upload_vec(targets);
  bool* d_mask = reinterpret_cast<bool*>(upload_vec(mask));
  float *d_tau = upload_vec(tau), *d_adv = upload_vec(adv), *d_w = upload_vec(w), *d_ew = upload_vec(ew),
        *d_old = upload_vec(old), *d_ref = upload_vec(ref);
  const RowLayout in_layout{c.T, Tp * V, V};
  void* d_grad = d_logits;
  RowLayout out_layout = in_layout;
  if (!x.inplace) {
    CHECK_CUDA(cudaMalloc(&d_grad, rows * V * esize(c.dtype)));
    CHECK_CUDA(cudaMemset(d_grad, 0xFF, rows * V * esize(c.dtype)));  // NaN poison
    out_layout = RowLayout{c.T, c.T * V, V};
  }
  const std::string tag = std::string(dname(c.dtype)) + " B" + std::to_string(c.B) + " T" + std::to_string(c.T) +
                          " V" + std::to_string(V) + (c.pad ? " strided" : "") + " " +
                          (x.path == RowPath::kAuto ? "auto" : pname(x.path)) + (x.inplace ? " inplace" : "") +
                          (x.scalar_tau ? " tau" : "") + (x.special ? " special" : "") + " " + x.loss +
                          (x.flags ? " no-cluster-occupancy" : "");

  // ---- fused loss
  FusedLossArgs a{};
  a.logits = d_logits; a.targets = d_targets; a.mask = d_mask; a.tau_rows = x.scalar_tau ? nullptr : d_tau;
  a.tau = scalar_tau;
  a.advantages = d_adv; a.loss_weight = d_w; a.entropy_weight = d_ew; a.old_logp = d_old; a.ref_logp = d_ref;
  a.is_weights = nullptr;
  a.params = x.params;
  a.rows = rows; a.vocab = V; a.layout = in_layout; a.dtype = c.dtype; a.path = x.path; a.debug_flags = x.flags;
  a.grad = d_grad; a.grad_layout = out_layout;
  a.logp = poisoned(rows); a.entropy = poisoned(rows); a.g_logp = poisoned(rows);
  CHECK_CUDA(launch_fused_policy_loss(a, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  // the plan that ran is the plan the host reports, and auto picks the production cluster sizes
  const FusedLossPlan ran = fused_loss_last_launch();
  const FusedLossPlan planned = fused_loss_plan(rows, V, c.dtype, x.path, x.flags);
  std::printf("  ran %s, %d CTA(s) per row, segment %lld, %lld B shared\n", pname(ran.path), ran.cluster_size,
              static_cast<long long>(ran.segment), static_cast<long long>(ran.smem_bytes));
  report("fused_loss plan == ran " + tag, same_plan(ran, planned) ? 0.0 : INFINITY, 0.0);
  if (x.path != RowPath::kAuto) report("fused_loss forced path ran " + tag, ran.path == x.path ? 0.0 : INFINITY, 0.0);
  if (x.expect_cluster > 0 && is_cluster_device()) {
    const bool ok = x.flags ? ran.path != RowPath::kCluster || ran.cluster_size < x.expect_cluster
                            : ran.path == RowPath::kCluster && ran.cluster_size == x.expect_cluster;
    report("fused_loss auto cluster size " + std::to_string(x.expect_cluster) + (x.flags ? " refused " : " ") + tag,
           ok ? 0.0 : INFINITY, 0.0);
  }
  const auto logp = download_f(a.logp, rows), ent = download_f(a.entropy, rows), gl = download_f(a.g_logp, rows);
  double e_logp = 0, e_ent = 0, e_gl = 0, e_grad = 0, e_inf = 0, e_bad = 0, max_ref_grad = 1e-30;
  std::vector<double> grad_all;
  // gradient rows: in place they live at the input layout, else contiguous
  if (x.inplace) grad_all = download(d_logits, total, c.dtype);
  else grad_all = download(d_grad, rows * V, c.dtype);
  if (x.inplace && c.pad) {  // rows outside the strided view are never written
    double e_pad = 0;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t t = c.T; t < Tp; ++t)
        for (int64_t v = 0; v < V; ++v) {
          const size_t i = static_cast<size_t>((b * Tp + t) * V + v);
          e_pad = worst(e_pad, grad_all[i] == original[i] ? 0.0 : INFINITY);
        }
    report("fused_loss rows outside the view untouched " + tag, e_pad, 0.0);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const double* gz = grad_all.data() + (x.inplace ? row_at(r) : static_cast<size_t>(r * V));
    if (!mask[r]) {
      e_logp = worst(e_logp, std::fabs((double)logp[r]) + (std::isnan(logp[r]) ? INFINITY : 0));
      e_gl = worst(e_gl, std::fabs((double)gl[r]) + (std::isnan(gl[r]) ? INFINITY : 0));
      for (int64_t v = 0; v < V; ++v) e_grad = worst(e_grad, gz[v] != 0.0 ? INFINITY : 0.0);  // exact zeros
      continue;
    }
    if (bad_target[r]) {  // NaN log-prob, dL/dl and the whole gradient row
      bool ok = std::isnan(logp[r]) && std::isnan(gl[r]);
      for (int64_t v = 0; v < V; ++v) ok = ok && std::isnan(gz[v]);
      e_bad = worst(e_bad, ok ? 0.0 : INFINITY);
      continue;
    }
    const RowRef& R = rr[r];
    if (!(logp[r] <= 0.f)) e_logp = INFINITY;  // a log-prob is never positive, never NaN
    e_logp = worst(e_logp, std::fabs(logp[r] - R.logp) / (1.0 + std::fabs(R.logp)));
    e_ent = worst(e_ent, std::fabs(ent[r] - R.entropy) / (1.0 + std::fabs(R.entropy)));
    // the coefficient from the kernel's own log-prob (checked above): a reference log-prob a
    // rounding away could sit on the other side of a clip boundary
    const double g_ref = ref_g_l(logp[r], old[r], ref[r], adv[r], w[r], a.params);
    e_gl = worst(e_gl, std::fabs(gl[r] - g_ref) / (1e-3 / rows + std::fabs(g_ref)));
    const double inv_tau = 1.0 / tau[r];
    const double* z = h.value.data() + row_at(r);
    for (int64_t v = 0; v < V; ++v) {
      if (z[v] == -INFINITY && v != targets[r]) {  // probability 0: exactly 0
        e_inf = worst(e_inf, gz[v] == 0.0 ? 0.0 : INFINITY);
        continue;
      }
      const double lp = z[v] * inv_tau - R.lse, p = std::exp(lp);
      const double g = a.params.grad_scale * inv_tau *
                       (g_ref * ((v == targets[r] ? 1.0 : 0.0) - p) - (double)ew[r] * p * (lp + R.entropy));
      max_ref_grad = std::max(max_ref_grad, std::fabs(g));
      e_grad = worst(e_grad, std::isnan(gz[v]) ? INFINITY : std::fabs(gz[v] - g));
    }
  }
  report("fused_loss logp   " + tag, e_logp, 3e-5);
  report("fused_loss entropy " + tag, e_ent, 2e-5);
  report("fused_loss g_logp " + tag, e_gl, 1e-3);
  report("fused_loss grad   " + tag, e_grad / max_ref_grad, grad_tol(c.dtype));
  if (x.special) {
    report("fused_loss -inf logits get exactly 0 " + tag, e_inf, 0.0);
    report("fused_loss kept bad target -> NaN row " + tag, e_bad, 0.0);
  }

  // ---- the grad-scale contract on what was just written: ratio 1 leaves it, ratio 0.25 scales it
  if (x.path == RowPath::kStream || x.path == RowPath::kAuto) {
    for (float ratio : {1.f, 0.25f}) {
      RescaleArgs s{};
      s.grad = d_grad; s.layout = out_layout; s.ratio = upload_vec(std::vector<float>{ratio});
      s.rows = rows; s.vocab = V; s.dtype = c.dtype;
      CHECK_CUDA(launch_rescale_grad(s, 0));
      CHECK_CUDA(cudaDeviceSynchronize());
      const auto after = download(d_grad, x.inplace ? total : static_cast<size_t>(rows * V), c.dtype);
      double e = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const size_t base = x.inplace ? row_at(r) : static_cast<size_t>(r * V);
        for (int64_t v = 0; v < V; ++v) {
          const double want = grad_all[base + v] * ratio, got = after[base + v];
          // 0.25 is a power of two: exact but for 16-bit subnormals
          e = worst(e, std::isnan(want) ? (std::isnan(got) ? 0.0 : INFINITY)
                                        : std::fabs(got - want) > 1e-3 * std::fabs(want) + 6e-8 ? INFINITY : 0.0);
        }
      }
      report("rescale_grad x" + std::to_string(ratio).substr(0, 4) + " " + tag, e, 0.0);
      grad_all = after;
      CHECK_CUDA(cudaFree((void*)s.ratio));
    }
  }

  // ---- token_logprobs forward and backward, on the unmodified input (or, in place, after restoring
  // it), the backward also written over the logits
  if (x.path == RowPath::kStream) {
    if (x.inplace) {
      CHECK_CUDA(cudaFree(d_logits));
      d_logits = upload(h);
    }
    LogprobFwdArgs f{};
    f.logits = d_logits; f.targets = d_targets; f.mask = d_mask; f.tau_rows = a.tau_rows; f.tau = scalar_tau;
    f.rows = rows; f.vocab = V; f.layout = in_layout; f.dtype = c.dtype;
    f.logp = poisoned(rows); f.entropy = poisoned(rows); f.lse = poisoned(rows);
    CHECK_CUDA(launch_token_logprobs_fwd(f, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    const auto lp = download_f(f.logp, rows), en = download_f(f.entropy, rows);
    double el = 0, ee = 0, eb = 0;
    for (int64_t r = 0; r < rows; ++r) {
      if (!mask[r]) { el = worst(el, lp[r] == 0.f && en[r] == 0.f ? 0.0 : INFINITY); continue; }
      if (bad_target[r]) { eb = worst(eb, std::isnan(lp[r]) ? 0.0 : INFINITY); continue; }
      if (!(lp[r] <= 0.f)) el = INFINITY;
      el = worst(el, std::fabs(lp[r] - rr[r].logp) / (1.0 + std::fabs(rr[r].logp)));
      ee = worst(ee, std::fabs(en[r] - rr[r].entropy) / (1.0 + std::fabs(rr[r].entropy)));
    }
    report("logprobs_fwd logp " + tag, el, 3e-5);
    report("logprobs_fwd entropy " + tag, ee, 2e-5);
    if (x.special) report("logprobs_fwd kept bad target -> NaN " + tag, eb, 0.0);

    std::vector<float> g_l(rows), g_h(rows);
    for (int64_t r = 0; r < rows; ++r) { g_l[r] = normal(g_rng); g_h[r] = normal(g_rng); }
    LogprobBwdArgs b{};
    b.logits = d_logits; b.targets = d_targets; b.mask = d_mask; b.tau_rows = a.tau_rows; b.tau = scalar_tau;
    b.lse = f.lse; b.entropy = f.entropy; b.g_logp = upload_vec(g_l); b.g_entropy = upload_vec(g_h);
    b.rows = rows; b.vocab = V; b.layout = in_layout; b.dtype = c.dtype;
    if (!x.inplace) CHECK_CUDA(cudaMemset(d_grad, 0xFF, rows * V * esize(c.dtype)));
    b.grad = x.inplace ? d_logits : d_grad; b.grad_layout = x.inplace ? in_layout : out_layout;
    CHECK_CUDA(launch_token_logprobs_bwd(b, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    const auto gz_all = x.inplace ? download(d_logits, total, c.dtype) : download(d_grad, rows * V, c.dtype);
    double eg = 0, mg = 1e-30, ez = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const double* gz = gz_all.data() + (x.inplace ? row_at(r) : static_cast<size_t>(r * V));
      if (!mask[r]) { for (int64_t v = 0; v < V; ++v) eg = worst(eg, gz[v] != 0.0 ? INFINITY : 0.0); continue; }
      if (bad_target[r]) {
        for (int64_t v = 0; v < V; ++v) ez = worst(ez, std::isnan(gz[v]) ? 0.0 : INFINITY);
        continue;
      }
      const double* z = h.value.data() + row_at(r);
      const double inv_tau = 1.0 / tau[r];
      for (int64_t v = 0; v < V; ++v) {
        if (z[v] == -INFINITY && v != targets[r]) { ez = worst(ez, gz[v] == 0.0 ? 0.0 : INFINITY); continue; }
        const double lpv = z[v] * inv_tau - rr[r].lse, p = std::exp(lpv);
        const double g = inv_tau * (g_l[r] * ((v == targets[r] ? 1.0 : 0.0) - p) - g_h[r] * p * (lpv + rr[r].entropy));
        mg = std::max(mg, std::fabs(g));
        eg = worst(eg, std::isnan(gz[v]) ? INFINITY : std::fabs(gz[v] - g));
      }
    }
    report("logprobs_bwd grad " + tag, eg / mg, grad_tol(c.dtype));
    report("logprobs_bwd -inf -> 0, bad target -> NaN " + tag, ez, 0.0);
    if (x.inplace && c.pad) {
      double e_pad = 0;
      for (int64_t bb = 0; bb < c.B; ++bb)
        for (int64_t t = c.T; t < Tp; ++t)
          for (int64_t v = 0; v < V; ++v) {
            const size_t i = static_cast<size_t>((bb * Tp + t) * V + v);
            e_pad = worst(e_pad, gz_all[i] == original[i] ? 0.0 : INFINITY);
          }
      report("logprobs_bwd in place: rows outside the view untouched " + tag, e_pad, 0.0);
    }
    CHECK_CUDA(cudaFree(f.logp)); CHECK_CUDA(cudaFree(f.entropy)); CHECK_CUDA(cudaFree(f.lse));
    CHECK_CUDA(cudaFree((void*)b.g_logp)); CHECK_CUDA(cudaFree((void*)b.g_entropy));
  }
  if (!x.inplace) CHECK_CUDA(cudaFree(d_grad));
  for (void* p : {(void*)d_logits, (void*)d_targets, (void*)d_mask, (void*)d_tau, (void*)d_adv, (void*)d_w,
                  (void*)d_ew, (void*)d_old, (void*)d_ref, (void*)a.logp, (void*)a.entropy, (void*)a.g_logp})
    CHECK_CUDA(cudaFree(p));
}

// Empty work launches nothing and succeeds (a grid of 0 blocks would be an invalid configuration).
static void check_empty() {
  FusedLossArgs a{};
  a.vocab = 7; a.dtype = DType::kBFloat16; a.layout = a.grad_layout = RowLayout{1, 7, 0}; a.path = RowPath::kAuto;
  LogprobFwdArgs f{}; f.vocab = 7; f.dtype = DType::kFloat32; f.layout = RowLayout{1, 7, 0};
  LogprobBwdArgs b{}; b.vocab = 7; b.dtype = DType::kFloat16; b.layout = b.grad_layout = RowLayout{1, 7, 0};
  RescaleArgs r{}; r.vocab = 7; r.dtype = DType::kFloat32; r.layout = RowLayout{1, 7, 0};
  bool ok = launch_fused_policy_loss(a, 0) == cudaSuccess && launch_token_logprobs_fwd(f, 0) == cudaSuccess &&
            launch_token_logprobs_bwd(b, 0) == cudaSuccess && launch_rescale_grad(r, 0) == cudaSuccess;
  ok = ok && cudaDeviceSynchronize() == cudaSuccess && cudaGetLastError() == cudaSuccess;
  report("empty work (rows = 0, n = 0): no launch, no error", ok ? 0.0 : INFINITY, 0.0);
}

// --small: a few small shapes over every path (cluster included), in place and special values, for
// compute-sanitizer (memcheck, racecheck, synccheck), which runs kernels ~100x slower.
static int run_small() {
  check_empty();
  for (const Case& c : {Case{2, 7, 7, 1, DType::kBFloat16}, Case{2, 3, 4099, 1, DType::kFloat32},
                        Case{1, 3, 50001, 1, DType::kBFloat16}}) {
    for (RowPath p : {RowPath::kStream, RowPath::kSmemRow, RowPath::kCluster, RowPath::kAuto}) {
      if (p != RowPath::kAuto && fused_loss_path(c.V, c.dtype, p) != p) continue;
      for (bool inplace : {false, true}) {
        Variant x;
        x.path = p;
        x.inplace = inplace;
        x.special = inplace;
        check_case(c, x);
      }
    }
  }
  std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
  return g_failures ? 1 : 0;
}

int main(int argc, char** argv) {
  int dev = 0, major = 0;
  // no GPU (or no driver) is the common way to get here by mistake: say so in words
  if (cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) {
    std::fprintf(stderr, "lens_kernels_test needs a CUDA GPU: %s\n", cudaGetErrorString(err));
    return 2;
  }
  CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  std::printf("device compute capability major %d\n", major);
  if (argc > 1 && std::strcmp(argv[1], "--small") == 0) return run_small();
  check_empty();
  const Case cases[] = {
      {2, 5, 1, 0, DType::kFloat32},      {2, 7, 7, 1, DType::kBFloat16},    {3, 9, 1000, 1, DType::kFloat16},
      {2, 6, 4099, 1, DType::kFloat32},   {2, 8, 4099, 0, DType::kBFloat16}, {2, 4, 50001, 1, DType::kBFloat16},
      {1, 6, 151936, 1, DType::kBFloat16}, {1, 4, 151936, 0, DType::kFloat32}, {1, 2, 262144, 0, DType::kFloat16},
  };
  for (const Case& c : cases) {
    for (RowPath p : {RowPath::kStream, RowPath::kSmemRow, RowPath::kCluster}) {
      if (fused_loss_path(c.V, c.dtype, p) != p) continue;  // this V does not fit that variant on this device
      Variant x;
      x.path = p;
      check_case(c, x);
      x.inplace = true;
      check_case(c, x);
    }
  }
  // auto at the production shapes: 8 CTAs per cluster for bf16 V=151936, the non-portable 16 for
  // fp16 V=262144 and fp32 V=151936 (on sm_90); then the same with every cluster refused by the
  // occupancy query (the fallback: a smaller cluster with larger segments, or one CTA per row)
  const struct { Case c; int cluster; } production[] = {
      {{2, 3, 151936, 1, DType::kBFloat16}, 8}, {{1, 3, 262144, 0, DType::kFloat16}, 16},
      {{1, 3, 151936, 1, DType::kFloat32}, 16},
  };
  for (const auto& pc : production) {
    Variant x;
    x.path = RowPath::kAuto;
    x.expect_cluster = pc.cluster;
    check_case(pc.c, x);
    x.inplace = true;
    x.special = true;
    check_case(pc.c, x);
    x.inplace = false;
    x.special = false;
    x.flags = kDebugNoClusterOccupancy;
    check_case(pc.c, x);
  }
  // the loss options, special values, scalar temperature and in place on the one-CTA paths
  const LossParams ppo_k1{PolicyLoss::kPPO, 0.2f, 0.2f, 1.5f, -1.f, 5.f, 1.f, 1.05f, -1.f, 0.1f, KLEstimator::kK1, -1.f, 1.f};
  const LossParams cispo_k2{PolicyLoss::kCISPO, 0.2f, 0.2f, -1.f, -1.f, 1.3f, 1.f, 1.05f, -1.f, 0.02f, KLEstimator::kK2, 0.3f, 1.f};
  const LossParams sapo{PolicyLoss::kSAPO, 0.2f, 0.2f, -1.f, -1.f, 5.f, 1.f, 1.05f, -1.f, 0.f, KLEstimator::kK3, -1.f, 2.f};
  const struct { LossParams p; const char* name; } losses[] = {{ppo_k1, "ppo_delta_k1"}, {cispo_k2, "cispo_k2"},
                                                               {sapo, "sapo"}};
  for (const Case& c : {Case{2, 6, 4099, 1, DType::kBFloat16}, Case{2, 5, 1003, 1, DType::kFloat32}}) {
    for (RowPath p : {RowPath::kStream, RowPath::kSmemRow}) {
      if (fused_loss_path(c.V, c.dtype, p) != p) continue;
      for (const auto& l : losses) {
        Variant x;
        x.path = p;
        x.params = l.p;
        x.loss = l.name;
        check_case(c, x);
      }
      for (bool inplace : {false, true}) {
        Variant x;
        x.path = p;
        x.inplace = inplace;
        x.special = true;
        x.scalar_tau = true;
        check_case(c, x);
      }
    }
  }
  std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
  return g_failures ? 1 : 0;
}
