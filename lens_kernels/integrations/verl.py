"""verl adapter, loaded by verl itself through ``VERL_USE_EXTERNAL_MODULES=lens_kernels.integrations.verl``.

Importing this module:

- registers the ``lens`` advantage estimator (``register_adv_est``) with verl's estimator signature;
- registers the ``lens`` policy loss (``register_policy_loss``), verl's vanilla PPO loss (log-ratio
  clamp +-20, dual clip ``clip_ratio_c``, ``rollout_is_weights``, every ``loss_agg_mode``,
  ``global_batch_info``) computed by ``lk.policy_loss``, returning verl's metric names;
- wraps ``compute_advantage`` in ``verl.trainer.ppo.ray_trainer`` and ``verl.trainer.ppo.v1.utils`` when
  they are imported (an import hook), so that the estimator receives the batch's ``old_log_probs``,
  which verl's registry does not pass; a module without it is an ImportError;
- with ``LENS_KERNELS_VERL_FUSED_LOGPROBS=1``, swaps verl's fused log-prob kernel
  (``FusedLinearForPPO``, used with ``use_fused_kernels=True``) for ``lk.linear_token_logprobs``.

Hydra overrides a user sets (docs/verl.md)::

    VERL_USE_EXTERNAL_MODULES=lens_kernels.integrations.verl python -m verl.trainer.main_ppo \\
        algorithm.adv_estimator=lens +algorithm.lens_alpha=0.25 \\
        actor_rollout_ref.rollout.n=8          # G, the group size (uid groups)

LENS needs ``old_log_probs`` in the batch, which verl computes unless the rollout's log-probs are
used as old ones; rewards must be binary (0/1) unless ``+algorithm.lens_correct_threshold`` says what
is correct. Installing lens-kernels also registers this module as a verl plugin (entry point group
``verl.plugins``), so every process that imports verl loads it. On a Ray cluster, verl's
``get_ppo_ray_runtime_env`` forwards ``VERL_USE_EXTERNAL_MODULES`` to the workers, and (when the
driver opted in with that variable) ``main_ppo``'s ``ray.init`` is followed by ``check_ray_cluster``.

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
import importlib
import importlib.abc
import logging
import os
import sys
import warnings
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
_token_level_scores: contextvars.ContextVar = contextvars.ContextVar("lens_verl_scores", default=None)
logger = logging.getLogger(__name__)

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


_warned = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
        logger.warning(message)


@core_algos.register_adv_est("lens")
def compute_lens_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = VERL_EPS,
    norm_adv_by_std_in_grpo: Optional[bool] = None,
    config: Optional[Any] = None,
    old_log_probs: Optional[torch.Tensor] = None,
    token_level_scores: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LENS advantages in verl's estimator form: (advantages, returns), both [bs, response_length].

    ``old_log_probs`` [bs, response_length] comes from the batch (the wrapped ``compute_advantage``
    supplies it, and ``token_level_scores``, the rewards before verl's KL-in-reward). From the algorithm
    config: ``lens_alpha`` (default 0.25) weights negative groups; ``norm_adv_by_std_in_grpo`` (default
    True) as verl's GRPO reads it; ``lens_correct_threshold``: graded rewards (partial credit, +-1,
    penalties, KL in the reward): a completion is correct when its score (before the KL penalty) is >=
    this; without it the rewards must be binary. Groups are verl's ``uid`` index; the std is
    Bessel-corrected and ``epsilon`` is verl's 1e-6.
    """
    old = old_log_probs if old_log_probs is not None else _old_log_probs.get()
    if old is None:
        raise ValueError(
            "old_log_probs [bs, response_length] is required by the 'lens' estimator: import "
            "lens_kernels.integrations.verl (VERL_USE_EXTERNAL_MODULES) so compute_advantage supplies it")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_get(config, "norm_adv_by_std_in_grpo", True))
    _, counts = np.unique(np.asarray(index, dtype=object).astype(str), return_counts=True)
    if counts.size and counts.min() < 2:
        _warn_once("groups_of_one", (
            "lens_kernels: the 'lens' estimator got groups of one completion (actor_rollout_ref.rollout.n=1?): "
            "their advantages are 0. LENS compares the G completions of a prompt: set rollout.n to G >= 2"))
    filter_groups = _get(config, "filter_groups", None)
    if filter_groups is not None and bool(_get(filter_groups, "enable", False)):
        _warn_once("filter_groups", (
            "lens_kernels: algorithm.filter_groups.enable=True drops the groups whose rewards are all equal, "
            "including the all-wrong groups that LENS turns into a learning signal; disable it with LENS"))
    scores = token_level_rewards.sum(dim=-1)
    threshold = _get(config, "lens_correct_threshold", None)
    correct = None
    if threshold is not None:
        verifier = token_level_scores if token_level_scores is not None else _token_level_scores.get()
        verifier = token_level_rewards if verifier is None else verifier
        correct = verifier.sum(dim=-1) >= float(threshold)
    try:
        advantages, _ = group_advantages(
            scores, group_ids=_group_ids(index, scores.device), estimator="lens", old_logps=old, mask=response_mask,
            eps=epsilon, scale="group" if norm_adv_by_std_in_grpo else "none", correct=correct,
            lens_alpha=float(_get(config, "lens_alpha", 0.25)))
    except ValueError as exc:
        if "binary" not in str(exc):
            raise
        detail = str(exc).split("; pass correct=")[0]  # correct= is the core API's, not a verl option
        raise ValueError(
            "LENS needs to know which responses are correct: set +algorithm.lens_correct_threshold=<score of a "
            "correct answer> (read on the score before the KL penalty). Without it the rewards must be 0 or 1 "
            f"(graded rewards and algorithm.use_kl_in_reward=True are not) ({detail})") from exc
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
        keys = data.batch.keys()
        tokens = [_old_log_probs.set(data.batch["old_log_probs"] if "old_log_probs" in keys else None),
                  _token_level_scores.set(data.batch["token_level_scores"] if "token_level_scores" in keys else None)]
        try:
            return original(data, *args, **kwargs)
        finally:
            _token_level_scores.reset(tokens[1])
            _old_log_probs.reset(tokens[0])

    compute_advantage._lens_wrapped = True
    compute_advantage.__wrapped__ = original
    compute_advantage.__doc__ = original.__doc__
    return compute_advantage


# verl's modules that call compute_advantage by a module-level name: the legacy trainer and the v1
# trainer (default in verl 0.9, through compute_advantage_for_multi_trajectories).
ADVANTAGE_MODULES = ("verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.v1.utils")


def _wrap_module(module) -> None:
    if not hasattr(module, "compute_advantage"):
        raise ImportError(
            f"lens_kernels: {module.__name__} has no compute_advantage to wrap (verl version not supported): "
            "the 'lens' estimator would not receive old_log_probs")
    module.compute_advantage = _wrap_compute_advantage(module.compute_advantage)


def install_compute_advantage_wrapper(module_names=ADVANTAGE_MODULES):
    """Import each named module and wrap its ``compute_advantage`` so the estimator receives the batch's
    ``old_log_probs``. A module that does not import, or has nothing to wrap, is an error."""
    import importlib

    for name in module_names:
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            raise ImportError(f"lens_kernels: cannot wrap {name}.compute_advantage: importing it failed ({exc!r}); "
                              "install verl with its trainer dependencies") from exc
        _wrap_module(module)
    return list(module_names)


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Wraps ``compute_advantage`` in verl's trainer modules when (and in whichever process) they are
    imported, so importing this adapter stays cheap in workers that never import the trainer."""

    def find_spec(self, name, path, target=None):
        if name not in ADVANTAGE_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                exec_module = spec.loader.exec_module

                def exec_and_wrap(module, _exec=exec_module):
                    _exec(module)
                    _wrap_module(module)

                spec.loader.exec_module = exec_and_wrap
                return spec
        return None


def _install_import_hook() -> None:
    for name in ADVANTAGE_MODULES:
        if name in sys.modules:
            _wrap_module(sys.modules[name])
    if not any(isinstance(finder, _WrapOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WrapOnImport())


# ----- running on a Ray cluster ------------------------------------------------------------------
FORWARDED_ENV = ("VERL_USE_EXTERNAL_MODULES", "LENS_KERNELS_VERL_FUSED_LOGPROBS")


def runtime_env_vars() -> dict:
    """The environment variables every Ray worker of a LENS run needs (those set in this process)."""
    return {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)}


def check_ray_cluster(timeout: float = 300.0) -> None:
    """In the driver, after ``ray.init``: fail now, before models load and a rollout runs, when a Ray
    worker's verl does not know the 'lens' estimator (the variable was not forwarded, or lens_kernels
    is not installed on the workers)."""
    import ray

    from ._ray_check import verl_lens_problem

    task = ray.remote(num_cpus=0, max_retries=0)(verl_lens_problem)
    try:
        problem = ray.get(task.remote(), timeout=timeout)
    except Exception as exc:  # lens_kernels itself may not import in the worker
        problem = repr(exc)
    if problem:
        raise RuntimeError(
            "lens_kernels: a Ray worker of this cluster cannot use algorithm.adv_estimator=lens: "
            f"{problem}. Install lens-kernels on every node, and forward the variable to the workers: "
            "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=lens_kernels.integrations.verl "
            "(done for you when verl builds its runtime env: see get_ppo_ray_runtime_env)")


def _patch_runtime_env() -> None:
    """verl's ``get_ppo_ray_runtime_env`` (called by the driver right before ``ray.init``) also forwards
    ``runtime_env_vars()`` to every worker, and the ``ray.init`` that follows checks the cluster."""
    try:
        constants = importlib.import_module("verl.trainer.constants_ppo")
    except Exception:  # pragma: no cover - verl without its trainer: nothing launches Ray here
        return
    original = getattr(constants, "_lens_original_runtime_env", constants.get_ppo_ray_runtime_env)

    def get_ppo_ray_runtime_env(*args, **kwargs):
        runtime_env = original(*args, **kwargs)
        runtime_env.setdefault("env_vars", {}).update(runtime_env_vars())
        if __name__ in os.environ.get("VERL_USE_EXTERNAL_MODULES", ""):  # opted in: check the cluster
            _check_after_next_ray_init()
        return runtime_env

    get_ppo_ray_runtime_env.__doc__ = original.__doc__
    constants._lens_original_runtime_env = original
    constants.get_ppo_ray_runtime_env = get_ppo_ray_runtime_env
    for name in ("verl.trainer.main_ppo", "__main__"):  # a launcher that bound the name before this import
        module = sys.modules.get(name)
        if module is not None and getattr(module, "get_ppo_ray_runtime_env", None) is original:
            module.get_ppo_ray_runtime_env = get_ppo_ray_runtime_env


def _check_after_next_ray_init() -> None:
    import ray

    if getattr(ray.init, "_lens_check", False):
        return
    original = ray.init

    def init(*args, **kwargs):
        ray.init = original  # one shot
        context = original(*args, **kwargs)
        if os.environ.get("LENS_KERNELS_VERL_CHECK_CLUSTER", "1") != "0":
            check_ray_cluster()
        return context

    init._lens_check = True
    ray.init = init


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


_install_import_hook()
_patch_runtime_env()
if os.environ.get("LENS_KERNELS_VERL_FUSED_LOGPROBS", "0") == "1":
    swap_fused_logprob_kernel(True)
