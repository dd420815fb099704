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

from typing import Dict, Optional, Tuple

import torch

from ._validation import FLOAT_DTYPES, INDEX_DTYPES, check_shape, check_tensor, value_checks_enabled
from .advantages import group_advantages
from .config import LossConfig
from .logprobs import linear_token_logprobs, token_logprobs
from .loss import _check_grad_scale, policy_loss, policy_loss_from_hidden, policy_loss_from_logits


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
    """The two paths shared by the logits and hidden variants."""
    if old_logps is not None:  # advantages from the sampling policy, then the backend's fused loss head
        adv, adv_metrics = _advantages(rewards, old_logps, mask, group_size, group_ids, estimator, correct,
                                       adv_kwargs)
        loss, loss_metrics = two_stage_loss_fn(adv)
    else:
        # phase 1: one pass (the backward of this op is phase 3); phase 2: [B]-sized group statistics
        logps, entropy = logprobs_fn()
        adv, adv_metrics = _advantages(rewards, logps, mask, group_size, group_ids, estimator, correct,
                                       adv_kwargs)
        loss, loss_metrics = policy_loss(logps, adv, mask, entropy=entropy, **loss_kwargs)
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
    estimator: str = "lens",
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
    scale: Optional[str] = None,
    eps: float = 1e-4,
    std_unbiased: bool = True,
    lens_alpha: float = 0.25,
    lens_d_estimate: str = "mean",
    lens_groups: str = "all",
    nan_rewards: str = "raise",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """From logits and rewards to the loss, with the group advantages computed inside.

    Args:
        logits: [B, T, V] (a strided view is fine), targets: [B, T], mask: [B, T] (0/1), rewards:
            [B] (a wrong length is a ValueError naming ``rewards``). Special inputs and checks as in
            ``policy_loss_from_logits`` and ``group_advantages`` (B = 0 gives a zero loss).
        group_size: completions per group (contiguous groups), or with ``group_ids`` the expected
            count of every group, which is then checked; group_ids: [B] group of each completion.
        estimator: any estimator of ``group_advantages`` ("lens", "grpo", "dr_grpo", "rloo").
        old_logps: [B, T] sampling-policy log-probs. None means on-policy: the confidence and the
            ratio's reference are the current log-probs (rho = 1, with its gradient).
        The advantage options (scale, eps, std_unbiased, lens_alpha, lens_d_estimate, lens_groups,
        nan_rewards, correct) are those of ``group_advantages``; the loss options (ref_logps,
        is_weights, config, temperature, num_tokens, num_sequences, grad_scale, inplace, backend)
        those of ``policy_loss_from_logits``.

    Returns:
        (loss, metrics): the loss metrics, the advantage metrics (group kinds, mean |A| per kind,
        confidences), ``advantages`` [B] and ``on_policy`` (1.0 for the fused on-policy path, 0.0
        when old_logps were given and the loss took the two-stage path).
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=(3,), expected="[B, T, V]")
    _check_rewards(logits.shape[0], rewards, correct)
    _check_grad_scale(grad_scale)
    _check_whole_groups(logits.shape[0], group_size, group_ids)
    adv_kwargs = dict(scale=scale, eps=eps, std_unbiased=std_unbiased, lens_alpha=lens_alpha,
                      lens_d_estimate=lens_d_estimate, lens_groups=lens_groups, nan_rewards=nan_rewards)
    loss_kwargs = dict(ref_logps=ref_logps, is_weights=is_weights, config=config, num_tokens=num_tokens,
                       num_sequences=num_sequences)
    return _lens_step(
        logits.device, rewards, mask, old_logps, group_size, group_ids, estimator, correct, adv_kwargs,
        lambda: token_logprobs(logits, targets, temperature=temperature, mask=mask, return_entropy=True,
                               inplace_backward=inplace, backend=backend),
        lambda adv: policy_loss_from_logits(logits, targets, mask, adv, old_logps=old_logps, temperature=temperature,
                                            grad_scale=grad_scale, inplace=inplace, backend=backend, **loss_kwargs),
        loss_kwargs)


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
    estimator: str = "lens",
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
    scale: Optional[str] = None,
    eps: float = 1e-4,
    std_unbiased: bool = True,
    lens_alpha: float = 0.25,
    lens_d_estimate: str = "mean",
    lens_groups: str = "all",
    nan_rewards: str = "raise",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``lens_policy_loss_from_logits`` from hidden states [B, T, H] and the lm_head weight [V, H].

    On-policy, phase 1 is ``linear_token_logprobs`` (never materializing [B, T, V]) and phase 3 its
    backward; with ``old_logps`` the loss takes ``policy_loss_from_hidden`` in ``mode``.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=(3,), expected="[B, T, H]")
    _check_rewards(hidden.shape[0], rewards, correct)
    _check_grad_scale(grad_scale)
    _check_whole_groups(hidden.shape[0], group_size, group_ids)
    adv_kwargs = dict(scale=scale, eps=eps, std_unbiased=std_unbiased, lens_alpha=lens_alpha,
                      lens_d_estimate=lens_d_estimate, lens_groups=lens_groups, nan_rewards=nan_rewards)
    loss_kwargs = dict(ref_logps=ref_logps, is_weights=is_weights, config=config, num_tokens=num_tokens,
                       num_sequences=num_sequences)
    return _lens_step(
        hidden.device, rewards, mask, old_logps, group_size, group_ids, estimator, correct, adv_kwargs,
        lambda: linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, mask=mask,
                                      return_entropy=True, backend=backend),
        lambda adv: policy_loss_from_hidden(hidden, weight, targets, mask, adv, bias=bias, old_logps=old_logps,
                                            temperature=temperature, grad_scale=grad_scale, mode=mode,
                                            backend=backend, **loss_kwargs),
        loss_kwargs)
