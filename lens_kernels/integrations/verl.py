"""verl adapter, loaded by verl itself through ``VERL_USE_EXTERNAL_MODULES=lens_kernels.integrations.verl``.

Importing this module:

- registers the ``lens`` advantage estimator (``register_adv_est``) with verl's estimator signature;
- registers the ``lens`` policy loss (``register_policy_loss``), verl's vanilla PPO loss (log-ratio
  clamp +-20, dual clip ``clip_ratio_c``, ``rollout_is_weights``, every ``loss_agg_mode``,
  ``global_batch_info``) computed by ``lk.policy_loss``, returning verl's metric names;
- wraps ``verl.trainer.ppo.ray_trainer.compute_advantage`` so that the estimator receives the batch's
  ``old_log_probs``, which verl's registry does not pass;
- with ``LENS_KERNELS_VERL_FUSED_LOGPROBS=1``, swaps verl's fused log-prob kernel
  (``FusedLinearForPPO``, used with ``use_fused_kernels=True``) for ``lk.linear_token_logprobs``.

Hydra overrides a user sets::

    VERL_USE_EXTERNAL_MODULES=lens_kernels.integrations.verl python -m verl.trainer.main_ppo \\
        algorithm.adv_estimator=lens +algorithm.lens_alpha=0.25 \\
        actor_rollout_ref.actor.policy_loss.loss_mode=lens \\
        actor_rollout_ref.rollout.n=8          # G, the group size (uid groups)

LENS needs ``old_log_probs`` in the batch, which verl computes unless the rollout's log-probs are
used as old ones; rewards must be binary (0/1).

Multi-GPU: verl fills ``global_batch_info`` (global token and sequence counts, ``dp_size``) in recent
versions, and the loss uses it as verl does. Where it does not, pass verl's process groups through
``set_parallel_layout(lk.ParallelLayout(dp_group=..., tp_group=..., vocab_start=...))`` in each worker
(FSDP: the actor mesh's data-parallel group; Megatron: ``mpu.get_data_parallel_group()`` and, for a
vocab-parallel lm_head, ``mpu.get_tensor_model_parallel_group()``): the loss then takes its
normalizers over the DP group (one all-reduce, no host sync) and the swapped fused log-prob kernel runs
vocab-parallel. ``GLOBAL_BATCH_HOOK`` (``(response_mask, global_batch_info) -> global_batch_info``)
remains for custom normalizers.
"""
from __future__ import annotations

import contextvars
import os
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
import torch

import torch.distributed as dist

from .. import LossConfig, ParallelLayout, group_advantages, linear_token_logprobs, policy_loss
from . import require

core_algos = require("verl.trainer.ppo.core_algos", "verl", "lens_kernels.integrations.verl")

VERL_EPS = 1e-6
LOG_RATIO_CLAMP = 20.0
_SEQUENCE_MODES = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_old_log_probs: contextvars.ContextVar = contextvars.ContextVar("lens_verl_old_log_probs", default=None)

# Custom global normalizers: (response_mask, global_batch_info) -> global_batch_info.
GLOBAL_BATCH_HOOK: Optional[Callable[[torch.Tensor, dict], dict]] = None
_LAYOUT: Optional[ParallelLayout] = None


def set_parallel_layout(layout: Optional[ParallelLayout]) -> None:
    """verl's process groups for this worker's lens loss and fused log-prob kernel (None: one process)."""
    global _LAYOUT
    if layout is not None and not isinstance(layout, ParallelLayout):
        raise TypeError(f"layout must be a lens_kernels.ParallelLayout or None, got {type(layout).__name__}")
    _LAYOUT = layout


def _group_ids(index, device) -> torch.Tensor:
    """verl's ``uid`` array (any hashable ids) as dense integer group ids."""
    _, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    return torch.as_tensor(inverse, dtype=torch.long, device=device)


def _get(cfg: Any, name: str, default: Any) -> Any:
    if cfg is None:
        return default
    getter = getattr(cfg, "get", None)
    return getter(name, default) if getter is not None else getattr(cfg, name, default)


@core_algos.register_adv_est("lens")
def compute_lens_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = VERL_EPS,
    norm_adv_by_std_in_grpo: bool = True,
    config: Optional[Any] = None,
    old_log_probs: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LENS advantages in verl's estimator form: (advantages, returns), both [bs, response_length].

    ``old_log_probs`` [bs, response_length] comes from the batch (the wrapped ``compute_advantage``
    supplies it); ``config.lens_alpha`` (default 0.25) weights negative groups. Groups are verl's
    ``uid`` index; the std is Bessel-corrected and ``epsilon`` is verl's 1e-6.
    """
    old = old_log_probs if old_log_probs is not None else _old_log_probs.get()
    if old is None:
        raise ValueError(
            "old_log_probs [bs, response_length] is required by the 'lens' estimator: import "
            "lens_kernels.integrations.verl (VERL_USE_EXTERNAL_MODULES) so compute_advantage supplies it")
    scores = token_level_rewards.sum(dim=-1)
    advantages, _ = group_advantages(
        scores, group_ids=_group_ids(index, scores.device), estimator="lens", old_logps=old, mask=response_mask,
        eps=epsilon, scale="group" if norm_adv_by_std_in_grpo else "none",
        lens_alpha=float(_get(config, "lens_alpha", 0.25)))
    advantages = advantages.unsqueeze(-1) * response_mask
    return advantages, advantages


def loss_config_from_actor(config: Any, loss_agg_mode: str, global_batch_info: dict) -> LossConfig:
    """The ``LossConfig`` of verl's vanilla loss for an actor config; KL and entropy stay in verl."""
    view = SimpleNamespace(
        clip_ratio=_get(config, "clip_ratio", 0.2), clip_ratio_low=_get(config, "clip_ratio_low", None),
        clip_ratio_high=_get(config, "clip_ratio_high", None), clip_ratio_c=_get(config, "clip_ratio_c", 3.0),
        loss_agg_mode=loss_agg_mode, policy_loss={"loss_mode": "vanilla"})
    return LossConfig.from_verl(
        view, beta=0.0, entropy_coef=0.0, dp_size=float(global_batch_info.get("dp_size", 1) or 1),
        loss_norm_length=global_batch_info.get("loss_scale_factor"))


@core_algos.register_policy_loss("lens")
def compute_policy_loss_lens(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's vanilla PPO policy loss (``compute_policy_loss_vanilla`` + ``agg_loss``) by ``lk.policy_loss``.

    Returns ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})`` as verl does.
    """
    if config is None:
        raise ValueError("config (the actor config) is required by the 'lens' policy loss, as by verl's")
    info = dict(_get(config, "global_batch_info", None) or {})
    if GLOBAL_BATCH_HOOK is not None:
        info = GLOBAL_BATCH_HOOK(response_mask, info)
    cfg = loss_config_from_actor(config, loss_agg_mode, info)
    num_tokens = info.get("batch_num_tokens")
    num_sequences = info.get("global_batch_size")
    if cfg.dp_size > 1 and (num_tokens if loss_agg_mode == "token-mean" else num_sequences) is None \
            and loss_agg_mode != "token-sum":
        raise ValueError(f"global_batch_info must give the global normalizer when dp_size > 1 ({loss_agg_mode})")
    dp_group = _LAYOUT.dp_group if (_LAYOUT is not None and not info) else None
    if num_sequences is None and loss_agg_mode in _SEQUENCE_MODES:
        # verl averages over the sequences that have at least one loss token (over the DP group)
        num_sequences = (response_mask.sum(-1) > 0).sum()
        if dp_group is not None:
            dist.all_reduce(num_sequences, group=dp_group)
        num_sequences = num_sequences.clamp(min=1)
    loss, metrics = policy_loss(log_prob, advantages, response_mask, old_logps=old_log_prob,
                                is_weights=rollout_is_weights, config=cfg, num_tokens=num_tokens,
                                num_sequences=num_sequences, process_group=dp_group)
    with torch.no_grad():
        mask = response_mask.to(log_prob.dtype)
        count = mask.sum().clamp(min=1.0)
        log_ratio = (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)
        clipped = torch.maximum(-advantages * ratio,
                                -advantages * ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.eps_high))
        lower = (clipped > -advantages * cfg.dual_clip) & (advantages < 0)
        pg_metrics = {
            "actor/pg_clipfrac": metrics["clip_frac"].item(),
            "actor/ppo_kl": ((-log_ratio * mask).sum() / count).item(),
            "actor/pg_clipfrac_lower": ((lower * mask).sum() / count).item(),
        }
    return loss, pg_metrics


def _wrap_compute_advantage(original):
    if getattr(original, "_lens_wrapped", False):
        return original

    def compute_advantage(data, *args, **kwargs):
        old = data.batch["old_log_probs"] if "old_log_probs" in data.batch.keys() else None
        token = _old_log_probs.set(old)
        try:
            return original(data, *args, **kwargs)
        finally:
            _old_log_probs.reset(token)

    compute_advantage._lens_wrapped = True
    compute_advantage.__wrapped__ = original
    compute_advantage.__doc__ = original.__doc__
    return compute_advantage


def install_compute_advantage_wrapper(module_names=("verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.v1.utils")):
    """Wrap ``compute_advantage`` in each named module that imports (those that do not are skipped)."""
    import importlib

    wrapped = []
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except Exception:  # a trainer module whose heavy deps are absent: nothing there to wrap
            continue
        if hasattr(module, "compute_advantage"):
            module.compute_advantage = _wrap_compute_advantage(module.compute_advantage)
            wrapped.append(name)
    return wrapped


def lens_fused_linear_forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
    """``FusedLinearForPPO.forward`` by ``lk.linear_token_logprobs``: (log_probs, entropy)."""
    layout = _LAYOUT.logprob_kwargs() if _LAYOUT is not None else {}
    return linear_token_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                 temperature=temperature, return_entropy=True, **layout)


def swap_fused_logprob_kernel(enable: bool = True) -> bool:
    """Make verl's ``FusedLinearForPPO`` (``use_fused_kernels=True``) run ``lk.linear_token_logprobs``;
    ``enable=False`` restores verl's. Returns whether the swap is active."""
    torch_functional = require("verl.utils.experimental.torch_functional", "verl", "swap_fused_logprob_kernel")
    cls = torch_functional.FusedLinearForPPO
    if not hasattr(cls, "_verl_forward"):
        cls._verl_forward = cls.forward
    cls.forward = lens_fused_linear_forward if enable else cls._verl_forward
    return enable


install_compute_advantage_wrapper()
if os.environ.get("LENS_KERNELS_VERL_FUSED_LOGPROBS", "0") == "1":
    swap_fused_logprob_kernel(True)
