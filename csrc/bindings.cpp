// Torch bindings of the CUDA kernels: ops in the ``lens_kernels`` namespace, registered with
// TORCH_LIBRARY so that torch.compile sees them (their fake implementations are registered in
// lens_kernels/backends/cuda.py). Kept apart from the .cu files, which stay torch-free and compile
// in seconds, while anything including torch takes minutes.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "lens_kernels.h"

namespace {

using at::Tensor;
using c10::optional;

lens::DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return lens::DType::kFloat32;
    case at::kHalf: return lens::DType::kFloat16;
    case at::kBFloat16: return lens::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16 for the cuda backend, got ",
                       t.scalar_type());
  }
}

// [B, T, V] or [N, V] with stride 1 on V.
lens::RowLayout row_layout(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, name, " must be [B, T, V] or [N, V], got ", t.sizes());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have stride 1 along V, got strides ",
              t.strides());
  if (t.dim() == 3) return lens::RowLayout{std::max<int64_t>(1, t.size(1)), t.stride(0), t.stride(1)};
  return lens::RowLayout{1, t.stride(0), 0};
}

// Rows of a [B, T, V] or [N, V] view: the product of the leading dimensions (0 for empty work).
int64_t num_rows(const Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got device ", t.device());
}

// Per-row vectors: contiguous, on the logits' device, [rows], of one dtype.
void check_rows(const Tensor& t, const char* name, int64_t rows, at::ScalarType dtype, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() == rows, name, " must be contiguous with ", rows,
              " elements (one per row), got shape ", t.sizes());
}

template <typename Ptr>
Ptr* opt_ptr(const optional<Tensor>& t, const char* name, int64_t rows, at::ScalarType dtype, const Tensor& like) {
  if (!t.has_value()) return nullptr;
  check_rows(*t, name, rows, dtype, like);
  return t->data_ptr<Ptr>();
}

// Test hook (lens::kDebugNoClusterOccupancy): set by set_debug_flags, read by every fused-loss
// launch of this thread.
thread_local int64_t g_debug_flags = 0;

void throw_if_failed(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "lens_kernels cuda op ", op, " failed: ", cudaGetErrorString(err));
}

// Inputs common to every row op: logits, targets, mask, temperature.
struct RowInputs {
  int64_t rows;
  int64_t vocab;
  lens::RowLayout layout;
  lens::DType dtype;
  const int64_t* targets;
  const bool* mask;
  const float* tau_rows;
};

RowInputs row_inputs(const Tensor& logits, const Tensor& targets, const optional<Tensor>& mask,
                     const optional<Tensor>& tau_rows) {
  check_cuda(logits, "logits");
  RowInputs in;
  in.layout = row_layout(logits, "logits");
  in.dtype = to_dtype(logits, "logits");
  in.rows = num_rows(logits);
  in.vocab = logits.size(-1);
  TORCH_CHECK(in.vocab >= 1 || in.rows == 0, "logits must have at least one entry along V (the last dimension), "
              "got shape ", logits.sizes());
  check_rows(targets, "targets", in.rows, at::kLong, logits);
  in.targets = targets.data_ptr<int64_t>();
  in.mask = opt_ptr<bool>(mask, "mask", in.rows, at::kBool, logits);
  in.tau_rows = opt_ptr<float>(tau_rows, "tau_rows", in.rows, at::kFloat, logits);
  return in;
}

// The fields every row op's arguments share.
template <typename Args>
void set_row_inputs(Args& a, const Tensor& logits, const RowInputs& in, double tau) {
  a.logits = logits.data_ptr();
  a.targets = in.targets;
  a.mask = in.mask;
  a.tau_rows = in.tau_rows;
  a.tau = static_cast<float>(tau);
  a.rows = in.rows;
  a.vocab = in.vocab;
  a.layout = in.layout;
  a.dtype = in.dtype;
}

// dL/dlogits laid out like the logits: same strides and the same 16-byte alignment of every row, so
// that pass 2 stores 16 bytes at a time whatever the input's row alignment (a logits[:, :-1] view
// with odd V, an offset view). A dense input gets a dense gradient; a view with gaps between rows
// (e.g. [B, T + 1, V] sliced to T) costs the gaps, up to a quarter more memory, else the gradient is
// contiguous (scalar stores on misaligned rows, still correct).
Tensor grad_like(const Tensor& logits) {
  const int64_t vec = 16 / static_cast<int64_t>(logits.element_size());
  const int64_t lead = logits.storage_offset() % vec;
  if (logits.numel() == 0 || (logits.is_contiguous() && lead == 0)) return at::empty(logits.sizes(), logits.options());
  // rows in order and apart: stride 1 on V, each outer stride at least the extent of what it spans
  bool ordered = logits.stride(-1) == 1 || logits.size(-1) <= 1;
  int64_t span = logits.size(-1), extent = 1;
  for (int64_t d = logits.dim() - 2; d >= 0 && ordered; --d) {
    ordered = logits.size(d) <= 1 || logits.stride(d) >= span;
    span = std::max(span, logits.stride(d) * logits.size(d));
  }
  for (int64_t d = 0; d < logits.dim(); ++d) extent += (logits.size(d) - 1) * logits.stride(d);
  if (!ordered || extent > logits.numel() + logits.numel() / 4 + vec)
    return at::empty(logits.sizes(), logits.options());
  return at::empty({extent + lead}, logits.options()).as_strided(logits.sizes(), logits.strides(), lead);
}

// In place, the gradient is written over the logits: a buffer whose elements alias each other (an
// expanded, stride-0 view) would receive several rows' gradients at once.
void check_writable(const Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              " cannot be overwritten in place: its elements overlap (an expanded or stride-0 view), got strides ",
              t.strides(), "; pass a contiguous tensor or use the out-of-place op");
}

Tensor per_row(const Tensor& logits, int64_t rows) {
  return at::empty({rows}, logits.options().dtype(at::kFloat));
}

// ---------------------------------------------------------------------------------------------
// token_logprobs
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> token_logprobs_fwd(const Tensor& logits, const Tensor& targets,
                                                      const optional<Tensor>& mask, const optional<Tensor>& tau_rows,
                                                      double tau) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowInputs in = row_inputs(logits, targets, mask, tau_rows);
  Tensor logp = per_row(logits, in.rows), entropy = per_row(logits, in.rows), lse = per_row(logits, in.rows);
  lens::LogprobFwdArgs a{};
  set_row_inputs(a, logits, in, tau);
  a.logp = logp.data_ptr<float>();
  a.entropy = entropy.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  throw_if_failed(lens::launch_token_logprobs_fwd(a, c10::cuda::getCurrentCUDAStream()), "token_logprobs_fwd");
  return {logp, entropy, lse};
}

void run_token_logprobs_bwd(const Tensor& logits, const Tensor& targets, const optional<Tensor>& mask,
                            const optional<Tensor>& tau_rows, double tau, const Tensor& lse, const Tensor& entropy,
                            const Tensor& g_logp, const optional<Tensor>& g_entropy, const Tensor& grad) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowInputs in = row_inputs(logits, targets, mask, tau_rows);
  check_rows(lse, "lse", in.rows, at::kFloat, logits);
  check_rows(entropy, "entropy", in.rows, at::kFloat, logits);
  check_rows(g_logp, "g_logp", in.rows, at::kFloat, logits);
  lens::LogprobBwdArgs a{};
  set_row_inputs(a, logits, in, tau);
  a.lse = lse.data_ptr<float>();
  a.entropy = entropy.data_ptr<float>();
  a.g_logp = g_logp.data_ptr<float>();
  a.g_entropy = opt_ptr<float>(g_entropy, "g_entropy", in.rows, at::kFloat, logits);
  a.grad = grad.data_ptr();
  a.grad_layout = row_layout(grad, "grad");
  throw_if_failed(lens::launch_token_logprobs_bwd(a, c10::cuda::getCurrentCUDAStream()), "token_logprobs_bwd");
}

Tensor token_logprobs_bwd(const Tensor& logits, const Tensor& targets, const optional<Tensor>& mask,
                          const optional<Tensor>& tau_rows, double tau, const Tensor& lse, const Tensor& entropy,
                          const Tensor& g_logp, const optional<Tensor>& g_entropy) {
  Tensor grad = grad_like(logits);
  run_token_logprobs_bwd(logits, targets, mask, tau_rows, tau, lse, entropy, g_logp, g_entropy, grad);
  return grad;
}

void token_logprobs_bwd_(const Tensor& logits, const Tensor& targets, const optional<Tensor>& mask,
                         const optional<Tensor>& tau_rows, double tau, const Tensor& lse, const Tensor& entropy,
                         const Tensor& g_logp, const optional<Tensor>& g_entropy) {
  check_writable(logits, "logits");
  run_token_logprobs_bwd(logits, targets, mask, tau_rows, tau, lse, entropy, g_logp, g_entropy, logits);
}

// ---------------------------------------------------------------------------------------------
// fused policy loss
// ---------------------------------------------------------------------------------------------
lens::LossParams loss_params(c10::ArrayRef<double> p) {
  TORCH_CHECK(p.size() == lens::kNumLossParams, "params must hold ", lens::kNumLossParams,
              " numbers [policy_loss, epsilon_low, epsilon_high, delta, dual_clip, cispo_ratio_cap, "
              "sapo_temperature_pos, sapo_temperature_neg, log_ratio_clamp, beta, kl_estimator, kl_clamp, "
              "grad_scale], got ", p.size());
  const lens::LossParams q = lens::loss_params_from_array(p.data());
  TORCH_CHECK(static_cast<int>(q.policy_loss) >= 0 && static_cast<int>(q.policy_loss) <= 2,
              "params[0] (policy_loss) must be 0 (ppo), 1 (cispo) or 2 (sapo), got ", p[0]);
  TORCH_CHECK(static_cast<int>(q.kl_estimator) >= 0 && static_cast<int>(q.kl_estimator) <= 2,
              "params[10] (kl_estimator) must be 0 (k1), 1 (k2) or 2 (k3), got ", p[10]);
  return q;
}

void run_fused_policy_loss(const Tensor& logits, const Tensor& targets, const optional<Tensor>& mask,
                           const optional<Tensor>& tau_rows, double tau, const Tensor& advantages,
                           const Tensor& loss_weight, const optional<Tensor>& entropy_weight,
                           const optional<Tensor>& old_logp, const optional<Tensor>& ref_logp,
                           const optional<Tensor>& is_weights, c10::ArrayRef<double> params, int64_t path,
                           const Tensor& grad, const Tensor& logp, const Tensor& entropy, const Tensor& g_logp) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowInputs in = row_inputs(logits, targets, mask, tau_rows);
  lens::FusedLossArgs a{};
  set_row_inputs(a, logits, in, tau);
  check_rows(advantages, "advantages", in.rows, at::kFloat, logits);
  check_rows(loss_weight, "loss_weight", in.rows, at::kFloat, logits);
  a.advantages = advantages.data_ptr<float>();
  a.loss_weight = loss_weight.data_ptr<float>();
  a.entropy_weight = opt_ptr<float>(entropy_weight, "entropy_weight", in.rows, at::kFloat, logits);
  a.old_logp = opt_ptr<float>(old_logp, "old_logp", in.rows, at::kFloat, logits);
  a.ref_logp = opt_ptr<float>(ref_logp, "ref_logp", in.rows, at::kFloat, logits);
  a.is_weights = opt_ptr<float>(is_weights, "is_weights", in.rows, at::kFloat, logits);
  a.params = loss_params(params);
  TORCH_CHECK(a.params.beta == 0.f || a.ref_logp != nullptr, "ref_logp is required when beta != 0 (the KL term)");
  TORCH_CHECK(path >= -1 && path <= 2, "path must be -1 (auto), 0 (stream), 1 (smem row) or 2 (cluster), got ", path);
  a.path = static_cast<lens::RowPath>(path);
  a.debug_flags = g_debug_flags;
  a.grad = grad.data_ptr();
  a.grad_layout = row_layout(grad, "grad");
  a.logp = logp.data_ptr<float>();
  a.entropy = entropy.data_ptr<float>();
  a.g_logp = g_logp.data_ptr<float>();
  throw_if_failed(lens::launch_fused_policy_loss(a, c10::cuda::getCurrentCUDAStream()), "fused_policy_loss");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_policy_loss(
    const Tensor& logits, const Tensor& targets, const optional<Tensor>& mask, const optional<Tensor>& tau_rows,
    double tau, const Tensor& advantages, const Tensor& loss_weight, const optional<Tensor>& entropy_weight,
    const optional<Tensor>& old_logp, const optional<Tensor>& ref_logp, const optional<Tensor>& is_weights,
    c10::ArrayRef<double> params, int64_t path) {
  const int64_t rows = num_rows(logits);
  Tensor grad = grad_like(logits);
  Tensor logp = per_row(logits, rows), entropy = per_row(logits, rows), g_logp = per_row(logits, rows);
  run_fused_policy_loss(logits, targets, mask, tau_rows, tau, advantages, loss_weight, entropy_weight, old_logp,
                        ref_logp, is_weights, params, path, grad, logp, entropy, g_logp);
  return {grad, logp, entropy, g_logp};
}

std::tuple<Tensor, Tensor, Tensor> fused_policy_loss_(
    const Tensor& logits, const Tensor& targets, const optional<Tensor>& mask, const optional<Tensor>& tau_rows,
    double tau, const Tensor& advantages, const Tensor& loss_weight, const optional<Tensor>& entropy_weight,
    const optional<Tensor>& old_logp, const optional<Tensor>& ref_logp, const optional<Tensor>& is_weights,
    c10::ArrayRef<double> params, int64_t path) {
  check_writable(logits, "logits");
  const int64_t rows = num_rows(logits);
  Tensor logp = per_row(logits, rows), entropy = per_row(logits, rows), g_logp = per_row(logits, rows);
  run_fused_policy_loss(logits, targets, mask, tau_rows, tau, advantages, loss_weight, entropy_weight, old_logp,
                        ref_logp, is_weights, params, path, logits, logp, entropy, g_logp);
  return {logp, entropy, g_logp};
}

void rescale_grad_(const Tensor& grad, const Tensor& ratio) {
  check_cuda(grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  check_rows(ratio, "ratio", 1, at::kFloat, grad);
  lens::RescaleArgs a{};
  a.grad = grad.data_ptr();
  a.layout = row_layout(grad, "grad");
  a.ratio = ratio.data_ptr<float>();
  a.rows = num_rows(grad);
  a.vocab = grad.size(-1);
  a.dtype = to_dtype(grad, "grad");
  throw_if_failed(lens::launch_rescale_grad(a, c10::cuda::getCurrentCUDAStream()), "rescale_grad_");
}

int64_t fused_loss_path(int64_t vocab, int64_t dtype, int64_t requested) {
  return static_cast<int64_t>(
      lens::fused_loss_path(vocab, static_cast<lens::DType>(dtype), static_cast<lens::RowPath>(requested)));
}

std::vector<int64_t> plan_list(const lens::FusedLossPlan& p) {
  return {static_cast<int64_t>(p.path), p.cluster_size, p.segment, p.smem_bytes};
}

// [path, cluster_size, segment, smem_bytes] the fused loss launches for this shape on the current
// device (the same function the launcher calls, occupancy fallback included).
std::vector<int64_t> fused_loss_plan(int64_t rows, int64_t vocab, int64_t dtype, int64_t requested, int64_t flags) {
  return plan_list(lens::fused_loss_plan(rows, vocab, static_cast<lens::DType>(dtype),
                                         static_cast<lens::RowPath>(requested), static_cast<unsigned int>(flags)));
}

// The plan of this thread's last fused-loss launch ([-1, 0, 0, 0] before any).
std::vector<int64_t> fused_loss_last_launch() { return plan_list(lens::fused_loss_last_launch()); }

void set_debug_flags(int64_t flags) { g_debug_flags = flags; }

}  // namespace

TORCH_LIBRARY(lens_kernels_cuda, m) {
  m.def("token_logprobs_fwd(Tensor logits, Tensor targets, Tensor? mask, Tensor? tau_rows, float tau) "
        "-> (Tensor logp, Tensor entropy, Tensor lse)");
  m.def("token_logprobs_bwd(Tensor logits, Tensor targets, Tensor? mask, Tensor? tau_rows, float tau, "
        "Tensor lse, Tensor entropy, Tensor g_logp, Tensor? g_entropy) -> Tensor");
  m.def("token_logprobs_bwd_(Tensor(a!) logits, Tensor targets, Tensor? mask, Tensor? tau_rows, float tau, "
        "Tensor lse, Tensor entropy, Tensor g_logp, Tensor? g_entropy) -> ()");
  m.def("fused_policy_loss(Tensor logits, Tensor targets, Tensor? mask, Tensor? tau_rows, float tau, "
        "Tensor advantages, Tensor loss_weight, Tensor? entropy_weight, Tensor? old_logp, Tensor? ref_logp, "
        "Tensor? is_weights, float[] params, int path) -> (Tensor grad, Tensor logp, Tensor entropy, Tensor g_logp)");
  m.def("fused_policy_loss_(Tensor(a!) logits, Tensor targets, Tensor? mask, Tensor? tau_rows, float tau, "
        "Tensor advantages, Tensor loss_weight, Tensor? entropy_weight, Tensor? old_logp, Tensor? ref_logp, "
        "Tensor? is_weights, float[] params, int path) -> (Tensor logp, Tensor entropy, Tensor g_logp)");
  m.def("rescale_grad_(Tensor(a!) grad, Tensor ratio) -> ()");
  m.def("fused_loss_path(int vocab, int dtype, int requested) -> int", &fused_loss_path);
  m.def("fused_loss_plan(int rows, int vocab, int dtype, int requested, int flags) -> int[]", &fused_loss_plan);
  m.def("fused_loss_last_launch() -> int[]", &fused_loss_last_launch);
  m.def("set_debug_flags(int flags) -> ()", &set_debug_flags);
}

TORCH_LIBRARY_IMPL(lens_kernels_cuda, CUDA, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd);
  m.impl("token_logprobs_bwd_", &token_logprobs_bwd_);
  m.impl("fused_policy_loss", &fused_policy_loss);
  m.impl("fused_policy_loss_", &fused_policy_loss_);
  m.impl("rescale_grad_", &rescale_grad_);
}

// An importable module: ``import lens_kernels._C`` loads the library and so registers the ops.
static struct PyModuleDef lens_kernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lens_kernels_module); }
