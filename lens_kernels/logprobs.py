"""Public token log-prob ops: validation at the boundary, then dispatch to a backend."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends
from ._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_mask,
    check_inplace_buffer,
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


def validate_logits_inputs(logits, targets, mask, temperature, vocab_sharded=False):
    """Boundary checks; with ``vocab_sharded`` the target range is checked by the combine instead."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=(2, 3), expected="[B, T, V] or [N, V]")
    check_vocab_stride("logits", logits)
    lead = tuple(logits.shape[:-1])
    desc = "[B, T]" if logits.dim() == 3 else "[N]"
    check_tensor("targets", targets, dtypes=INDEX_DTYPES)
    check_shape("targets", targets, lead, desc)
    if mask is not None:
        check_mask(mask, lead, expected=desc)
    check_same_device([("logits", logits), ("targets", targets), ("mask", mask)])
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a vocabulary of at least 1 (got V = 0)")
    temperature = check_temperature(temperature, targets)
    if not vocab_sharded:
        check_targets(targets, logits.shape[-1], mask)
    return temperature


def validate_hidden_inputs(hidden, weight, bias, targets, mask, temperature, vocab_sharded=False):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=(2, 3), expected="[B, T, H] or [N, H]")
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
    if mask is not None:
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
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probabilities of the target tokens, and optionally the entropy, in fp32.

    Args:
        logits: [B, T, V] or [N, V], fp16/bf16/fp32 (fp64 on the torch backend). May be a strided
            view such as ``logits[:, :-1]`` (stride 1 along V); it is never copied whole.
        targets: [B, T] or [N] integer token ids in [0, V) where the mask keeps the token. A kept
            target outside [0, V) is a ValueError when values are checked (*), else a NaN log-prob.
        temperature: a finite float > 0, or a tensor of shape [], [B] or [B, 1] (per sequence) or
            [B, T] (per token); [] or [N] for [N, V] logits. Values finite and > 0 (checked (*)).
        mask: optional [B, T] mask of 0/1 values (bool, integer or float; any other value is a
            ValueError (*)). Masked tokens give 0 and an exact-zero gradient row whatever their logits
            hold (NaN, +-inf); their targets may be padding ids (e.g. -100).
        return_entropy: also return H = -sum_v p_v log p_v (differentiable).
        inplace_backward: write dL/dlogits into the logits buffer in backward (zero extra memory);
            the logits are destroyed. An expanded or self-overlapping ``logits`` is a ValueError.

    Special inputs (docs/inputs.md): a -inf logit has probability 0 and adds 0
    to the entropy (a -inf target gives -inf); a kept row with no finite logit or a NaN/+inf logit
    gives NaN; B = 0 or T = 0 gives empty outputs. (*) Values are checked for CPU tensors always, for
    GPU tensors only with ``LENS_KERNELS_CHECK=1`` (a check reads values: a host sync), never while
    ``torch.compile`` traces; shapes, dtypes and strides are always checked.
        backend: "auto", "torch", "triton" or "cuda".
        process_group, vocab_start: vocab parallelism. ``logits`` holds the columns
            [vocab_start, vocab_start + V_s) of the full logits, the other shards sit on the other
            ranks of ``process_group`` (the tensor-parallel group), and ``targets`` holds global ids.
            Every rank gets the log-probs and entropy of the full vocabulary; the gradient stays
            local to the shard. See ``lens_kernels.distributed``.

    Returns:
        (logps [B, T] fp32, entropy [B, T] fp32 or None); fp64 for fp64 logits. l <= 0 always.
    """
    check_vocab_parallel("process_group", process_group, vocab_start)
    temperature = validate_logits_inputs(logits, targets, mask, temperature, vocab_sharded=process_group is not None)
    if inplace_backward:
        check_inplace_buffer("logits", logits)
    if process_group is not None:
        return vocab_parallel_token_logprobs(logits, targets, group=process_group, vocab_start=vocab_start,
                                             temperature=temperature, mask=mask, return_entropy=return_entropy,
                                             inplace_backward=inplace_backward, backend=backend)
    impl = backends.get("token_logprobs", logits, backend)
    return impl(logits, targets, mask=mask, temperature=temperature, return_entropy=return_entropy,
                inplace_grad=inplace_backward)


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
    process_group=None,
    vocab_start: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``token_logprobs(hidden @ weight.T + bias, targets)`` without ever materializing [N, V].

    Args:
        hidden: [B, T, H] or [N, H] last hidden states, fp16/bf16/fp32 (fp64 on torch).
        weight: [V, H] lm_head weight, same dtype. A frozen weight (requires_grad=False) gets no dW.
        targets: [B, T] or [N] token ids. bias: optional [V] (a -inf entry bans that token).
            temperature, mask, return_entropy: as in ``token_logprobs``, with the same special
            inputs and checks (a masked row of ``hidden`` is never read).
        process_group, vocab_start: vocab parallelism: ``weight`` [V_s, H] (and ``bias`` [V_s]) are
            the lm_head rows [vocab_start, vocab_start + V_s), ``hidden`` is the same on every rank of
            ``process_group``, ``targets`` are global ids. dW and db stay local; d_hidden is summed
            over the group in backward (one all-reduce of [N, H]).

    Returns:
        (logps fp32, entropy fp32 or None), differentiable w.r.t. hidden, weight and bias.
    """
    check_vocab_parallel("process_group", process_group, vocab_start)
    temperature = validate_hidden_inputs(hidden, weight, bias, targets, mask, temperature,
                                         vocab_sharded=process_group is not None)
    if process_group is not None:
        return vocab_parallel_linear_token_logprobs(hidden, weight, targets, group=process_group,
                                                    vocab_start=vocab_start, bias=bias, temperature=temperature,
                                                    mask=mask, return_entropy=return_entropy, backend=backend)
    impl = backends.get("linear_token_logprobs", hidden, backend)
    return impl(hidden, weight, targets, bias=bias, mask=mask, temperature=temperature,
                return_entropy=return_entropy)
