"""OpenRLHF adapter: ``patch()`` makes OpenRLHF's ``PolicyLoss`` run ``lk.policy_loss``; ``unpatch()`` restores it.

    from lens_kernels.integrations import openrlhf as lk_openrlhf
    lk_openrlhf.patch()          # before OpenRLHF builds its actor

``LensPolicyLoss`` subclasses OpenRLHF's ``PolicyLoss``: the same constructor and the same return tuple
``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``, with OpenRLHF's conventions: the +-20
log-ratio clamp for ``ppo`` (none for ``gspo``), dual clip, token-level or per-sample aggregation
(``gspo`` forces per-sample), and the global ``batch_num_tokens`` / ``global_batch_size`` / ``dp_size``.
Train/rollout IS correction (``is_correction_level != "off"``) falls back to OpenRLHF's own forward with
one warning.

Not done: OpenRLHF's group normalization of advantages is inline in
``RemoteExperienceMaker.compute_advantages_and_returns``, in a module that imports vLLM; the adapter
does not patch it yet. ``lk.group_advantages(rewards, group_size=n_samples_per_prompt,
eps=lk.TRAINER_EPS["openrlhf"])`` computes OpenRLHF's ``group_norm`` (and LENS with
``estimator="lens"``) for a caller that wires it in.
"""
from __future__ import annotations

import sys
import warnings

import torch

from .. import LossConfig, policy_loss
from . import require

LOG_RATIO_CLAMP = 20.0
# modules that hold a reference to PolicyLoss once imported
_HOLDERS = ("openrlhf.models.loss", "openrlhf.models", "openrlhf.trainer.ray.ppo_actor")
_originals = {}
_classes = {}


def loss_config_for(module) -> LossConfig:
    """The ``LossConfig`` of an OpenRLHF ``PolicyLoss`` instance's attributes."""
    gspo = module.policy_loss_type == "gspo"
    return LossConfig(
        policy_loss="ppo", ratio_level="sequence" if gspo else "token",
        epsilon_low=float(module.clip_eps_low), epsilon_high=float(module.clip_eps_high),
        dual_clip=None if module.dual_clip is None else float(module.dual_clip),
        log_ratio_clamp=None if gspo else LOG_RATIO_CLAMP,
        loss_agg_mode="token-mean" if module.token_level_loss else "seq-mean-token-mean")


def _lens_policy_loss_class(base):
    class LensPolicyLoss(base):
        """OpenRLHF's ``PolicyLoss`` computed by ``lk.policy_loss`` (same constructor and outputs)."""

        _lens_warned = False

        def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                    dp_size=1, batch_num_tokens=None, global_batch_size=None):
            if self.is_correction_level != "off" or self.policy_loss_type not in ("ppo", "gspo"):
                if not LensPolicyLoss._lens_warned:
                    warnings.warn("lens_kernels: OpenRLHF IS correction is not supported; using OpenRLHF's "
                                  "PolicyLoss", stacklevel=2)
                    LensPolicyLoss._lens_warned = True
                return super().forward(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs,
                                       dp_size, batch_num_tokens, global_batch_size)
            mask = torch.ones_like(log_probs) if action_mask is None else action_mask
            config = loss_config_for(self)
            num_tokens = num_sequences = None
            if self.token_level_loss and batch_num_tokens is not None:
                num_tokens, config = batch_num_tokens, config.replace(dp_size=float(dp_size))
            elif not self.token_level_loss:
                if global_batch_size is not None:
                    num_sequences, config = global_batch_size, config.replace(dp_size=float(dp_size))
                else:  # OpenRLHF averages over the samples with at least one action token
                    num_sequences = (mask.sum(-1) > 0).sum().clamp(min=1)
            if advantages.dim() == 2 and advantages.size(1) == 1:
                advantages = advantages.squeeze(1)
            loss, metrics = policy_loss(log_probs, advantages, mask, old_logps=old_log_probs, config=config,
                                        num_tokens=num_tokens, num_sequences=num_sequences)
            with torch.no_grad():
                m = mask.to(log_probs.dtype)
                ppo_kl = (-(log_probs - old_log_probs) * m).sum() / m.sum()
            return loss, metrics["clip_frac"], ppo_kl, None, None

    LensPolicyLoss.__name__ = LensPolicyLoss.__qualname__ = "LensPolicyLoss"
    return LensPolicyLoss


def patch() -> type:
    """Replace ``PolicyLoss`` in OpenRLHF's modules (those imported, and ``openrlhf.models.loss``)."""
    loss_module = sys.modules.get("openrlhf.models.loss") or require(
        "openrlhf.models.loss", "openrlhf", "lens_kernels.integrations.openrlhf")
    base = _originals.get("openrlhf.models.loss", loss_module.PolicyLoss)
    cls = _classes.setdefault("cls", _lens_policy_loss_class(base))
    for name in _HOLDERS:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "PolicyLoss"):
            _originals.setdefault(name, module.PolicyLoss)
            module.PolicyLoss = cls
    return cls


def unpatch() -> None:
    """Restore OpenRLHF's ``PolicyLoss`` everywhere ``patch()`` replaced it."""
    for name, original in _originals.items():
        module = sys.modules.get(name)
        if module is not None:
            module.PolicyLoss = original
    _originals.clear()
