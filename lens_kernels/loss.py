"""The policy-loss ops: from log-probs, from logits (fused), from hidden states (fused), each with its
one autograd here and its launchers per backend (``backends/_launchers.py``).

- ``policy_loss`` (from log-probs): ``PolicyLoss``; the closed-form coefficients dL/dl and dL/dH are
  computed in forward (``backends/torch/policy_loss.loss_terms``, the formulas every kernel ports).
  With ``create_graph=True`` backward recomputes them as a differentiable expression of the saved
  log-probs, so a Hessian-vector product through it is exact.
- ``policy_loss_from_logits``: token-level ratios with a gradient wanted take ``FusedLogitsLoss``:
  the backend writes dL/dlogits in forward (2 passes over the logits on a GPU), for a declared
  upstream gradient ``grad_scale``; backward only rescales, through the grad-scale contract below.
  Sequence-level ratios (GSPO: a token's coefficient needs its whole sequence), no gradient, or
  torch.compile take ``token_logprobs`` then ``policy_loss`` (3 passes).
- ``policy_loss_from_hidden``: ``FastHiddenLoss`` (mode "fast", token-level ratios: 3 GEMMs, the
  gradient in forward) or ``linear_token_logprobs`` then ``policy_loss`` (mode "lean", GSPO).

Grad-scale contract (once, for every backend): the gradient written in forward assumes the upstream
gradient ``grad_scale``. Backward multiplies it by grad_output / grad_scale on the device (the
backend's ``rescale_``, whose rows leave at once when the ratio is 1) and warns once when the ratio
is not 1 (on a GPU the comparison reaches the host through a non-blocking copy read at a later call:
no call waits on the device). A fused op's gradient is computed once: a second backward raises.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch

from . import backends
from ._validation import (
    FLOAT_DTYPES,
    check_inplace_buffer,
    check_mask,
    check_positive_scalar,
    refuse_create_graph,
    check_same_device,
    check_shape,
    check_tensor,
)
from .backends import torch as torch_backend
from .backends.torch.policy_loss import METRIC_NAMES, loss_terms
from .config import LossConfig
from .distributed import (
    check_vocab_parallel,
    data_parallel_normalizers,
    vocab_parallel_linear_token_logprobs,
    vocab_parallel_token_logprobs,
)
from .logprobs import linear_token_logprobs_op, token_logprobs_op, validate_hidden_inputs, validate_logits_inputs

HIDDEN_MODES = ("fast", "lean")


def _check_config(config) -> LossConfig:
    if config is None:
        return LossConfig()
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a lens_kernels.LossConfig, got {type(config).__name__}")
    return config


def _check_normalizer(name, value):
    """None, a finite number > 0, or a 1-element tensor (its value checked when values are checked:
    num_tokens=torch.tensor(-5.) would flip the loss's sign, 0 would make it NaN)."""
    return check_positive_scalar(name, value)


def validate_loss_inputs(shape, device, advantages, mask, old_logps, ref_logps, is_weights, config,
                         num_tokens, num_sequences, entropy=None, mask_checked=False):
    """Shared checks of the per-token loss inputs; ``shape`` is [B, T]. ``advantages`` None: computed
    by the caller later (the LENS step); ``mask_checked``: the log-prob checks already saw the mask.
    Returns the checked config and normalizers."""
    B, T = shape
    config = _check_config(config)
    if not mask_checked:
        check_tensor("mask", mask, expected="[B, T]")
        check_mask(mask, (B, T))
    if advantages is not None:
        check_tensor("advantages", advantages, dtypes=FLOAT_DTYPES, ndim=(1, 2), expected="[B] or [B, T]")
        if advantages.dim() == 1:
            check_shape("advantages", advantages, (B,), "[B]")
        else:
            check_shape("advantages", advantages, (B, T), "[B, T]")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("entropy", entropy)):
        if t is not None:
            check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=(2,), expected="[B, T]")
            check_shape(name, t, (B, T), "[B, T]")
    if is_weights is not None:
        check_tensor("is_weights", is_weights, dtypes=FLOAT_DTYPES, ndim=(1, 2), expected="[B] or [B, T]")
        check_shape("is_weights", is_weights, (B,) if is_weights.dim() == 1 else (B, T),
                    "[B]" if is_weights.dim() == 1 else "[B, T]")
    if config.beta != 0.0 and ref_logps is None:
        raise ValueError("ref_logps [B, T] is required when config.beta != 0 (the KL term)")
    ref = torch.empty(0, device=device)
    check_same_device([("logps", ref), ("advantages", advantages), ("mask", mask), ("old_logps", old_logps),
                       ("ref_logps", ref_logps), ("is_weights", is_weights)])
    return config, _check_normalizer("num_tokens", num_tokens), _check_normalizer("num_sequences", num_sequences)


# ---------------------------------------------------------------------------------------------
# policy_loss: from log-probs
# ---------------------------------------------------------------------------------------------
class PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, entropy, advantages, mask, old_logps, ref_logps, is_weights, cfg, num_tokens,
                num_sequences):
        loss, metrics, g_l, g_h = loss_terms(logps, entropy, advantages, mask, old_logps, ref_logps, is_weights, cfg,
                                             num_tokens, num_sequences)
        ctx.save_for_backward(logps, entropy, g_l, g_h, advantages, mask, old_logps, ref_logps, is_weights)
        ctx.cfg, ctx.num_tokens, ctx.num_sequences = cfg, num_tokens, num_sequences
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        logps, entropy, g_l, g_h, advantages, mask, old_logps, ref_logps, is_weights = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the coefficients again, as a differentiable expression of the saved
            # log-probs and entropy (exact second derivatives, e.g. a Hessian-vector product)
            _, _, g_l, g_h = loss_terms(logps, entropy, advantages, mask, old_logps, ref_logps, is_weights, ctx.cfg,
                                        ctx.num_tokens, ctx.num_sequences)
        d_logps = g_l * grad_loss
        d_entropy = None if g_h is None else g_h * grad_loss
        return (d_logps, d_entropy) + (None,) * 8


def policy_loss_op(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config, num_tokens,
                   num_sequences):
    """``policy_loss`` on validated inputs: (loss, metrics dict)."""
    loss, metrics = PolicyLoss.apply(logps, entropy, advantages, mask, old_logps, ref_logps, is_weights, config,
                                     num_tokens, num_sequences)
    return loss, dict(zip(METRIC_NAMES, metrics.unbind(0)))


# ---------------------------------------------------------------------------------------------
# The grad-scale contract of the fused ops
# ---------------------------------------------------------------------------------------------
class _GradScaleWatch:
    """Brings the device-side "grad_output != grad_scale" flag to the host without a sync: on a GPU it is
    copied non-blocking into pinned memory with an event on the current stream, and the event is
    polled (``query()`` never blocks) at later calls; the warning fires once, after the fact. On CPU
    the flag is read at once."""

    def __init__(self):
        self.pending = []
        self.warned = False

    def note(self, mismatch: torch.Tensor):
        if self.warned:
            return
        if mismatch.device.type != "cuda":
            if bool(mismatch):
                self._warn()
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(mismatch, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(mismatch.device))
        self.pending.append((host, event))
        self.poll()

    def poll(self):
        if not self.pending:
            return
        still = []
        for host, event in self.pending:
            if not event.query():
                still.append((host, event))
            elif bool(host) and not self.warned:
                self._warn()
        self.pending = [] if self.warned else still

    def _warn(self):
        self.warned = True
        warnings.warn(
            "lens_kernels: backward received a grad_output different from the declared grad_scale; the gradient "
            "computed in forward was rescaled (one extra read and write of it). Pass grad_scale= equal to the "
            "upstream gradient (e.g. 1 / gradient_accumulation_steps) to save that pass.",
            RuntimeWarning, stacklevel=4)


GRAD_SCALE_WATCH = _GradScaleWatch()


def _store_grads(ctx, grads, logp, entropy, targets, advantages, mask, old_logps, ref_logps, is_weights, cfg,
                 num_tokens, num_sequences, grad_scale):
    """The fused forward's tail: the loss and metrics from its per-token log-probs and entropy (the
    formulas of ``policy_loss``), and the gradients kept for ``_stored_grads``."""
    loss, metrics, _, _ = loss_terms(logp.view(targets.shape), entropy.view(targets.shape), advantages, mask,
                                     old_logps, ref_logps, is_weights, cfg, num_tokens, num_sequences)
    ctx.save_for_backward(*grads)
    ctx.grad_scale, ctx.used = float(grad_scale), False
    ctx.mark_non_differentiable(metrics)
    return loss, metrics


def _stored_grads(ctx, grad_loss, op: str):
    """The gradients a fused forward computed for the upstream ``ctx.grad_scale``, scaled to the
    ``grad_loss`` backward received (``rescale`` per gradient); handed out once."""
    refuse_create_graph(op)
    if ctx.used:
        raise RuntimeError(f"lens_kernels.{op} computes its gradient once, in forward: backward can run only once "
                           "(retain_graph=True cannot reuse it); recompute the loss instead")
    ctx.used = True
    grads = ctx.saved_tensors
    # fp64 gradients (the torch backend) get an fp64 ratio; the GPU kernels read an fp32 one
    wide = any(g is not None and g.dtype == torch.float64 for g in grads)
    ratio = (grad_loss.detach().to(torch.float64 if wide else torch.float32) / ctx.grad_scale).reshape(1)
    GRAD_SCALE_WATCH.note(ratio[0] != 1.0)
    return grads, ratio


# ---------------------------------------------------------------------------------------------
# policy_loss_from_logits: the fused loss head
# ---------------------------------------------------------------------------------------------
class FusedLogitsLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, advantages, old_logps, ref_logps, is_weights, temperature, cfg,
                num_tokens, num_sequences, grad_scale, inplace, backend):
        GRAD_SCALE_WATCH.poll()
        ops = backends.launchers("policy_loss_from_logits", backend)
        with backends.device_guard(logits):
            logp, entropy, grad = ops.forward(logits, logits if inplace else ops.empty_grad(logits), targets, mask,
                                              advantages, old_logps, ref_logps, is_weights, temperature, cfg,
                                              num_tokens, num_sequences, grad_scale)
        if inplace:
            # the logits now hold the gradient: an op that saved them for its backward must raise
            # ("modified by an inplace operation"), not compute a wrong gradient
            torch.autograd.graph.increment_version(logits)
        ctx.inplace, ctx.backend = bool(inplace), backend
        return _store_grads(ctx, (grad,), logp, entropy, targets, advantages, mask, old_logps, ref_logps, is_weights,
                            cfg, num_tokens, num_sequences, grad_scale)

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        nothing = (None,) * 13
        if grad_loss is None:
            return (None,) + nothing
        (grad,), ratio = _stored_grads(ctx, grad_loss, "policy_loss_from_logits")
        with backends.device_guard(grad):
            backends.launchers("policy_loss_from_logits", ctx.backend).rescale_(grad, ratio.to(grad.device))
        if ctx.inplace:
            torch.autograd.graph.increment_version(grad)  # the logits buffer, written once more
            grad = grad.detach()  # not the input itself: autograd may keep it as .grad
        return (grad,) + nothing


def fused_logits_applies(config: LossConfig, logits: torch.Tensor) -> bool:
    """Token-level ratios and a gradient wanted (else writing dL/dz would be wasted); not while
    torch.compile traces (there the loss is token_logprobs' custom ops and the traced policy loss)."""
    return (config.ratio_level == "token" and torch.is_grad_enabled() and logits.requires_grad
            and not torch.compiler.is_compiling())


def policy_loss_from_logits_op(logits, targets, mask, advantages, old_logps, ref_logps, is_weights, temperature,
                               config, num_tokens, num_sequences, grad_scale, inplace, backend: str):
    """``policy_loss_from_logits`` on validated inputs and a chosen backend: (loss, metrics dict)."""
    if fused_logits_applies(config, logits):
        loss, metrics = FusedLogitsLoss.apply(logits, targets, mask, advantages, old_logps, ref_logps, is_weights,
                                              temperature, config, num_tokens, num_sequences, float(grad_scale),
                                              inplace, backend)
        return loss, dict(zip(METRIC_NAMES, metrics.unbind(0)))
    logps, entropy = token_logprobs_op(logits, targets, mask, temperature, backend, inplace)
    return policy_loss_op(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config, num_tokens,
                          num_sequences)


# ---------------------------------------------------------------------------------------------
# policy_loss_from_hidden: the fused loss head from hidden states
# ---------------------------------------------------------------------------------------------
class FastHiddenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, is_weights, temperature,
                cfg, num_tokens, num_sequences, grad_scale, backend):
        GRAD_SCALE_WATCH.poll()
        needs = tuple(ctx.needs_input_grad[:3])
        with backends.device_guard(hidden):
            logp, entropy, grads = backends.launchers("policy_loss_from_hidden", backend).forward(
                hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, is_weights, temperature, cfg,
                num_tokens, num_sequences, grad_scale, needs)
        return _store_grads(ctx, grads, logp, entropy, targets, advantages, mask, old_logps, ref_logps, is_weights,
                            cfg, num_tokens, num_sequences, grad_scale)

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        nothing = (None,) * 12
        if grad_loss is None:
            return (None, None, None) + nothing
        grads, ratio = _stored_grads(ctx, grad_loss, "policy_loss_from_hidden")
        for g in grads:
            if g is not None:
                torch_backend.rescale_grad_(g, ratio.to(g.device))
        return tuple(grads) + nothing


def fast_hidden_applies(config: LossConfig, hidden, weight, bias) -> bool:
    """Token-level ratios, and a gradient wanted (else the 2 gradient GEMMs would be wasted); not
    while torch.compile traces (the lean path's custom ops run there)."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return config.ratio_level == "token" and wants_grad and not torch.compiler.is_compiling()


def policy_loss_from_hidden_op(hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, is_weights,
                               temperature, config, num_tokens, num_sequences, grad_scale, mode, backend: str):
    """``policy_loss_from_hidden`` on validated inputs: (loss, metrics dict). ``backend`` is the
    caller's request (the fast and lean paths are two ops, each with its dispatch)."""
    if mode == "fast" and fast_hidden_applies(config, hidden, weight, bias):
        name = backends.choose("policy_loss_from_hidden", hidden, backend)
        loss, metrics = FastHiddenLoss.apply(hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps,
                                             is_weights, temperature, config, num_tokens, num_sequences,
                                             float(grad_scale), name)
        return loss, dict(zip(METRIC_NAMES, metrics.unbind(0)))
    name = backends.choose("linear_token_logprobs", hidden, backend)
    logps, entropy = linear_token_logprobs_op(hidden, weight, bias, targets, mask, temperature, name)
    return policy_loss_op(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config, num_tokens,
                          num_sequences)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def policy_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    config: Optional[LossConfig] = None,
    num_tokens=None,
    num_sequences=None,
    process_group=None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The GRPO-family policy loss from precomputed token log-probs (docs/design.md, Policy loss).

    Args:
        logps: [B, T] fp32/fp64 log-probs of the current policy (differentiable).
        advantages: [B] per sequence or [B, T] per token (no gradient).
        mask: [B, T] loss mask of 0/1 values (bool, integer or float; another value is a
            ValueError (*)). Nothing at a masked position (log-probs, entropy, advantages, old and
            reference log-probs, IS weights) is read: a NaN there changes nothing. Fully masked rows,
            a fully masked batch and B = 0 or T = 0 give 0 (and zero gradients).
        old_logps: [B, T] log-probs of the sampling policy; None means on-policy (rho = 1, with
            the gradient of rho). A log-ratio above ~88.7 nats overflows rho to +inf in fp32: a
            clipped, capped or saturated token still gets exactly the reference's 0 gradient; an
            unbounded term (PPO without dual clip and A < 0, the GSPO sequence ratio) is then +inf,
            as the float64 value rounds to in fp32 (``config.log_ratio_clamp`` bounds it).
        ref_logps: [B, T] reference log-probs, required when ``config.beta != 0``.
        entropy: [B, T] token entropy (differentiable); required when ``config.entropy_coef != 0``.
        is_weights: [B] or [B, T] importance-sampling weights from the rollout engine (vLLM TIS).
            ``advantages``, ``old_logps``, ``ref_logps`` and ``is_weights`` are constants of the loss:
            they get no gradient even with requires_grad=True (the last three warn once per process).
        config: a ``LossConfig``; default GRPO-style PPO clip with token-mean aggregation.
        num_tokens / num_sequences: global normalizers, finite and > 0: numbers (always checked)
            or 1-element tensors (value checked (*)); default the local counts of the mask (with
            ``process_group``, the counts over the group).
        process_group: the data-parallel group (``torch.distributed``). The default normalizers
            become the token / sequence counts over the group (one all-reduce, no host sync) and the
            loss is multiplied by the group size, so that after the usual DP gradient averaging the
            parameters get the gradient of the single-process loss over the whole batch. The returned
            loss averaged over the group is the global loss; the metrics are this rank's.
            ``config.dp_size`` must stay 1.0.

    Returns:
        (loss 0-d tensor, metrics) with metrics ``policy_loss``, ``kl``, ``entropy``,
        ``clip_frac_low``, ``clip_frac_high``, ``clip_frac``, ``ratio_mean``, ``ratio_min``,
        ``ratio_max``: 0-d tensors, never synced to the host.

    (*) Checks that read tensor values run for CPU tensors always, for GPU tensors only with
    ``LENS_KERNELS_CHECK=1``, never while ``torch.compile`` traces (docs/inputs.md).
    """
    check_tensor("logps", logps, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), ndim=(2,),
                 expected="[B, T]")
    config, num_tokens, num_sequences = validate_loss_inputs(
        tuple(logps.shape), logps.device, advantages, mask, old_logps, ref_logps, is_weights, config,
        num_tokens, num_sequences, entropy)
    if config.entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy [B, T] is required when config.entropy_coef != 0 (the entropy bonus)")
    if logps.dtype in (torch.float16, torch.bfloat16):
        logps = logps.float()
    if process_group is not None:
        config, num_tokens, num_sequences = data_parallel_normalizers(process_group, config, mask, num_tokens,
                                                                      num_sequences)
    return policy_loss_op(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config, num_tokens,
                          num_sequences)


def policy_loss_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    temperature=1.0,
    config: Optional[LossConfig] = None,
    num_tokens=None,
    num_sequences=None,
    grad_scale: float = 1.0,
    inplace: bool = False,
    backend: str = "auto",
    process_group=None,
    vocab_group=None,
    vocab_start: Optional[int] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The fused loss head: log-probs, entropy and the policy loss from logits in one op.

    Args:
        logits: [B, T, V] fp16/bf16/fp32 (fp64 on torch); a strided view with stride 1 on V is
            used without a copy.
        targets: [B, T] token ids, in [0, V) where kept (as in ``token_logprobs``). mask,
            advantages, old_logps, ref_logps, is_weights, config, num_tokens, num_sequences: as in
            ``policy_loss``. Special inputs (-inf logits, NaN under the mask, empty work) as in
            ``token_logprobs`` and ``policy_loss``.
        temperature: a finite real number > 0 (a numpy scalar too), or a tensor of shape [], [B],
            [B, 1] or [B, T]; a constant: a tensor with requires_grad=True gets no gradient (it warns once).
        grad_scale: the upstream gradient the fused kernels assume when they compute dL/dlogits in
            forward (e.g. 1 / gradient_accumulation_steps), a finite Python number > 0. A different
            grad_output in backward is rescaled exactly, at the cost of one extra pass and a warning.
        inplace: write dL/dlogits into the logits buffer (zero extra memory; logits are destroyed).
            An expanded or self-overlapping ``logits`` is a ValueError; if another op saved the
            buffer for its backward, autograd raises instead of computing a wrong gradient.
        backend: "auto", "torch", "triton" or "cuda".
        process_group: the data-parallel group, as in ``policy_loss``.
        vocab_group, vocab_start: vocab parallelism: ``logits`` holds the columns
            [vocab_start, vocab_start + V_s), the other shards sit on the other ranks of
            ``vocab_group`` (the tensor-parallel group), ``targets`` are global ids. The gradient
            stays local to the shard. This path is the 3-pass one (partials, combine, gradient).

    Returns:
        (loss, metrics) as in ``policy_loss``; metrics include the mean entropy.
    """
    check_vocab_parallel("vocab_group", vocab_group, vocab_start)
    temperature = validate_logits_inputs(logits, targets, mask, temperature, vocab_sharded=vocab_group is not None,
                                         ndim=(3,), expected="[B, T, V] for the policy loss", mask_required=True)
    config, num_tokens, num_sequences = validate_loss_inputs(
        tuple(targets.shape), logits.device, advantages, mask, old_logps, ref_logps, is_weights, config,
        num_tokens, num_sequences, mask_checked=True)
    _check_grad_scale(grad_scale)
    if inplace:
        check_inplace_buffer("logits", logits)
    if process_group is not None:
        config, num_tokens, num_sequences = data_parallel_normalizers(process_group, config, mask, num_tokens,
                                                                      num_sequences)
    if vocab_group is not None:
        logps, entropy = vocab_parallel_token_logprobs(logits, targets, group=vocab_group, vocab_start=vocab_start,
                                                       temperature=temperature, mask=mask, return_entropy=True,
                                                       inplace_backward=inplace, backend=backend)
        return policy_loss_op(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config, num_tokens,
                              num_sequences)
    name = backends.choose("policy_loss_from_logits", logits, backend)
    return policy_loss_from_logits_op(logits, targets, mask, advantages, old_logps, ref_logps, is_weights,
                                      temperature, config, num_tokens, num_sequences, grad_scale, inplace, name)


def policy_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    temperature=1.0,
    config: Optional[LossConfig] = None,
    num_tokens=None,
    num_sequences=None,
    grad_scale: float = 1.0,
    mode: str = "fast",
    backend: str = "auto",
    process_group=None,
    vocab_group=None,
    vocab_start: Optional[int] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The loss head from the last hidden states and the lm_head weight, never materializing [B, T, V].

    Args:
        hidden: [B, T, H]; weight: [V, H] (same dtype); bias: optional [V] (a -inf entry bans a token).
            Masked rows of ``hidden`` are never read; special inputs and checks as in
            ``policy_loss_from_logits``.
        mode: "fast" (no recompute of the logits in backward where the backend supports it) or
            "lean" (recompute in backward, the smallest memory). Gradients are exact in both.
        process_group: the data-parallel group, as in ``policy_loss``.
        vocab_group, vocab_start: vocab parallelism: ``weight`` [V_s, H] and ``bias`` [V_s] are the
            lm_head rows [vocab_start, vocab_start + V_s); dW and db stay local, d_hidden is summed
            over ``vocab_group`` in backward. ``mode`` is ignored there (the shard path recomputes).
        Other arguments as in ``policy_loss_from_logits``.

    Returns:
        (loss, metrics); gradients flow to hidden, weight (unless frozen) and bias; not to
        ``old_logps``, ``ref_logps``, ``is_weights`` or a temperature tensor (constants).
    """
    check_vocab_parallel("vocab_group", vocab_group, vocab_start)
    temperature = validate_hidden_inputs(hidden, weight, bias, targets, mask, temperature,
                                         vocab_sharded=vocab_group is not None, ndim=(3,),
                                         expected="[B, T, H] for the policy loss", mask_required=True)
    if mode not in HIDDEN_MODES:
        raise ValueError(f"mode must be one of {list(HIDDEN_MODES)}, got {mode!r}")
    config, num_tokens, num_sequences = validate_loss_inputs(
        tuple(targets.shape), hidden.device, advantages, mask, old_logps, ref_logps, is_weights, config,
        num_tokens, num_sequences, mask_checked=True)
    _check_grad_scale(grad_scale)
    if process_group is not None:
        config, num_tokens, num_sequences = data_parallel_normalizers(process_group, config, mask, num_tokens,
                                                                      num_sequences)
    if vocab_group is not None:
        logps, entropy = vocab_parallel_linear_token_logprobs(hidden, weight, targets, group=vocab_group,
                                                              vocab_start=vocab_start, bias=bias,
                                                              temperature=temperature, mask=mask,
                                                              return_entropy=True, backend=backend)
        return policy_loss_op(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config, num_tokens,
                              num_sequences)
    return policy_loss_from_hidden_op(hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps,
                                      is_weights, temperature, config, num_tokens, num_sequences, grad_scale, mode,
                                      backend)


def _check_grad_scale(grad_scale):
    """A finite Python number > 0: the upstream gradient the fused kernels assume in forward."""
    check_positive_scalar("grad_scale", grad_scale, allow_tensor=False)
