"""token_logprobs and linear_token_logprobs: each op defined once.

Layering, top to bottom: the public function validates its arguments (once, here) and makes the one
dispatch decision (``backends.choose``); the op is a ``torch.library`` custom op (``lens_kernels::*``)
whose schema carries the chosen backend's name, with one fake (shapes for ``torch.compile`` and meta
tensors) and one autograd formula; its implementation calls that backend's plain launchers
(``backends/_launchers.py``) under the tensor's device guard. Under ``torch.compile`` the ops stay
opaque nodes, so a compiled model runs the same kernels as eager.

Higher-order gradients: the backward formulas are kernels, not differentiable expressions; a backward
with ``create_graph=True`` through these ops raises instead of returning a silently wrong result.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends
from .backends.torch._common import compute_dtype
from ._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_inplace_buffer,
    refuse_create_graph,
    renamed_arguments,
    check_mask,
    check_same_device,
    check_shape,
    check_targets,
    check_temperature,
    check_tensor,
    check_vocab_stride,
)
from .distributed import (
    check_vocab_parallel,
    vocab_parallel_linear_token_logprobs,
    vocab_parallel_token_logprobs,
)


# ---------------------------------------------------------------------------------------------
# Shared pieces of the ops' definitions
# ---------------------------------------------------------------------------------------------
def split_temperature(temperature):
    """(float, tensor or None): a custom op's schema takes the two forms as two arguments."""
    return (1.0, temperature) if torch.is_tensor(temperature) else (float(temperature), None)


def _own_outputs(lead, logp, entropy, stats):
    """A custom op's outputs may not alias each other: a launcher that hands out views of one buffer
    gets them copied ([N] values, cheap)."""
    if logp._base is not None or entropy._base is not None:
        logp, entropy = logp.clone(), entropy.clone()
    return logp.view(lead), entropy.view(lead), stats


def _flat_or_none(g: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if g is None else g.reshape(-1)


def _stats_fake(like: torch.Tensor, op: str, backend: str, n: int) -> torch.Tensor:
    rows = getattr(backends.launchers(op, backend), "stats_rows", 1)
    return like.new_empty((rows, n) if rows > 1 else (n,), dtype=compute_dtype(like.dtype))


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lens_kernels::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor], tau: float,
                       tau_t: Optional[torch.Tensor], backend: str,
                       inplace_backward: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [...], entropy [...], stats) of ``token_logprobs`` on ``backend``; ``inplace_backward`` is
    read by the autograd formula only."""
    with backends.device_guard(logits):
        logp, entropy, stats = backends.launchers("token_logprobs", backend).forward(
            logits, targets, mask, tau if tau_t is None else tau_t)
    return _own_outputs(logits.shape[:-1], logp, entropy, stats)


@token_logprobs_fwd.register_fake
def _(logits, targets, mask, tau, tau_t, backend, inplace_backward):
    lead = logits.shape[:-1]
    cdt = compute_dtype(logits.dtype)
    return (logits.new_empty(lead, dtype=cdt), logits.new_empty(lead, dtype=cdt),
            _stats_fake(logits, "token_logprobs", backend, targets.numel()))


@torch.library.custom_op("lens_kernels::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor], tau: float,
                       tau_t: Optional[torch.Tensor], stats: torch.Tensor, entropy: torch.Tensor,
                       g_logp: Optional[torch.Tensor], g_entropy: Optional[torch.Tensor],
                       backend: str) -> torch.Tensor:
    """dL/dlogits (a new buffer shaped as logits) for upstream gradients g_logp, g_entropy (None: no
    gradient through that output)."""
    ops = backends.launchers("token_logprobs", backend)
    with backends.device_guard(logits):
        return ops.backward(logits, targets, mask, tau if tau_t is None else tau_t, stats, entropy.reshape(-1),
                            _flat_or_none(g_logp), _flat_or_none(g_entropy), ops.empty_grad(logits))


@token_logprobs_bwd.register_fake
def _(logits, targets, mask, tau, tau_t, stats, entropy, g_logp, g_entropy, backend):
    return logits.new_empty(logits.shape)


def _token_logprobs_setup(ctx, inputs, output):
    logits, targets, mask, tau, tau_t, backend, inplace_backward = inputs
    _, entropy, stats = output
    ctx.save_for_backward(logits, targets, mask, tau_t, stats, entropy)
    ctx.tau, ctx.backend, ctx.inplace = tau, backend, inplace_backward
    ctx.set_materialize_grads(False)


def _token_logprobs_backward(ctx, g_logp, g_entropy, _g_stats):
    refuse_create_graph("token_logprobs")
    nothing = (None,) * 6
    if g_logp is None and g_entropy is None:
        return (None,) + nothing
    logits, targets, mask, tau_t, stats, entropy = ctx.saved_tensors
    if ctx.inplace and not torch.compiler.is_compiling():  # a hint the traced graph does not take
        ops = backends.launchers("token_logprobs", ctx.backend)
        with backends.device_guard(logits):
            ops.backward(logits, targets, mask, ctx.tau if tau_t is None else tau_t, stats, entropy.reshape(-1),
                         _flat_or_none(g_logp), _flat_or_none(g_entropy), logits)
        # the buffer now holds the gradient: an op that saved the logits must raise, not read it
        torch.autograd.graph.increment_version(logits)
        return (logits.detach(),) + nothing  # not the input itself: autograd may keep it as .grad
    grad = token_logprobs_bwd(logits, targets, mask, ctx.tau, tau_t, stats, entropy, g_logp, g_entropy, ctx.backend)
    return (grad,) + nothing


token_logprobs_fwd.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


def _no_grad_launcher(op: str, backend: str, inputs):
    """The backend's forward for a call that no gradient follows (it keeps nothing for a backward), or
    None: a gradient may follow, torch.compile traces (the op stays one node), or the backend has none."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in inputs)):
        return None
    return getattr(backends.launchers(op, backend), "forward_no_grad", None)


def token_logprobs_op(logits, targets, mask, temperature, backend: str, inplace_backward: bool = False,
                      want_entropy: bool = True):
    """The op on validated inputs and a chosen backend: (logps, entropy; None unless ``want_entropy``
    when the no-grad forward runs)."""
    no_grad = _no_grad_launcher("token_logprobs", backend, (logits,))
    if no_grad is not None:
        with backends.device_guard(logits):
            return no_grad(logits, targets, mask, temperature, want_entropy)
    tau, tau_t = split_temperature(temperature)
    logp, entropy, _ = token_logprobs_fwd(logits, targets, mask, tau, tau_t, backend, inplace_backward)
    return logp, entropy


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lens_kernels::linear_token_logprobs_fwd", mutates_args=())
def linear_token_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              targets: torch.Tensor, mask: Optional[torch.Tensor], tau: float,
                              tau_t: Optional[torch.Tensor], backend: str,
                              variant: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [...], entropy [...], stats) of ``linear_token_logprobs``; ``variant`` is the backend's
    option decided when forward ran (kept for backward)."""
    with backends.device_guard(hidden):
        logp, entropy, stats = backends.launchers("linear_token_logprobs", backend).forward(
            hidden, weight, bias, targets, mask, tau if tau_t is None else tau_t, variant)
    return _own_outputs(hidden.shape[:-1], logp, entropy, stats)


@linear_token_logprobs_fwd.register_fake
def _(hidden, weight, bias, targets, mask, tau, tau_t, backend, variant):
    lead = hidden.shape[:-1]
    cdt = compute_dtype(hidden.dtype)
    return (hidden.new_empty(lead, dtype=cdt), hidden.new_empty(lead, dtype=cdt),
            _stats_fake(hidden, "linear_token_logprobs", backend, targets.numel()))


@torch.library.custom_op("lens_kernels::linear_token_logprobs_bwd", mutates_args=())
def linear_token_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              targets: torch.Tensor, mask: Optional[torch.Tensor], tau: float,
                              tau_t: Optional[torch.Tensor], stats: torch.Tensor, entropy: torch.Tensor,
                              g_logp: Optional[torch.Tensor], g_entropy: Optional[torch.Tensor], need_h: bool,
                              need_w: bool, need_b: bool, backend: str,
                              variant: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias); an empty [0] tensor for each gradient not needed."""
    ops = backends.launchers("linear_token_logprobs", backend)
    with backends.device_guard(hidden):
        grads = ops.backward(hidden, weight, bias, targets, mask, tau if tau_t is None else tau_t, stats,
                             entropy.reshape(-1), _flat_or_none(g_logp), _flat_or_none(g_entropy),
                             (need_h, need_w, need_b and bias is not None), variant)
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@linear_token_logprobs_bwd.register_fake
def _(hidden, weight, bias, targets, mask, tau, tau_t, stats, entropy, g_logp, g_entropy, need_h, need_w, need_b,
      backend, variant):
    empty = hidden.new_empty(0)
    return (hidden.new_empty(hidden.shape) if need_h else empty, weight.new_empty(weight.shape) if need_w else empty,
            bias.new_empty(bias.shape) if (need_b and bias is not None) else empty)


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, targets, mask, tau, tau_t, backend, variant = inputs
    _, entropy, stats = output
    ctx.save_for_backward(hidden, weight, bias, targets, mask, tau_t, stats, entropy)
    ctx.tau, ctx.backend, ctx.variant = tau, backend, variant
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, g_logp, g_entropy, _g_stats):
    refuse_create_graph("linear_token_logprobs")
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    nothing = (None,) * 6
    if (g_logp is None and g_entropy is None) or not (need_h or need_w or need_b):
        return (None, None, None) + nothing
    hidden, weight, bias, targets, mask, tau_t, stats, entropy = ctx.saved_tensors
    need_b = need_b and bias is not None
    d_h, d_w, d_b = linear_token_logprobs_bwd(hidden, weight, bias, targets, mask, ctx.tau, tau_t, stats, entropy,
                                              g_logp, g_entropy, need_h, need_w, need_b, ctx.backend, ctx.variant)
    return (d_h if need_h else None, d_w if need_w else None, d_b if need_b else None) + nothing


linear_token_logprobs_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_token_logprobs_op(hidden, weight, bias, targets, mask, temperature, backend: str,
                             want_entropy: bool = True):
    """The op on validated inputs and a chosen backend: (logps, entropy; see ``token_logprobs_op``)."""
    no_grad = _no_grad_launcher("linear_token_logprobs", backend, (hidden, weight, bias))
    if no_grad is not None:
        with backends.device_guard(hidden):
            return no_grad(hidden, weight, bias, targets, mask, temperature, want_entropy)
    tau, tau_t = split_temperature(temperature)
    variant = backends.launchers("linear_token_logprobs", backend).variant(hidden)
    logp, entropy, _ = linear_token_logprobs_fwd(hidden, weight, bias, targets, mask, tau, tau_t, backend, variant)
    return logp, entropy


# ---------------------------------------------------------------------------------------------
# Boundary checks and the public functions
# ---------------------------------------------------------------------------------------------
def validate_logits_inputs(logits, targets, mask, temperature, vocab_sharded=False, ndim=(2, 3),
                           expected="[B, T, V] or [N, V]", mask_required=False):
    """Boundary checks; with ``vocab_sharded`` the target range is checked by the combine instead."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=ndim, expected=expected)
    check_vocab_stride("logits", logits)
    lead = tuple(logits.shape[:-1])
    desc = "[B, T]" if logits.dim() == 3 else "[N]"
    check_tensor("targets", targets, dtypes=INDEX_DTYPES)
    check_shape("targets", targets, lead, desc)
    if mask is not None or mask_required:
        check_mask(mask, lead, expected=desc)
    check_same_device([("logits", logits), ("targets", targets), ("mask", mask)])
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a vocabulary of at least 1 (got V = 0)")
    temperature = check_temperature(temperature, targets)
    if not vocab_sharded:
        check_targets(targets, logits.shape[-1], mask)
    return temperature


def validate_hidden_inputs(hidden, weight, bias, targets, mask, temperature, vocab_sharded=False, ndim=(2, 3),
                           expected="[B, T, H] or [N, H]", mask_required=False):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=ndim, expected=expected)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=(2,), expected="[V, H] (the lm_head weight)")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {list(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(hidden.dtype,), ndim=(1,), expected="[V]")
        check_shape("bias", bias, (weight.shape[0],), "[V]")
    lead = tuple(hidden.shape[:-1])
    desc = "[B, T]" if hidden.dim() == 3 else "[N]"
    check_tensor("targets", targets, dtypes=INDEX_DTYPES)
    check_shape("targets", targets, lead, desc)
    if mask is not None or mask_required:
        check_mask(mask, lead, expected=desc)
    check_same_device([("hidden", hidden), ("weight", weight), ("bias", bias), ("targets", targets),
                       ("mask", mask)])
    temperature = check_temperature(temperature, targets)
    if not vocab_sharded:
        check_targets(targets, weight.shape[0], mask)
    return temperature


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature=1.0,
    mask: Optional[torch.Tensor] = None,
    return_entropy: bool = False,
    inplace: bool = False,
    backend: str = "auto",
    vocab_group=None,
    vocab_start: Optional[int] = None,
    **deprecated,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probabilities of the target tokens, and optionally the entropy, in fp32.

    Args:
        logits: [B, T, V] or [N, V], fp16/bf16/fp32 (fp64 on the torch backend). May be a strided
            view such as ``logits[:, :-1]`` (stride 1 along V); it is never copied whole.
        targets: [B, T] or [N] integer token ids in [0, V) where the mask keeps the token. A kept
            target outside [0, V) is a ValueError when values are checked (*), else a NaN log-prob.
        temperature: a finite float > 0, or a tensor of shape [], [B] or [B, 1] (per sequence) or
            [B, T] (per token); [] or [N] for [N, V] logits. Values finite and > 0 (checked (*)). A
            numpy scalar counts as a float. A constant: a tensor with requires_grad=True gets no
            gradient (it warns once per process).
        mask: optional [B, T] mask of 0/1 values (bool, integer or float; any other value is a
            ValueError (*)). Masked tokens give 0 and an exact-zero gradient row whatever their logits
            hold (NaN, +-inf); their targets may be padding ids (e.g. -100).
        return_entropy: also return H = -sum_v p_v log p_v (differentiable).
        inplace: write dL/dlogits into the logits buffer in backward (zero extra memory); the
            logits are destroyed. An expanded or self-overlapping ``logits`` is a ValueError.
            (``inplace_backward=``, its earlier name, still works with a DeprecationWarning.)
        backend: "auto", "torch", "triton" or "cuda".
        vocab_group, vocab_start: vocab parallelism. ``logits`` holds the columns
            [vocab_start, vocab_start + V_s) of the full logits, the other shards sit on the other
            ranks of ``vocab_group`` (the tensor-parallel group), and ``targets`` holds global ids.
            (``process_group=``, its earlier name here, still works with a DeprecationWarning: the
            loss ops use ``process_group`` for the data-parallel group.)
            Every rank gets the log-probs and entropy of the full vocabulary; the gradient stays
            local to the shard. See ``lens_kernels.distributed``.

    Special inputs (docs/inputs.md): a -inf logit has probability 0 and adds 0 to the entropy (a -inf
    target gives -inf); a kept row with no finite logit or a NaN/+inf logit gives NaN; B = 0 or T = 0
    gives empty outputs. Higher-order gradients (``create_graph=True``) are refused with an error.
    (*) Values are checked for CPU tensors always, for GPU tensors only with ``LENS_KERNELS_CHECK=1``
    (a check reads values: a host sync), never while ``torch.compile`` traces; shapes, dtypes and
    strides are always checked.

    Returns:
        (logps [B, T] fp32, entropy [B, T] fp32 or None); fp64 for fp64 logits. l <= 0 always.
    """
    renamed = renamed_arguments(deprecated, {"process_group": "vocab_group", "inplace_backward": "inplace"},
                                "token_logprobs")
    vocab_group = renamed.get("vocab_group", vocab_group)
    inplace = renamed.get("inplace", inplace)
    check_vocab_parallel("vocab_group", vocab_group, vocab_start)
    temperature = validate_logits_inputs(logits, targets, mask, temperature, vocab_sharded=vocab_group is not None)
    if inplace:
        check_inplace_buffer("logits", logits)
    if vocab_group is not None:
        return vocab_parallel_token_logprobs(logits, targets, group=vocab_group, vocab_start=vocab_start,
                                             temperature=temperature, mask=mask, return_entropy=return_entropy,
                                             inplace_backward=inplace, backend=backend)
    name = backends.choose("token_logprobs", logits, backend)
    logp, entropy = token_logprobs_op(logits, targets, mask, temperature, name, inplace, return_entropy)
    return logp, (entropy if return_entropy else None)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature=1.0,
    mask: Optional[torch.Tensor] = None,
    return_entropy: bool = False,
    backend: str = "auto",
    vocab_group=None,
    vocab_start: Optional[int] = None,
    **deprecated,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``token_logprobs(hidden @ weight.T + bias, targets)`` without ever materializing [N, V].

    Args:
        hidden: [B, T, H] or [N, H] last hidden states, fp16/bf16/fp32 (fp64 on torch).
        weight: [V, H] lm_head weight, same dtype. A frozen weight (requires_grad=False) gets no dW.
        targets: [B, T] or [N] token ids. bias: optional [V] (a -inf entry bans that token).
            temperature, mask, return_entropy: as in ``token_logprobs``, with the same special
            inputs and checks (a masked row of ``hidden`` is never read).
        vocab_group, vocab_start: vocab parallelism: ``weight`` [V_s, H] (and ``bias`` [V_s]) are
            the lm_head rows [vocab_start, vocab_start + V_s), ``hidden`` is the same on every rank of
            ``vocab_group``, ``targets`` are global ids. dW and db stay local; d_hidden is summed
            over the group in backward (one all-reduce of [N, H]). (``process_group=``: the earlier
            name, deprecated.)

    Returns:
        (logps fp32, entropy fp32 or None), differentiable w.r.t. hidden, weight and bias (first order:
        ``create_graph=True`` is refused).
    """
    vocab_group = renamed_arguments(deprecated, {"process_group": "vocab_group"},
                                    "linear_token_logprobs").get("vocab_group", vocab_group)
    check_vocab_parallel("vocab_group", vocab_group, vocab_start)
    temperature = validate_hidden_inputs(hidden, weight, bias, targets, mask, temperature,
                                         vocab_sharded=vocab_group is not None)
    if vocab_group is not None:
        return vocab_parallel_linear_token_logprobs(hidden, weight, targets, group=vocab_group,
                                                    vocab_start=vocab_start, bias=bias, temperature=temperature,
                                                    mask=mask, return_entropy=return_entropy, backend=backend)
    name = backends.choose("linear_token_logprobs", hidden, backend)
    logp, entropy = linear_token_logprobs_op(hidden, weight, bias, targets, mask, temperature, name, return_entropy)
    return logp, (entropy if return_entropy else None)
