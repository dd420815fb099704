// The online softmax (SoftmaxState) and the gradient coefficients (GradCoefficients) of common.cuh,
// run on the CPU (exp2f/log2f in place of the MUFU ex2/lg2) the way the kernels drive them: each of
// kThreads "threads" takes every kThreads-th 4-element vector, in fragments of kUnroll vectors, the
// partials are merged in a butterfly, and pass 2 writes dL/dz with the one-hot term added once.
// Checked against a float64 reference on the special values of docs/inputs.md:
// -inf at the start of a fragment, -inf fragments, a row that is -inf but for one entry, a row of
// -inf only, NaN and +inf logits, a target outside [0, V). Built and run by tests/test_cuda_build.py;
// no GPU needed. Exit code 0 only if every check passes.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "common.cuh"

using namespace lens;

static int g_failures = 0;

static void check(const std::string& what, bool ok) {
  if (!ok) ++g_failures;
  std::printf("%-70s %s\n", what.c_str(), ok ? "ok" : "FAIL");
}

struct Result {
  float logp, entropy;
  std::vector<float> grad;
};

// The kernel's arithmetic: kThreads threads over 4-wide fp32 vectors (Vec<float>), kUnroll vectors
// per fragment, then the butterfly merge and pass 2.
static Result run_kernel_math(const std::vector<float>& z, int64_t target, float tau, float g_l, float g_h) {
  constexpr int kThreads = 8;
  const int64_t V = static_cast<int64_t>(z.size());
  const int64_t n_vec = V / 4;
  const float inv_tau = 1.f / tau, scale = row_scale(inv_tau);
  std::vector<SoftmaxState> part(kThreads, SoftmaxState::empty());
  for (int t = 0; t < kThreads; ++t) {
    int64_t k = t;
    for (; k + (kUnroll - 1) * kThreads < n_vec; k += kUnroll * kThreads) {
      Vec<float> v[kUnroll];
      for (int u = 0; u < kUnroll; ++u)
        for (int j = 0; j < 4; ++j) v[u].elem[j] = z[(k + u * kThreads) * 4 + j];
      part[t].add_vectors(v, scale);
    }
    for (; k < n_vec; k += kThreads) {
      Vec<float> v[1];
      for (int j = 0; j < 4; ++j) v[0].elem[j] = z[k * 4 + j];
      part[t].add_vectors(v, scale);
    }
    for (int64_t i = n_vec * 4 + t; i < V; i += kThreads) part[t].add(z[i], scale);  // scalar tail
  }
  for (int off = kThreads / 2; off > 0; off >>= 1) {  // butterfly, as __shfl_xor_sync
    std::vector<SoftmaxState> next = part;
    for (int t = 0; t < kThreads; ++t) next[t].merge(part[t ^ off]);
    part = next;
  }
  const SoftmaxState& s = part[0];
  const bool valid = target_in_row(target, V);
  Result r;
  r.logp = s.log_prob((valid ? z[target] : NAN) * scale);
  r.entropy = s.entropy();
  const GradCoefficients c = GradCoefficients::make(inv_tau, scale, s.log2_sum(), r.entropy,
                                                    std::isnan(r.logp) ? NAN : g_l, g_h);
  r.grad.resize(V);
  for (int64_t v = 0; v < V; ++v) r.grad[v] = c(z[v]);
  if (valid) r.grad[target] = c.at_target(z[target]);
  return r;
}

// float64: log p_t, H = -sum p log p (0 log 0 = 0) and dz = (1/tau)[g_l (onehot - p) - g_h p (log p + H)]
static Result reference(const std::vector<float>& z, int64_t target, double tau, double g_l, double g_h) {
  const int64_t V = static_cast<int64_t>(z.size());
  double m = -INFINITY;
  bool nan = false;
  for (float x : z) {
    if (std::isnan(x) || x == INFINITY) nan = true;
    m = std::max(m, static_cast<double>(x) / tau);
  }
  Result r;
  r.grad.assign(V, NAN);
  if (nan || m == -INFINITY || target < 0 || target >= V) {
    r.logp = r.entropy = NAN;
    if (!nan && m != -INFINITY) {  // a bad target on a finite row: the entropy is still defined
      double l = 0, s = 0;
      for (float x : z) { const double d = x / tau - m; if (d > -INFINITY) { l += std::exp(d); s += std::exp(d) * d; } }
      r.entropy = static_cast<float>(std::log(l) - s / l);
    }
    return r;
  }
  double l = 0;
  for (float x : z) l += std::exp(x / tau - m);
  const double lse = m + std::log(l);
  double H = 0;
  for (float x : z) { const double lp = x / tau - lse; if (lp > -INFINITY) H -= std::exp(lp) * lp; }
  r.logp = static_cast<float>(z[target] / tau - lse);
  r.entropy = static_cast<float>(H);
  for (int64_t v = 0; v < V; ++v) {
    const double lp = z[v] / tau - lse, p = std::exp(lp);
    const double ent = lp > -INFINITY ? p * (lp + H) : 0.0;  // p log p -> 0
    r.grad[v] = static_cast<float>(((v == target ? 1.0 : 0.0) - p) * g_l / tau - g_h * ent / tau);
  }
  return r;
}

static void compare(const std::string& name, const std::vector<float>& z, int64_t target, float tau) {
  const float g_l = 0.7f, g_h = -0.3f;
  const Result got = run_kernel_math(z, target, tau, g_l, g_h);
  const Result want = reference(z, target, tau, g_l, g_h);
  auto same = [](float a, float b, double tol) {
    if (std::isnan(b)) return std::isnan(a);
    if (std::isinf(b)) return a == b;
    return std::isfinite(a) && std::fabs(a - b) <= tol * (1.0 + std::fabs(b));
  };
  check(name + ": log-prob", same(got.logp, want.logp, 2e-5) && !(got.logp > 0.f));
  check(name + ": entropy", same(got.entropy, want.entropy, 2e-5));
  bool grad_ok = true;
  double scale = 1e-30;
  for (float g : want.grad) if (std::isfinite(g)) scale = std::max(scale, std::fabs((double)g));
  for (size_t v = 0; v < z.size(); ++v) {
    const bool ok = std::isnan(want.grad[v]) ? std::isnan(got.grad[v])
                    : z[v] == -INFINITY && v != (size_t)target ? got.grad[v] == 0.f  // exactly 0
                    // fp32 rounds 1 - p at ~1e-7 of g_l / tau whatever the scale of the row
                    : std::fabs(got.grad[v] - want.grad[v]) <= 2e-5 * scale + 5e-7 * (g_l - g_h) / tau;
    if (!ok && grad_ok) std::printf("  first bad gradient at %zu: %g, want %g\n", v, got.grad[v], want.grad[v]);
    grad_ok = grad_ok && ok;
  }
  check(name + ": gradient", grad_ok);
}

int main() {
  std::mt19937 rng(20261201);
  std::normal_distribution<float> normal(0.f, 3.f);
  const int64_t V = 1003;  // 250 vectors and a tail of 3; 8 threads x 4 vectors per fragment
  auto random_row = [&] {
    std::vector<float> z(V);
    for (float& x : z) x = normal(rng);
    return z;
  };
  compare("finite row", random_row(), 17, 0.7f);
  {
    auto z = random_row();
    z[500] = 40.f;  // one dominant logit: log p ~ 0 must stay <= 0
    compare("dominant target", z, 500, 1.f);
  }
  {
    auto z = random_row();
    for (int t = 0; t < 8; ++t) z[t * 4] = -INFINITY;  // the first element of every thread
    compare("-inf first element of each thread", z, 5, 1.f);
  }
  {
    auto z = random_row();
    for (int64_t i = 0; i < 8 * 4 * 4; ++i) z[i] = -INFINITY;  // every thread's first fragment
    for (int64_t i = 600; i < 800; ++i) z[i] = -INFINITY;      // and a block in the middle
    compare("-inf fragments", z, 900, 1.3f);
    compare("-inf target", z, 3, 1.3f);  // log p = -inf
  }
  {
    std::vector<float> z(V, -INFINITY);
    z[999] = 2.f;  // a one-hot row, in the scalar tail
    compare("all -inf but one", z, 999, 1.f);
    z[999] = -INFINITY;
    compare("all -inf", z, 999, 1.f);
  }
  {
    auto z = random_row();
    z[321] = NAN;
    compare("NaN logit", z, 7, 1.f);
    z[321] = INFINITY;
    compare("+inf logit", z, 7, 1.f);
  }
  compare("target outside [0, V)", random_row(), V, 1.f);
  compare("target -100", random_row(), -100, 1.f);
  std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
  return g_failures ? 1 : 0;
}
