"""OpenRLHF adapter: ``patch()`` makes OpenRLHF's ``PolicyLoss`` run ``lk.policy_loss`` and its group
normalization of advantages run ``lk.group_advantages`` (adding LENS); ``unpatch()`` restores both.

    from lens_kernels.integrations import openrlhf as lk_openrlhf
    lk_openrlhf.patch()          # before OpenRLHF builds its actor

``LensPolicyLoss`` subclasses OpenRLHF's ``PolicyLoss``: the same constructor and the same return tuple
``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``, with OpenRLHF's conventions: the +-20
log-ratio clamp for ``ppo`` (none for ``gspo``), dual clip, token-level or per-sample aggregation
(``gspo`` forces per-sample), and the global ``batch_num_tokens`` / ``global_batch_size`` / ``dp_size``.
Train/rollout IS correction (``is_correction_level != "off"``) falls back to OpenRLHF's own forward with
one warning.

``patch()`` also replaces ``RemoteExperienceMaker.compute_advantages_and_returns`` (when
``openrlhf.trainer.ppo_utils.experience_maker`` imports) for ``args.algo.advantage.estimator`` in
``("group_norm", "lens")``: the group statistics come from ``lk.group_advantages(rewards,
group_size=n_samples_per_prompt, eps=lk.TRAINER_EPS["openrlhf"])``; every other step is OpenRLHF's
(length penalties, reordering by ``experience.index``, the ``group_reward_std`` info,
``compute_reward`` with the KL and the reward clip, ``get_cumulative_returns``; these estimators get no
final whitening in OpenRLHF, nor here). ``"lens"`` takes the old log-probs from
``experience.action_log_probs`` under ``experience.action_mask``, the weight ``lens_alpha`` from
``args.algo.advantage.lens_alpha`` (default 0.25), needs binary rewards after the length penalties,
and adds the per-sample ``lens_confidence`` info. OpenRLHF's CLI does not list ``"lens"`` among its
``--algo.advantage.estimator`` choices: set ``args.algo.advantage.estimator = "lens"`` after parsing.
Every other estimator runs OpenRLHF's own method.

OpenRLHF runs the loss and the experience maker inside Ray actors: call ``patch()`` in those processes
(for example from Ray's ``runtime_env={"worker_process_setup_hook": ...}``).
"""
from __future__ import annotations

import importlib
import itertools
import sys
import warnings

import torch

from .. import TRAINER_EPS, LossConfig, group_advantages, policy_loss
from . import require

LOG_RATIO_CLAMP = 20.0
# modules that hold a reference to PolicyLoss once imported
_HOLDERS = ("openrlhf.models.loss", "openrlhf.models", "openrlhf.trainer.ray.ppo_actor")
_EXPERIENCE_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"
GROUP_ESTIMATORS = ("group_norm", "lens")
_originals = {}
_classes = {}
_method_originals = {}


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


def _experience_maker_module():
    """OpenRLHF's experience-maker module, or None where it cannot be imported (it needs vLLM)."""
    module = sys.modules.get(_EXPERIENCE_MAKER)
    if module is None:
        try:
            module = importlib.import_module(_EXPERIENCE_MAKER)
        except ImportError:
            return None
    return module if hasattr(module, "RemoteExperienceMaker") else None


def _in_prompt_order(values, indices):
    """Rows of ``values`` (concatenated experiences) moved to their ``experience.index`` slots."""
    ordered = torch.empty_like(values)
    ordered[indices] = values
    return ordered


def _padded_cat(tensors):
    """Concatenate [b_i, A_i] tensors along the batch, zero-padded to the longest A_i."""
    width = max(t.size(1) for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.size(1))) for t in tensors], dim=0)


def group_normalized_rewards(experiences, rewards, indices, args, correct=None):
    """OpenRLHF's per-sample group baseline for ``group_norm`` (and LENS) from ``lk.group_advantages``,
    in prompt order, with its metrics. ``correct`` [N] (prompt order): graded rewards for LENS."""
    estimator = args.algo.advantage.estimator
    kwargs = dict(group_size=args.rollout.n_samples_per_prompt, eps=TRAINER_EPS["openrlhf"])
    if estimator == "group_norm":
        return group_advantages(rewards, estimator="grpo", **kwargs)
    if any(e.action_log_probs is None for e in experiences):
        raise ValueError("estimator='lens' needs experience.action_log_probs (the old log-probs) on every experience")
    old_logps = _in_prompt_order(_padded_cat([e.action_log_probs.float() for e in experiences]), indices)
    mask = _in_prompt_order(_padded_cat([e.action_mask.float() for e in experiences]), indices)
    try:
        return group_advantages(rewards, estimator="lens", old_logps=old_logps, mask=mask, correct=correct,
                                lens_alpha=float(getattr(args.algo.advantage, "lens_alpha", 0.25)), **kwargs)
    except ValueError as exc:
        if "binary" not in str(exc):
            raise
        detail = str(exc).split("; pass correct=")[0]  # correct= is the core API's, not an OpenRLHF option
        raise ValueError("LENS needs to know which samples are correct: set --algo.advantage.lens_correct_threshold "
                         "<reward of a correct answer> (read on the reward before OpenRLHF's length penalties). "
                         "Without it the rewards must be 0 or 1 (graded rewards and length penalties are not) "
                         f"({detail})") from exc


_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def lens_config_warnings(args) -> None:
    """One warning each for the OpenRLHF settings that silence LENS."""
    if getattr(args.algo.advantage, "estimator", None) != "lens":
        return
    if getattr(args.algo, "dynamic_filtering_enable", False):
        _warn_once("dynamic_filtering", (
            "lens_kernels: --algo.dynamic_filtering_enable drops the groups whose rewards fall outside "
            "--algo.dynamic_filtering_range, such as the all-wrong groups that LENS turns into a learning "
            "signal; leave it off with --algo.advantage.estimator lens"))
    if getattr(args.rollout, "n_samples_per_prompt", 2) < 2:
        _warn_once("groups_of_one", "lens_kernels: LENS needs --rollout.n_samples_per_prompt >= 2; "
                                    "with 1 every advantage is 0")


def _lens_compute_advantages_and_returns(original, module):
    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences):
        """OpenRLHF's method with the group statistics of ``lk.group_advantages`` (group_norm, lens)."""
        args = self.strategy.args
        if args.algo.advantage.estimator not in GROUP_ESTIMATORS:
            return original(self, experiences)
        lens_config_warnings(args)
        for experience in experiences:  # OpenRLHF: at least fp32 for penalties and group statistics
            experience.rewards = experience.rewards.to(torch.promote_types(experience.rewards.dtype, torch.float32))
        n_samples = args.rollout.n_samples_per_prompt
        exp_len = [len(experience.index) for experience in experiences]
        indices = torch.tensor(list(itertools.chain.from_iterable(experience.index for experience in experiences)))
        threshold = getattr(args.algo.advantage, "lens_correct_threshold", None)
        correct = None
        if args.algo.advantage.estimator == "lens" and threshold is not None:  # before the length penalties
            raw = _in_prompt_order(torch.cat([experience.rewards for experience in experiences]), indices)
            correct = raw >= float(threshold)
        module.apply_length_penalties(experiences, args)
        rewards = _in_prompt_order(torch.cat([experience.rewards for experience in experiences]), indices)
        if n_samples > 1:
            stds = rewards.reshape(-1, n_samples).std(-1, keepdim=True).repeat(1, n_samples).reshape(-1)
            for experience, std in zip(experiences, stds[indices].split(exp_len)):
                experience.info["group_reward_std"] = std
        advantages, stats = group_normalized_rewards(experiences, rewards, indices, args, correct)
        per_experience = advantages.to(rewards.dtype)[indices].split(exp_len)
        if "confidence" in stats:
            for experience, confidence in zip(experiences, stats["confidence"][indices].split(exp_len)):
                experience.info["lens_confidence"] = confidence

        for experience, reward in zip(experiences, per_experience):
            reward = module.compute_reward(reward, self.kl_ctl.value, experience.kl,
                                           action_mask=experience.action_mask,
                                           reward_clip_range=args.reward.clip_range)
            if args.algo.advantage.gamma != 1.0:
                module.logger.warning(f"gamma is set to 1.0 for {args.algo.advantage.estimator}")
                args.algo.advantage.gamma = 1.0
            experience.returns = self.get_cumulative_returns(reward, experience.action_mask,
                                                             args.algo.advantage.gamma)
            experience.advantages = experience.returns.clone()
            experience.info["return"] = reward.sum(dim=-1)
            experience.kl = None
        return experiences

    return compute_advantages_and_returns


def patch() -> type:
    """Replace ``PolicyLoss`` in OpenRLHF's modules (those imported, and ``openrlhf.models.loss``) and,
    where the experience maker imports, its ``compute_advantages_and_returns``."""
    loss_module = sys.modules.get("openrlhf.models.loss") or require(
        "openrlhf.models.loss", "openrlhf", "lens_kernels.integrations.openrlhf")
    base = _originals.get("openrlhf.models.loss", loss_module.PolicyLoss)
    cls = _classes.setdefault("cls", _lens_policy_loss_class(base))
    for name in _HOLDERS:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "PolicyLoss"):
            _originals.setdefault(name, module.PolicyLoss)
            module.PolicyLoss = cls
    maker_module = _experience_maker_module()
    if maker_module is not None and not _method_originals:
        maker = maker_module.RemoteExperienceMaker
        original = maker.__dict__["compute_advantages_and_returns"]
        _method_originals[maker] = original
        maker.compute_advantages_and_returns = _lens_compute_advantages_and_returns(original, maker_module)
    return cls


def worker_setup() -> None:
    """Ray ``worker_process_setup_hook``: ``patch()`` in every worker process of the job, before OpenRLHF's
    actors import their modules (``lens_kernels.integrations.openrlhf_cli`` sets it)."""
    patch()


def unpatch() -> None:
    """Restore OpenRLHF's ``PolicyLoss`` and ``compute_advantages_and_returns`` where ``patch()`` replaced them."""
    for name, original in _originals.items():
        module = sys.modules.get(name)
        if module is not None:
            module.PolicyLoss = original
    _originals.clear()
    for maker, original in _method_originals.items():
        maker.compute_advantages_and_returns = original
    _method_originals.clear()
