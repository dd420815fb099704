"""The ``cuda`` backend: C++/CUDA kernels of the optional extension ``lens_kernels._C`` (csrc/).

The import never fails without the extension: ``HAS_CUDA_EXT`` says whether it was built, and asking
for the backend explains what is missing. The ops have the signatures of ``torch_backend``:

- ``token_logprobs``: one read of the logits forward (log-prob, entropy, lse), one read and one
  write backward (in place with ``inplace_grad``).
- ``policy_loss_from_logits``: for token-level ratios, the 2-pass fused kernel writes dL/dlogits in
  forward; the loss value and metrics come from the kernel's log-probs through
  ``torch_backend.policy_loss`` (a few [B, T] ops, the same formulas). Grad-scale contract (SPEC 5): the
  gradient assumes the upstream ``grad_scale``; backward multiplies it by grad_output / grad_scale on
  the device, a kernel whose rows leave at once when that ratio is 1 (no extra pass, no host sync;
  as ``backends/torch/policy_loss.upstream_correction`` does on GPU, no warning). Sequence-level ratios (GSPO) take the
  3-pass path: ``token_logprobs`` then ``policy_loss``.
- ``group_advantages``: the whole batch in one launch, same contract as ``lk.group_advantages``.
- ``token_logprobs_with_sequence_sums``: log-probs, entropy and per-sequence sums in one launch.

fp16/bf16/fp32 only (``DTYPES``): ``backend="auto"`` sends fp64 to ``torch``.

The kernels are torch ops (``torch.ops.lens_kernels.*``) with fake implementations, so that
``torch.compile`` traces through them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import LossConfig
from . import torch as torch_backend

DEVICES = ("cuda",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:  # built by setup.py only when a CUDA toolkit and a CUDA build of torch are present
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.lens_kernels)

    HAS_CUDA_EXT = True
    _IMPORT_ERROR = None
except ImportError as exc:  # the pure-Python install
    HAS_CUDA_EXT = False
    _IMPORT_ERROR = str(exc)

# Row-kernel variants of the fused loss (csrc/lens_kernels.h RowPath): -1 lets the launcher choose.
PATHS = {"auto": -1, "stream": 0, "smem_row": 1, "cluster": 2}
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_POLICY_CODES = {"ppo": 0, "cispo": 1, "sapo": 2}
_KL_CODES = {"k1": 0, "k2": 1, "k3": 2}
_ESTIMATOR_CODES = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "lens": 3}
_SCALE_CODES = {"group": 0, "batch": 1, "none": 2}
_LENS_GROUP_CODES = {"all": 0, "negative": 1, "mixed": 2}
# Metric sums of the advantage kernel (csrc/group_advantages.cu AdvMetric), in order.
_ADV_METRIC_SLOTS = ("groups", "neg", "mixed", "all", "zero_std", "abs_neg", "cnt_neg", "abs_mixed", "cnt_mixed",
                     "abs_all", "cnt_all", "conf_wrong", "cnt_wrong", "conf_right", "cnt_right")


def unavailable_reason() -> Optional[str]:
    if not HAS_CUDA_EXT:
        return ("the CUDA extension lens_kernels._C is not built (" + str(_IMPORT_ERROR) + "); build it with a CUDA "
                "toolkit (CUDA_HOME or nvcc on PATH) and a CUDA build of torch: LENS_KERNELS_BUILD_CUDA=1 "
                "pip install --no-build-isolation .")
    return None


def _ops():
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"backend 'cuda' is not available: {reason}")
    return torch.ops.lens_kernels


if HAS_CUDA_EXT:  # shapes of the outputs, for torch.compile and meta tensors
    def _rows(logits):
        return logits.numel() // logits.shape[-1] if logits.shape[-1] else 0

    @torch.library.register_fake("lens_kernels::token_logprobs_fwd")
    def _(logits, targets, mask, tau_rows, tau, seq_sums):
        n = _rows(logits)
        n_seq = (logits.shape[0] if logits.dim() == 3 else n) if seq_sums else 0
        vec = logits.new_empty((n,), dtype=torch.float32)
        return vec, torch.empty_like(vec), torch.empty_like(vec), logits.new_empty((n_seq,), dtype=torch.float32)

    @torch.library.register_fake("lens_kernels::token_logprobs_bwd")
    def _(logits, targets, mask, tau_rows, tau, lse, entropy, g_logp, g_entropy):
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    @torch.library.register_fake("lens_kernels::token_logprobs_bwd_")
    def _(logits, targets, mask, tau_rows, tau, lse, entropy, g_logp, g_entropy):
        return None

    @torch.library.register_fake("lens_kernels::fused_policy_loss")
    def _(logits, targets, mask, tau_rows, tau, advantages, loss_weight, entropy_weight, old_logp, ref_logp,
          is_weights, params, path):
        vec = logits.new_empty((_rows(logits),), dtype=torch.float32)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        return grad, vec, torch.empty_like(vec), torch.empty_like(vec)

    @torch.library.register_fake("lens_kernels::fused_policy_loss_")
    def _(logits, targets, mask, tau_rows, tau, advantages, loss_weight, entropy_weight, old_logp, ref_logp,
          is_weights, params, path):
        vec = logits.new_empty((_rows(logits),), dtype=torch.float32)
        return vec, torch.empty_like(vec), torch.empty_like(vec)

    @torch.library.register_fake("lens_kernels::rescale_grad_")
    def _(grad, ratio):
        return None

    @torch.library.register_fake("lens_kernels::group_advantages")
    def _(rewards, group, correct, old_logp, old_mask, estimator, scale, lens_groups, lens_d_sequence,
          std_unbiased, eps, lens_alpha):
        n = rewards.numel()
        return (torch.empty_like(rewards), rewards.new_empty((n if estimator == 3 else 0,)),
                rewards.new_empty((16,)))


# ---------------------------------------------------------------------------------------------
# Per-row inputs in the form the kernels take: flat, contiguous, fp32 / int64 / bool.
# ---------------------------------------------------------------------------------------------
def _flat(x: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if x is None else x.reshape(-1).to(dtype).contiguous()


def _row_inputs(targets, mask, temperature):
    """(targets int64 [N], keep bool [N] or None, tau_rows fp32 [N] or None, tau float)."""
    t = _flat(targets, torch.long)
    keep = _flat(mask, torch.bool)
    if torch.is_tensor(temperature):
        tau_rows = temperature.to(device=targets.device, dtype=torch.float32).expand(targets.shape)
        return t, keep, tau_rows.reshape(-1).contiguous(), 1.0
    return t, keep, None, float(temperature)


def _per_token(x: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
    """[B] or [B, T] -> contiguous fp32 [B * T]."""
    return None if x is None else torch_backend.per_token(x, shape, torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------
class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, temperature, inplace_grad):
        t, keep, tau_rows, tau = _row_inputs(targets, mask, temperature)
        logp, entropy, lse, _ = _ops().token_logprobs_fwd(logits, t, keep, tau_rows, tau, False)
        ctx.save_for_backward(logits, t, keep, tau_rows, lse, entropy)
        ctx.tau = tau
        ctx.inplace_grad = inplace_grad
        ctx.set_materialize_grads(False)
        lead = targets.shape
        return logp.view(lead), entropy.view(lead)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, t, keep, tau_rows, lse, entropy = ctx.saved_tensors
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None
        g_l = torch.zeros_like(lse) if g_logp is None else _flat(g_logp, torch.float32)
        g_h = _flat(g_entropy, torch.float32)
        args = (t, keep, tau_rows, ctx.tau, lse, entropy, g_l, g_h)
        if ctx.inplace_grad:
            _ops().token_logprobs_bwd_(logits, *args)
            # the logits buffer now holds dL/dlogits: an op that saved it for its own backward must
            # raise autograd's "modified by an inplace operation" error, not use the gradient
            torch.autograd.graph.increment_version(logits)
            grad = logits.detach()  # not the input itself: autograd may keep this buffer as .grad
        else:
            grad = _ops().token_logprobs_bwd(logits, *args)
        return grad, None, None, None, None


def token_logprobs(logits, targets, mask=None, temperature=1.0, return_entropy=False, inplace_grad=False):
    logp, entropy = TokenLogprobsFunction.apply(logits, targets, mask, temperature, inplace_grad)
    return logp, (entropy if return_entropy else None)


def token_logprobs_with_sequence_sums(logits, targets, mask=None, temperature=1.0):
    """No-grad log-probs, entropy and per-sequence sums of the kept log-probs in one launch (old and
    reference policy passes, LENS confidence). logits [B, T, V]; returns ([B, T], [B, T], [B])."""
    t, keep, tau_rows, tau = _row_inputs(targets, mask, temperature)
    logp, entropy, _, seq_sum = _ops().token_logprobs_fwd(logits, t, keep, tau_rows, tau, True)
    return logp.view(targets.shape), entropy.view(targets.shape), seq_sum


# ---------------------------------------------------------------------------------------------
# policy_loss_from_logits: the 2-pass fused kernel for token-level ratios
# ---------------------------------------------------------------------------------------------
def _loss_params(cfg: LossConfig, grad_scale: float) -> list:
    off = lambda v: -1.0 if v is None else float(v)  # noqa: E731  (<= 0 turns a bound off)
    return [float(_POLICY_CODES[cfg.policy_loss]), float(cfg.epsilon_low), float(cfg.eps_high), off(cfg.delta),
            off(cfg.dual_clip), float(cfg.cispo_ratio_cap), float(cfg.sapo_temperature_pos),
            float(cfg.sapo_temperature_neg), off(cfg.log_ratio_clamp), float(cfg.beta),
            float(_KL_CODES[cfg.kl_estimator]), off(cfg.kl_clamp), float(grad_scale)]


class FusedPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, advantages, old_logps, ref_logps, is_weights, temperature, cfg,
                num_tokens, num_sequences, grad_scale, inplace, path):
        keep = mask.to(torch.bool)
        mask_f = keep.to(torch.float32)
        agg = dict(num_tokens=num_tokens, num_sequences=num_sequences, norm_length=cfg.loss_norm_length,
                   dp_size=cfg.dp_size)
        w = torch_backend.aggregation_weights(mask_f, cfg.loss_agg_mode, **agg)
        entropy_weight = None
        if cfg.entropy_coef != 0.0:
            w_h = w if cfg.entropy_agg_mode in (None, cfg.loss_agg_mode) else torch_backend.aggregation_weights(
                mask_f, cfg.entropy_agg_mode, **agg)
            entropy_weight = _flat(-cfg.entropy_coef * w_h, torch.float32)
        t, keep_flat, tau_rows, tau = _row_inputs(targets, mask, temperature)
        args = (t, keep_flat, tau_rows, tau, _per_token(advantages, mask.shape), _flat(w, torch.float32),
                entropy_weight, _flat(old_logps, torch.float32), _flat(ref_logps, torch.float32),
                _per_token(is_weights, mask.shape),
                _loss_params(cfg, grad_scale), PATHS[path])
        if inplace:
            logp, entropy, _ = _ops().fused_policy_loss_(logits, *args)
            torch.autograd.graph.increment_version(logits)  # see TokenLogprobsFunction.backward
            grad = logits.detach()
        else:
            grad, logp, entropy, _ = _ops().fused_policy_loss(logits, *args)
        # the loss value and metrics: torch's formulas on the kernel's [B, T] log-probs and entropy
        loss, metrics = torch_backend.policy_loss(logp.view(targets.shape), advantages, mask, old_logps, ref_logps,
                                              entropy.view(targets.shape), is_weights, cfg, num_tokens,
                                              num_sequences)
        ctx.grad = grad  # not saved_tensors: it may be the logits buffer, overwritten on purpose
        ctx.grad_scale = grad_scale
        ctx.inplace = inplace
        ctx.used = False
        metrics = torch.stack([metrics[name] for name in torch_backend.METRIC_NAMES])
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        none = (None,) * 13
        if grad_loss is None:
            return (None,) + none
        if ctx.used:
            raise RuntimeError("the fused cuda policy loss computes its gradient once, in forward; it cannot be "
                               "backpropagated twice (retain_graph); recompute the loss instead")
        ctx.used = True
        grad, ctx.grad = ctx.grad, None
        # dL/dz was written for an upstream gradient of grad_scale: rescale on the device, where
        # the ratio is read; rows leave at once when it is 1
        ratio = (grad_loss.detach().to(torch.float32) / ctx.grad_scale).reshape(1)
        _ops().rescale_grad_(grad, ratio)
        if ctx.inplace:
            torch.autograd.graph.increment_version(grad)  # the logits buffer, written once more
        return (grad,) + none


def policy_loss_from_logits(logits, targets, mask, advantages, old_logps=None, ref_logps=None, is_weights=None,
                            temperature=1.0, config: LossConfig = LossConfig(), num_tokens=None,
                            num_sequences=None, grad_scale=1.0, inplace=False, path="auto"):
    needs_fused_grad = logits.requires_grad and torch.is_grad_enabled()
    if config.needs_sequence_stats or not needs_fused_grad:
        # 3-pass design (SPEC 5): a token's loss depends on its whole sequence (GSPO), or no gradient
        logps, entropy = token_logprobs(logits, targets, mask, temperature, True, inplace)
        return torch_backend.policy_loss(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config,
                                     num_tokens, num_sequences)
    if path not in PATHS:
        raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}")
    loss, metrics = FusedPolicyLossFunction.apply(logits, targets, mask, advantages, old_logps, ref_logps,
                                                  is_weights, temperature, config, num_tokens, num_sequences,
                                                  float(grad_scale), inplace, path)
    return loss, dict(zip(torch_backend.METRIC_NAMES, metrics.unbind(0)))


_PATH_NAMES = {v: k for k, v in PATHS.items()}


def _plan(values) -> dict:
    path, cluster_size, segment, smem_bytes = values
    return {"path": _PATH_NAMES[path], "cluster_size": cluster_size, "segment": segment, "smem_bytes": smem_bytes}


def fused_loss_path(vocab: int, dtype: torch.dtype, path: str = "auto") -> str:
    """The kernel variant the fused loss runs for rows of ``vocab`` ``dtype`` logits on the current
    device: "stream", "smem_row" or "cluster"."""
    return fused_loss_plan(vocab, dtype, path)["path"]


def fused_loss_plan(vocab: int, dtype: torch.dtype, path: str = "auto", rows: int = 1) -> dict:
    """What the fused loss launches for ``rows`` rows of ``vocab`` ``dtype`` logits on the current
    device, computed by the launcher's own function (occupancy fallback included): {"path",
    "cluster_size" (CTAs per row, 1 off the cluster path), "segment" (row elements per CTA),
    "smem_bytes" (dynamic shared memory per CTA)}."""
    return _plan(_ops().fused_loss_plan(int(rows), int(vocab), _DTYPE_CODES[dtype], PATHS[path], 0))


def last_fused_loss_launch() -> Optional[dict]:
    """The plan of the last fused-loss launch on this thread (as ``fused_loss_plan``), or None."""
    values = _ops().fused_loss_last_launch()
    return None if values[0] == PATHS["auto"] else _plan(values)


# ---------------------------------------------------------------------------------------------
# group_advantages: one launch for the whole batch
# ---------------------------------------------------------------------------------------------
def group_advantages(rewards, *, group_size=None, group_ids=None, estimator="grpo", old_logps=None, mask=None,
                     correct=None, scale=None, eps=1e-4, std_unbiased=True, lens_alpha=0.25,
                     lens_d_estimate="mean", lens_groups="all", nan_rewards="raise"):
    """``lk.group_advantages`` on CUDA tensors, in one kernel launch (fp32). Same arguments, checks and
    returns; fp64 rewards take the torch path to keep fp64."""
    from .. import advantages as adv_mod

    adv_mod._validate(rewards, group_size, group_ids, estimator, old_logps, mask, correct, scale, eps, lens_alpha,
                      lens_d_estimate, lens_groups, nan_rewards)
    if estimator not in _ESTIMATOR_CODES:
        raise ValueError(f"estimator={estimator!r} has no CUDA kernel (this kernel computes "
                         f"{sorted(_ESTIMATOR_CODES)}); use lens_kernels.group_advantages, which runs it on any device")
    if rewards.dtype == torch.float64:
        with torch.no_grad():
            return adv_mod._group_advantages(rewards, group_size, group_ids, estimator, old_logps, mask, correct,
                                             scale, eps, std_unbiased, lens_alpha, lens_d_estimate, lens_groups)
    if scale is None:
        scale = "group" if estimator in ("grpo", "lens") else "none"
    n = rewards.shape[0]
    with torch.no_grad():
        gidx = adv_mod.dense_group_index(n, group_size, group_ids, rewards.device)
        lens = estimator == "lens"
        adv, confidence, sums = _ops().group_advantages(
            _flat(rewards, torch.float32), gidx.contiguous(), _flat(correct, torch.bool),
            old_logps.to(torch.float32).contiguous() if lens else None,
            mask.to(torch.bool).contiguous() if (lens and mask is not None) else None,
            _ESTIMATOR_CODES[estimator], _SCALE_CODES[scale], _LENS_GROUP_CODES[lens_groups],
            lens_d_estimate == "sequence", bool(std_unbiased), float(eps), float(lens_alpha))
    s = dict(zip(_ADV_METRIC_SLOTS, sums.unbind(0)))
    groups = s["groups"].clamp(min=1.0)
    metrics = {}
    if lens:
        metrics["mean_confidence_wrong"] = s["conf_wrong"] / s["cnt_wrong"].clamp(min=1.0)
        metrics["mean_confidence_right"] = s["conf_right"] / s["cnt_right"].clamp(min=1.0)
        metrics["confidence"] = confidence
    metrics["frac_negative_groups"] = s["neg"] / groups
    metrics["frac_mixed_groups"] = s["mixed"] / groups
    metrics["frac_all_correct_groups"] = s["all"] / groups
    metrics["frac_zero_std_groups"] = s["zero_std"] / groups
    for name, key in (("negative", "neg"), ("mixed", "mixed"), ("all_correct", "all")):
        metrics[f"mean_abs_adv_{name}"] = s[f"abs_{key}"] / s[f"cnt_{key}"].clamp(min=1.0)
    return adv, metrics
