"""Public policy-loss ops: from log-probs, from logits, from hidden states (SPEC 2.2 and 3)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import backends
from ._validation import (
    FLOAT_DTYPES,
    check_inplace_buffer,
    check_mask,
    check_positive_scalar,
    check_same_device,
    check_shape,
    check_tensor,
)
from .backends import torch as torch_backend
from .config import LossConfig
from .distributed import (
    check_vocab_parallel,
    data_parallel_normalizers,
    vocab_parallel_linear_token_logprobs,
    vocab_parallel_token_logprobs,
)
from .logprobs import validate_hidden_inputs, validate_logits_inputs

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
                         num_tokens, num_sequences, entropy=None):
    """Shared checks of the per-token loss inputs; ``shape`` is [B, T]. Returns the checked config and
    normalizers."""
    B, T = shape
    config = _check_config(config)
    check_tensor("mask", mask, expected="[B, T]")
    check_mask(mask, (B, T))
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
    """The GRPO-family policy loss from precomputed token log-probs (SPEC 2.2).

    Args:
        logps: [B, T] fp32/fp64 log-probs of the current policy (differentiable).
        advantages: [B] per sequence or [B, T] per token (no gradient).
        mask: [B, T] loss mask of 0/1 values (bool, integer or float; another value is a
            ValueError (*)). Nothing at a masked position (log-probs, entropy, advantages, old and
            reference log-probs, IS weights) is read: a NaN there changes nothing. Fully masked rows,
            a fully masked batch and B = 0 or T = 0 give 0 (and zero gradients).
        old_logps: [B, T] log-probs of the sampling policy; None means on-policy (rho = 1, with
            the gradient of rho).
        ref_logps: [B, T] reference log-probs, required when ``config.beta != 0``.
        entropy: [B, T] token entropy (differentiable); required when ``config.entropy_coef != 0``.
        is_weights: [B] or [B, T] importance-sampling weights from the rollout engine (vLLM TIS).
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
    return torch_backend.policy_loss(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config,
                                 num_tokens, num_sequences)


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
        temperature: a finite float > 0, or a tensor of shape [], [B], [B, 1] or [B, T].
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
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=(3,), expected="[B, T, V] for the policy loss")
    check_vocab_parallel("vocab_group", vocab_group, vocab_start)
    temperature = validate_logits_inputs(logits, targets, mask, temperature, vocab_sharded=vocab_group is not None)
    config, num_tokens, num_sequences = validate_loss_inputs(
        tuple(targets.shape), logits.device, advantages, mask, old_logps, ref_logps, is_weights, config,
        num_tokens, num_sequences)
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
        return torch_backend.policy_loss(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config,
                                     num_tokens, num_sequences)
    impl = backends.get("policy_loss_from_logits", logits, backend)
    return impl(logits, targets, mask, advantages, old_logps=old_logps, ref_logps=ref_logps,
                is_weights=is_weights, temperature=temperature, config=config, num_tokens=num_tokens,
                num_sequences=num_sequences, grad_scale=grad_scale, inplace=inplace)


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
        (loss, metrics); gradients flow to hidden, weight (unless frozen) and bias.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=(3,), expected="[B, T, H] for the policy loss")
    check_vocab_parallel("vocab_group", vocab_group, vocab_start)
    temperature = validate_hidden_inputs(hidden, weight, bias, targets, mask, temperature,
                                         vocab_sharded=vocab_group is not None)
    if mode not in HIDDEN_MODES:
        raise ValueError(f"mode must be one of {list(HIDDEN_MODES)}, got {mode!r}")
    config, num_tokens, num_sequences = validate_loss_inputs(
        tuple(targets.shape), hidden.device, advantages, mask, old_logps, ref_logps, is_weights, config,
        num_tokens, num_sequences)
    _check_grad_scale(grad_scale)
    if process_group is not None:
        config, num_tokens, num_sequences = data_parallel_normalizers(process_group, config, mask, num_tokens,
                                                                      num_sequences)
    if vocab_group is not None:
        logps, entropy = vocab_parallel_linear_token_logprobs(hidden, weight, targets, group=vocab_group,
                                                              vocab_start=vocab_start, bias=bias,
                                                              temperature=temperature, mask=mask,
                                                              return_entropy=True, backend=backend)
        return torch_backend.policy_loss(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config,
                                     num_tokens, num_sequences)
    impl = backends.get("policy_loss_from_hidden", hidden, backend)
    return impl(hidden, weight, targets, mask, advantages, bias=bias, old_logps=old_logps, ref_logps=ref_logps,
                is_weights=is_weights, temperature=temperature, config=config, num_tokens=num_tokens,
                num_sequences=num_sequences, grad_scale=grad_scale, mode=mode)


def _check_grad_scale(grad_scale):
    """A finite Python number > 0: the upstream gradient the fused kernels assume in forward."""
    check_positive_scalar("grad_scale", grad_scale, allow_tensor=False)
