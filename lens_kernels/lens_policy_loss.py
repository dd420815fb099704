"""The whole LENS step in one op: log-probs, sequence confidence, group advantages and the policy loss.

On-policy (one update per rollout, the micro-batch holds whole groups, no ``old_logps``), the old
policy is the current one, so the LENS confidence comes from the very log-probs the loss needs:

1. one pass over the logits: token log-probs, entropy (and, from them, per-sequence sums);
2. a few [B]-sized ops: confidences, group statistics, calibrated rewards, advantages;
3. backward: one pass that reads the logits and writes the gradient (in place if asked).

Three HBM passes in all, no host sync, no Python round trip between the stages. The backend of
``token_logprobs`` / ``linear_token_logprobs`` does the passes, so this op speeds up with it.
With ``old_logps`` given, the advantages come from them first and the loss takes the backend's
fused loss-head path.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch

from . import backends
from ._validation import FLOAT_DTYPES, INDEX_DTYPES, check_shape, check_tensor, value_checks_enabled
from .advantages import group_advantages
from .config import AdvantageConfig, LossConfig
from .logprobs import (linear_token_logprobs_op, token_logprobs_op, validate_hidden_inputs,
                       validate_logits_inputs)
from .loss import (HIDDEN_MODES, _check_grad_scale, policy_loss_from_hidden_op, policy_loss_from_logits_op,
                   policy_loss_op, validate_loss_inputs)


_OLD_ADVANTAGE_OPTIONS = frozenset(AdvantageConfig.__dataclass_fields__)


def advantage_options(config: Optional[AdvantageConfig], old: dict) -> dict:
    """``group_advantages``' keyword arguments from ``advantage_config``, or from the per-option keywords
    of earlier releases (``estimator=``, ``lens_alpha=``, ...: still taken, with a DeprecationWarning)."""
    unknown = set(old) - _OLD_ADVANTAGE_OPTIONS
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    if config is not None and not isinstance(config, AdvantageConfig):
        raise TypeError(f"advantage_config must be a lens_kernels.AdvantageConfig, got {type(config).__name__}")
    if old:
        if config is not None:
            raise TypeError(f"give advantage_config or the options {sorted(old)}, not both")
        warnings.warn(f"lens_kernels: passing {sorted(old)} as keywords of the LENS step is deprecated and will be "
                      "removed in the next release; pass advantage_config=lk.AdvantageConfig(...)",
                      DeprecationWarning, stacklevel=3)
        config = AdvantageConfig(**old)
    return (config or AdvantageConfig()).kwargs()


def _check_whole_groups(batch: int, group_size: Optional[int], group_ids: Optional[torch.Tensor]) -> None:
    """The micro-batch must hold whole groups: the group statistics are exact only then."""
    if group_size is None and group_ids is None:
        raise ValueError("give group_size (contiguous groups) and/or group_ids ([B] group of each completion)")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if group_ids is None:
        if batch % group_size != 0:
            raise ValueError(
                f"the micro-batch holds B={batch} completions, not whole groups of group_size={group_size}: "
                f"the last group has {batch % group_size}; the fused LENS step needs whole groups "
                "(else use group_advantages on the rollout batch + policy_loss_from_logits)"
            )
        return
    check_tensor("group_ids", group_ids, dtypes=INDEX_DTYPES, ndim=(1,), expected="[B]")
    check_shape("group_ids", group_ids, (batch,), "[B]")
    if group_size is not None and value_checks_enabled(group_ids):
        ids, counts = torch.unique(group_ids, return_counts=True)
        bad = counts != group_size
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"group {int(ids[i])} has {int(counts[i])} completions in this micro-batch, expected "
                f"group_size={group_size}: the fused LENS step needs whole groups "
                "(else use group_advantages on the rollout batch + policy_loss_from_logits)"
            )


def _check_rewards(batch: int, rewards, correct) -> None:
    """Before anything else reads them: a wrong length must name rewards (or correct), not the
    old_logps / advantages the step derives from them."""
    check_tensor("rewards", rewards, dtypes=FLOAT_DTYPES + INDEX_DTYPES + (torch.bool,), ndim=(1,), expected="[B]")
    check_shape("rewards", rewards, (batch,), "[B] (one per completion)")
    if correct is not None:
        check_tensor("correct", correct, ndim=(1,), expected="[B]")
        check_shape("correct", correct, (batch,), "[B] (one per completion)")


def _advantages(rewards, logps_for_confidence, mask, group_size, group_ids, estimator, correct, adv_kwargs):
    # with group_ids, group_size only states the expected count (checked above)
    size = group_size if group_ids is None else None
    needs_logps = estimator == "lens"
    return group_advantages(rewards, group_size=size, group_ids=group_ids, estimator=estimator,
                            old_logps=logps_for_confidence.detach() if needs_logps else None,
                            mask=mask if needs_logps else None, correct=correct, **adv_kwargs)


def _lens_step(device, rewards, mask, old_logps, group_size, group_ids, estimator, correct, adv_kwargs,
               logprobs_fn, two_stage_loss_fn, loss_kwargs):
    """The two paths shared by the logits and hidden variants (inputs validated by the caller, once;
    the internal ops below do not check them again)."""
    if old_logps is not None:  # advantages from the sampling policy, then the backend's fused loss head
        adv, adv_metrics = _advantages(rewards, old_logps, mask, group_size, group_ids, estimator, correct,
                                       adv_kwargs)
        loss, loss_metrics = two_stage_loss_fn(adv)
    else:
        # phase 1: one pass (the backward of this op is phase 3); phase 2: [B]-sized group statistics
        logps, entropy = logprobs_fn()
        adv, adv_metrics = _advantages(rewards, logps, mask, group_size, group_ids, estimator, correct,
                                       adv_kwargs)
        loss, loss_metrics = policy_loss_op(logps, adv, mask, None, loss_kwargs["ref_logps"], entropy,
                                            loss_kwargs["is_weights"], loss_kwargs["config"], loss_kwargs["num_tokens"],
                                            loss_kwargs["num_sequences"])
    metrics: Dict[str, torch.Tensor] = dict(loss_metrics)
    metrics.update(adv_metrics)
    metrics["advantages"] = adv
    metrics["on_policy"] = torch.tensor(1.0 if old_logps is None else 0.0, device=device)
    return loss, metrics


def lens_policy_loss_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    advantage_config: Optional[AdvantageConfig] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    correct: Optional[torch.Tensor] = None,
    config: Optional[LossConfig] = None,
    temperature=1.0,
    num_tokens=None,
    num_sequences=None,
    grad_scale: float = 1.0,
    inplace: bool = False,
    backend: str = "auto",
    **deprecated_advantage_options,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """From logits and rewards to the loss, with the group advantages computed inside.

    Args:
        logits: [B, T, V] (a strided view is fine), targets: [B, T], mask: [B, T] (0/1), rewards:
            [B] (a wrong length is a ValueError naming ``rewards``). Special inputs and checks as in
            ``policy_loss_from_logits`` and ``group_advantages`` (B = 0 gives a zero loss).
        group_size: completions per group (contiguous groups), or with ``group_ids`` the expected
            count of every group, which is then checked; group_ids: [B] group of each completion.
        advantage_config: a ``lens_kernels.AdvantageConfig`` (the estimator, default "lens", and the
            other options of ``group_advantages``). The separate keywords of earlier releases
            (``estimator=``, ``eps=``, ``lens_alpha=``, ...) still work, with a DeprecationWarning.
        old_logps: [B, T] sampling-policy log-probs. None means on-policy: the confidence and the
            ratio's reference are the current log-probs (rho = 1, with its gradient).
        correct: as in ``group_advantages``; the loss options (ref_logps, is_weights, config,
        temperature, num_tokens, num_sequences, grad_scale, inplace, backend) those of
        ``policy_loss_from_logits``.

    Returns:
        (loss, metrics): the loss metrics, the advantage metrics (group kinds, mean |A| per kind,
        confidences), ``advantages`` [B] and ``on_policy`` (1.0 for the fused on-policy path, 0.0
        when old_logps were given and the loss took the two-stage path).
    """
    temperature = validate_logits_inputs(logits, targets, mask, temperature, ndim=(3,), expected="[B, T, V]",
                                         mask_required=True)
    _check_rewards(logits.shape[0], rewards, correct)
    _check_grad_scale(grad_scale)
    _check_whole_groups(logits.shape[0], group_size, group_ids)
    loss_kwargs = _loss_kwargs(targets, logits.device, mask, old_logps, ref_logps, is_weights, config, num_tokens,
                               num_sequences)
    if inplace:
        from ._validation import check_inplace_buffer
        check_inplace_buffer("logits", logits)
    adv_kwargs = advantage_options(advantage_config, deprecated_advantage_options)
    estimator = adv_kwargs.pop("estimator")
    name = backends.choose("policy_loss_from_logits", logits, backend)
    return _lens_step(
        logits.device, rewards, mask, old_logps, group_size, group_ids, estimator, correct, adv_kwargs,
        lambda: token_logprobs_op(logits, targets, mask, temperature, name, inplace),
        lambda adv: policy_loss_from_logits_op(logits, targets, mask, adv, old_logps, loss_kwargs["ref_logps"],
                                               loss_kwargs["is_weights"], temperature, loss_kwargs["config"],
                                               loss_kwargs["num_tokens"], loss_kwargs["num_sequences"], grad_scale,
                                               inplace, name),
        loss_kwargs)


def _loss_kwargs(targets, device, mask, old_logps, ref_logps, is_weights, config, num_tokens, num_sequences):
    """The loss options, checked once (the advantages come later, from the group statistics)."""
    config, num_tokens, num_sequences = validate_loss_inputs(
        tuple(targets.shape), device, None, mask, old_logps, ref_logps, is_weights, config, num_tokens,
        num_sequences, mask_checked=True)
    return dict(ref_logps=ref_logps, is_weights=is_weights, config=config, num_tokens=num_tokens,
                num_sequences=num_sequences)


def lens_policy_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    advantage_config: Optional[AdvantageConfig] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    correct: Optional[torch.Tensor] = None,
    config: Optional[LossConfig] = None,
    temperature=1.0,
    num_tokens=None,
    num_sequences=None,
    grad_scale: float = 1.0,
    mode: str = "fast",
    backend: str = "auto",
    **deprecated_advantage_options,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``lens_policy_loss_from_logits`` from hidden states [B, T, H] and the lm_head weight [V, H].

    On-policy, phase 1 is ``linear_token_logprobs`` (never materializing [B, T, V]) and phase 3 its
    backward; with ``old_logps`` the loss takes ``policy_loss_from_hidden`` in ``mode``.
    """
    temperature = validate_hidden_inputs(hidden, weight, bias, targets, mask, temperature, ndim=(3,),
                                         expected="[B, T, H]", mask_required=True)
    _check_rewards(hidden.shape[0], rewards, correct)
    _check_grad_scale(grad_scale)
    _check_whole_groups(hidden.shape[0], group_size, group_ids)
    if mode not in HIDDEN_MODES:
        raise ValueError(f"mode must be one of {list(HIDDEN_MODES)}, got {mode!r}")
    loss_kwargs = _loss_kwargs(targets, hidden.device, mask, old_logps, ref_logps, is_weights, config, num_tokens,
                               num_sequences)
    adv_kwargs = advantage_options(advantage_config, deprecated_advantage_options)
    estimator = adv_kwargs.pop("estimator")
    return _lens_step(
        hidden.device, rewards, mask, old_logps, group_size, group_ids, estimator, correct, adv_kwargs,
        lambda: linear_token_logprobs_op(hidden, weight, bias, targets, mask, temperature,
                                         backends.choose("linear_token_logprobs", hidden, backend)),
        lambda adv: policy_loss_from_hidden_op(hidden, weight, bias, targets, mask, adv, old_logps,
                                               loss_kwargs["ref_logps"], loss_kwargs["is_weights"], temperature,
                                               loss_kwargs["config"], loss_kwargs["num_tokens"],
                                               loss_kwargs["num_sequences"], grad_scale, mode, backend),
        loss_kwargs)
