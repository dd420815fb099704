// Standalone check of the torch-free kernels against a float64 CPU reference, for the GPU machine
// (built by CMakeLists.txt as lens_kernels_test; run by benchmarks/device_check.sh). Fresh random
// inputs, NaN-poisoned outputs, every dtype, odd V, strided and misaligned rows, masked rows, every
// row-kernel path the device supports. Exit code 0 only if every check passes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

struct RowRef {
  double lse, logp, entropy;
};

static RowRef row_reference(const double* z, int64_t V, int64_t target, double inv_tau) {
  double m = -INFINITY;
  for (int64_t v = 0; v < V; ++v) m = std::max(m, z[v] * inv_tau);
  double l = 0, s = 0;
  for (int64_t v = 0; v < V; ++v) { const double e = std::exp(z[v] * inv_tau - m); l += e; s += e * (z[v] * inv_tau - m); }
  RowRef r;
  r.lse = m + std::log(l);
  r.logp = z[target] * inv_tau - r.lse;
  r.entropy = std::log(l) - s / l;
  return r;
}

static double grad_tol(DType d) { return d == DType::kFloat32 ? 2e-5 : d == DType::kFloat16 ? 2e-3 : 1.6e-2; }

static void check_case(const Case& c, RowPath path, bool inplace, int device_major) {
  const int64_t rows = c.B * c.T, V = c.V, Tp = c.T + c.pad;
  const size_t total = static_cast<size_t>(c.B * Tp * V);
  HostLogits h = make_logits(total, c.dtype);
  std::uniform_int_distribution<int64_t> tok(0, V - 1);
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<int64_t> targets(rows);
  std::vector<uint8_t> mask(rows);
  std::vector<float> tau(rows), adv(rows), w(rows), ew(rows), old(rows), ref(rows);
  for (int64_t r = 0; r < rows; ++r) {
    mask[r] = (r % c.T == c.T - 1 && c.T > 1) || uni(g_rng) < 0.15f ? 0 : 1;  // masked rows, incl. each sequence's last
    targets[r] = mask[r] ? tok(g_rng) : -100;  // padding ids under the mask
    tau[r] = 0.6f + uni(g_rng);
    adv[r] = normal(g_rng);
    w[r] = mask[r] ? 1.f / rows : 0.f;
    ew[r] = mask[r] ? -0.01f / rows : 0.f;
    ref[r] = -uni(g_rng) * 3.f;
  }
  std::vector<bool> keep(mask.begin(), mask.end());
  // reference of each row
  std::vector<RowRef> rr(rows);
  for (int64_t r = 0; r < rows; ++r) {
    if (!mask[r]) continue;
    const double* z = h.value.data() + ((r / c.T) * Tp + r % c.T) * V;
    rr[r] = row_reference(z, V, targets[r], 1.0 / tau[r]);
    old[r] = static_cast<float>(rr[r].logp + 0.3 * normal(g_rng));  // ratios around and outside the clip range
  }
  void* d_logits = upload(h);
  int64_t* d_targets = upload_vec(targets);
  bool* d_mask = reinterpret_cast<bool*>(upload_vec(mask));
  float *d_tau = upload_vec(tau), *d_adv = upload_vec(adv), *d_w = upload_vec(w), *d_ew = upload_vec(ew),
        *d_old = upload_vec(old), *d_ref = upload_vec(ref);
  const RowLayout in_layout{c.T, Tp * V, V};
  void* d_grad = d_logits;
  RowLayout out_layout = in_layout;
  if (!inplace) {
    CHECK_CUDA(cudaMalloc(&d_grad, rows * V * esize(c.dtype)));
    CHECK_CUDA(cudaMemset(d_grad, 0xFF, rows * V * esize(c.dtype)));  // NaN poison
    out_layout = RowLayout{c.T, c.T * V, V};
  }
  const std::string tag = std::string(dname(c.dtype)) + " B" + std::to_string(c.B) + " T" + std::to_string(c.T) +
                          " V" + std::to_string(V) + (c.pad ? " strided" : "") + " " + pname(path) +
                          (inplace ? " inplace" : "");

  // ---- fused loss
  FusedLossArgs a{};
  a.logits = d_logits; a.targets = d_targets; a.mask = d_mask; a.tau_rows = d_tau; a.tau = 1.f;
  a.advantages = d_adv; a.loss_weight = d_w; a.entropy_weight = d_ew; a.old_logp = d_old; a.ref_logp = d_ref;
  a.is_weights = nullptr;
  a.params = LossParams{PolicyLoss::kPPO, 0.2f, 0.28f, -1.f, 3.f, 5.f, 1.f, 1.05f, 20.f, 0.04f, KLEstimator::kK3, 10.f, 0.5f};
  a.rows = rows; a.vocab = V; a.layout = in_layout; a.dtype = c.dtype; a.path = path;
  a.grad = d_grad; a.grad_layout = out_layout;
  a.logp = poisoned(rows); a.entropy = poisoned(rows); a.g_logp = poisoned(rows);
  CHECK_CUDA(launch_fused_policy_loss(a, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto logp = download_f(a.logp, rows), ent = download_f(a.entropy, rows), gl = download_f(a.g_logp, rows);
  double e_logp = 0, e_ent = 0, e_gl = 0, e_grad = 0, max_ref_grad = 1e-30;
  std::vector<double> grad_all;
  // gradient rows: in place they live at the input layout, else contiguous
  if (inplace) grad_all = download(d_logits, total, c.dtype);
  else grad_all = download(d_grad, rows * V, c.dtype);
  for (int64_t r = 0; r < rows; ++r) {
    const double* gz = grad_all.data() + (inplace ? ((r / c.T) * Tp + r % c.T) * V : r * V);
    if (!mask[r]) {
      e_logp = worst(e_logp, std::fabs((double)logp[r]) + (std::isnan(logp[r]) ? INFINITY : 0));
      e_gl = worst(e_gl, std::fabs((double)gl[r]) + (std::isnan(gl[r]) ? INFINITY : 0));
      for (int64_t v = 0; v < V; ++v) e_grad = worst(e_grad, gz[v] != 0.0 ? INFINITY : 0.0);  // exact zeros
      continue;
    }
    const RowRef& R = rr[r];
    if (!(logp[r] <= 0.f)) e_logp = INFINITY;  // a log-prob is never positive, never NaN
    e_logp = worst(e_logp, std::fabs(logp[r] - R.logp) / (1.0 + std::fabs(R.logp)));
    e_ent = worst(e_ent, std::fabs(ent[r] - R.entropy) / (1.0 + std::fabs(R.entropy)));
    // the coefficients from the kernel's own log-prob (checked above): a reference log-prob a
    // rounding away could sit on the other side of a clip boundary
    const TokenTerms t = token_terms(logp[r], old[r], true, ref[r], adv[r], w[r], 1.f, a.params);
    e_gl = worst(e_gl, std::fabs(gl[r] - t.g_l) / (1e-3 / rows + std::fabs(t.g_l)));
    const double inv_tau = 1.0 / tau[r];
    const double* z = h.value.data() + ((r / c.T) * Tp + r % c.T) * V;
    for (int64_t v = 0; v < V; ++v) {
      const double lp = z[v] * inv_tau - R.lse, p = std::exp(lp);
      const double g = a.params.grad_scale * inv_tau *
                       ((double)t.g_l * ((v == targets[r] ? 1.0 : 0.0) - p) - (double)ew[r] * p * (lp + R.entropy));
      max_ref_grad = std::max(max_ref_grad, std::fabs(g));
      e_grad = worst(e_grad, std::isnan(gz[v]) ? INFINITY : std::fabs(gz[v] - g));
    }
  }
  report("fused_loss logp   " + tag, e_logp, 3e-5);
  report("fused_loss entropy " + tag, e_ent, 2e-5);
  report("fused_loss g_logp " + tag, e_gl, 1e-3);
  report("fused_loss grad   " + tag, e_grad / max_ref_grad, grad_tol(c.dtype));
  (void)device_major;

  // ---- token_logprobs forward (with sequence sums) and backward, on the unmodified input
  if (!inplace && path == RowPath::kStream) {
    LogprobFwdArgs f{};
    f.logits = d_logits; f.targets = d_targets; f.mask = d_mask; f.tau_rows = d_tau; f.tau = 1.f;
    f.rows = rows; f.vocab = V; f.layout = in_layout; f.dtype = c.dtype;
    f.logp = poisoned(rows); f.entropy = poisoned(rows); f.lse = poisoned(rows);
    CHECK_CUDA(cudaMalloc(&f.seq_sum, c.B * 4));
    CHECK_CUDA(cudaMemset(f.seq_sum, 0, c.B * 4));
    CHECK_CUDA(launch_token_logprobs_fwd(f, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    const auto lp = download_f(f.logp, rows), en = download_f(f.entropy, rows), ss = download_f(f.seq_sum, c.B);
    double el = 0, ee = 0, es = 0;
    std::vector<double> seq(c.B, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      if (!mask[r]) { el = worst(el, lp[r] == 0.f && en[r] == 0.f ? 0.0 : INFINITY); continue; }
      if (!(lp[r] <= 0.f)) el = INFINITY;
      el = worst(el, std::fabs(lp[r] - rr[r].logp) / (1.0 + std::fabs(rr[r].logp)));
      ee = worst(ee, std::fabs(en[r] - rr[r].entropy) / (1.0 + std::fabs(rr[r].entropy)));
      seq[r / c.T] += rr[r].logp;
    }
    for (int64_t b = 0; b < c.B; ++b) es = worst(es, std::fabs(ss[b] - seq[b]) / (1.0 + std::fabs(seq[b])));
    report("logprobs_fwd logp " + tag, el, 3e-5);
    report("logprobs_fwd entropy " + tag, ee, 2e-5);
    report("logprobs_fwd seq_sum " + tag, es, 1e-4);

    std::vector<float> g_l(rows), g_h(rows);
    for (int64_t r = 0; r < rows; ++r) { g_l[r] = normal(g_rng); g_h[r] = normal(g_rng); }
    LogprobBwdArgs b{};
    b.logits = d_logits; b.targets = d_targets; b.mask = d_mask; b.tau_rows = d_tau; b.tau = 1.f;
    b.lse = f.lse; b.entropy = f.entropy; b.g_logp = upload_vec(g_l); b.g_entropy = upload_vec(g_h);
    b.rows = rows; b.vocab = V; b.layout = in_layout; b.dtype = c.dtype;
    CHECK_CUDA(cudaMemset(d_grad, 0xFF, rows * V * esize(c.dtype)));
    b.grad = d_grad; b.grad_layout = out_layout;
    CHECK_CUDA(launch_token_logprobs_bwd(b, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    const auto gz_all = download(d_grad, rows * V, c.dtype);
    double eg = 0, mg = 1e-30;
    for (int64_t r = 0; r < rows; ++r) {
      const double* gz = gz_all.data() + r * V;
      if (!mask[r]) { for (int64_t v = 0; v < V; ++v) eg = worst(eg, gz[v] != 0.0 ? INFINITY : 0.0); continue; }
      const double* z = h.value.data() + ((r / c.T) * Tp + r % c.T) * V;
      const double inv_tau = 1.0 / tau[r];
      for (int64_t v = 0; v < V; ++v) {
        const double lpv = z[v] * inv_tau - rr[r].lse, p = std::exp(lpv);
        const double g = inv_tau * (g_l[r] * ((v == targets[r] ? 1.0 : 0.0) - p) - g_h[r] * p * (lpv + rr[r].entropy));
        mg = std::max(mg, std::fabs(g));
        eg = worst(eg, std::isnan(gz[v]) ? INFINITY : std::fabs(gz[v] - g));
      }
    }
    report("logprobs_bwd grad " + tag, eg / mg, grad_tol(c.dtype));
    CHECK_CUDA(cudaFree(f.logp)); CHECK_CUDA(cudaFree(f.entropy)); CHECK_CUDA(cudaFree(f.lse));
    CHECK_CUDA(cudaFree(f.seq_sum)); CHECK_CUDA(cudaFree((void*)b.g_logp)); CHECK_CUDA(cudaFree((void*)b.g_entropy));
  }
  if (!inplace) CHECK_CUDA(cudaFree(d_grad));
  for (void* p : {(void*)d_logits, (void*)d_targets, (void*)d_mask, (void*)d_tau, (void*)d_adv, (void*)d_w,
                  (void*)d_ew, (void*)d_old, (void*)d_ref, (void*)a.logp, (void*)a.entropy, (void*)a.g_logp})
    CHECK_CUDA(cudaFree(p));
}

// GRPO and LENS of contiguous groups against a float64 port of advantages._group_advantages.
static void check_advantages() {
  const int64_t G = 8, groups = 64, n = G * groups, T = 37;
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  std::vector<float> rewards(n), old(n * T);
  std::vector<uint8_t> omask(n * T);
  std::vector<int64_t> group(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = i / G;
    const float p_correct = g % 4 == 0 ? 0.f : (g % 4 == 1 ? 1.f : 0.5f);  // negative, all-correct, mixed groups
    rewards[i] = uni(g_rng) < p_correct ? 1.f : 0.f;
    group[i] = g;
    for (int64_t t = 0; t < T; ++t) { old[i * T + t] = -uni(g_rng) * 2.f; omask[i * T + t] = uni(g_rng) < 0.8f; }
  }
  for (int est = 0; est < 4; ++est) {
    GroupAdvArgs a{};
    a.rewards = upload_vec(rewards); a.group = upload_vec(group); a.correct = nullptr;
    a.old_logp = upload_vec(old); a.old_mask = reinterpret_cast<bool*>(upload_vec(omask));
    a.n = n; a.seq_len = T; a.old_stride = T;
    a.estimator = static_cast<Estimator>(est); a.scale = est == 1 || est == 2 ? Scale::kNone : Scale::kGroup;
    a.lens_groups = LensGroups::kAll; a.lens_d_sequence = false; a.std_unbiased = true; a.eps = 1e-4f; a.lens_alpha = 0.25f;
    CHECK_CUDA(cudaMalloc(&a.workspace, kAdvWorkspacePerItem * n * 4));
    a.advantages = poisoned(n); a.confidence = poisoned(n); a.metrics = poisoned(kAdvMetrics);
    CHECK_CUDA(launch_group_advantages(a, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    const auto adv = download_f(a.advantages, n);
    double err = 0;
    for (int64_t g = 0; g < groups; ++g) {
      std::vector<double> x(G), pbar(G);
      double k = 0, maxp = 0, inv = 0;
      for (int64_t j = 0; j < G; ++j) {
        const int64_t i = g * G + j;
        double s = 0, c = 0;
        for (int64_t t = 0; t < T; ++t) if (omask[i * T + t]) { s += old[i * T + t]; c += 1; }
        pbar[j] = std::exp(s / std::max(c, 1.0));
        k += rewards[i];
        maxp = std::max(maxp, pbar[j]);
        if (rewards[i] > 0) inv += 1.0 / pbar[j];
        x[j] = rewards[i];
      }
      const bool neg = k == 0, all = k == G, mixed = !neg && !all;
      if (est == 3 && !all) {
        const double D = mixed ? std::max(G / inv, 2 * maxp) : 2 * maxp;
        for (int64_t j = 0; j < G; ++j) {
          const double den = D - pbar[j];
          x[j] = x[j] - (1 - x[j]) * (den > 0 ? pbar[j] / den : 0.0) / G;
        }
      }
      double mean = 0, sq = 0;
      for (double v : x) mean += v / G;
      for (double v : x) sq += (v - mean) * (v - mean);
      const double std_g = std::sqrt(sq / (G - 1));
      for (int64_t j = 0; j < G; ++j) {
        double base = x[j] - mean;
        if (est == 2) base = x[j] - (mean * G - x[j]) / (G - 1);
        double ref = (est == 0 || est == 3) ? base / (std_g + 1e-4) : base;
        if (est == 3) ref = neg ? 0.25 * base : (mixed ? ref : 0.0);
        err = worst(err, std::isnan(adv[g * G + j]) ? INFINITY : std::fabs(adv[g * G + j] - ref));
      }
    }
    const char* names[] = {"grpo", "dr_grpo", "rloo", "lens"};
    report(std::string("group_advantages ") + names[est], err, 1e-4);
    for (void* p : {(void*)a.rewards, (void*)a.group, (void*)a.old_logp, (void*)a.old_mask, (void*)a.workspace,
                    (void*)a.advantages, (void*)a.confidence, (void*)a.metrics})
      CHECK_CUDA(cudaFree(p));
  }
}

int main() {
  int dev = 0, major = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  std::printf("device compute capability major %d\n", major);
  const Case cases[] = {
      {2, 5, 1, 0, DType::kFloat32},      {2, 7, 7, 1, DType::kBFloat16},    {3, 9, 1000, 1, DType::kFloat16},
      {2, 6, 4099, 1, DType::kFloat32},   {2, 8, 4099, 0, DType::kBFloat16}, {2, 4, 50001, 1, DType::kBFloat16},
      {1, 6, 151936, 1, DType::kBFloat16}, {1, 4, 151936, 0, DType::kFloat32}, {1, 2, 262144, 0, DType::kFloat16},
  };
  std::vector<RowPath> paths = {RowPath::kStream, RowPath::kSmemRow};
  if (major >= 9) paths.push_back(RowPath::kCluster);
  for (const Case& c : cases) {
    for (RowPath p : paths) {
      const RowPath resolved = fused_loss_path(c.V, c.dtype, p);
      if (resolved != p) continue;  // this V does not fit that variant on this device
      check_case(c, p, false, major);
      check_case(c, p, true, major);
    }
  }
  check_advantages();
  std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
  return g_failures ? 1 : 0;
}
