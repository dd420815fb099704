"""TRL adapter: ``LensGRPOConfig`` and ``LensGRPOTrainer``, drop-in subclasses of TRL's GRPO classes.

    from lens_kernels.integrations.trl import LensGRPOConfig, LensGRPOTrainer
    args = LensGRPOConfig(output_dir="out", advantage_estimator="lens", lens_alpha=0.25)
    trainer = LensGRPOTrainer(model=model, args=args, reward_funcs=reward, train_dataset=ds)

- ``advantage_estimator``: ``"grpo"`` keeps TRL's advantages; ``"lens"`` computes LENS advantages
  (``lk.group_advantages``) in ``_generate_and_score_completions`` on the rewards gathered from every
  process and on the gathered old log-probs (the old-log-prob pass is forced when TRL skipped it),
  then slices this process's rows as TRL does; ``"dr_grpo"`` is the mean-centred advantage.
- The loss (``_compute_loss``) is ``lk.policy_loss`` on TRL's log-probs, with TRL's normalizers:
  grpo/bnpo/dr_grpo/sapo are divided by ``current_gradient_accumulation_steps`` in training, dapo and
  cispo by ``num_items_in_batch / num_processes * current_gradient_accumulation_steps /
  steps_per_generation``. The tool mask, vLLM importance-sampling ratios, the KL term, the static
  entropy bonus and the MoE aux loss are kept, and TRL's metric names are logged.
- ``fused_loss_head="logits"`` or ``"hidden"`` computes the loss straight from the logits or from
  the last hidden states and the lm_head weight (``lk.policy_loss_from_logits`` /
  ``lk.policy_loss_from_hidden``) instead of TRL's log-prob pass; tested against TRL's own loss and
  parameter gradients on a tiny Llama (grpo, bnpo, dapo; KL; temperature).
- The one-call LENS step: with ``advantage_estimator="lens"``, when TRL skips the old-log-prob pass
  (on-policy: ``gradient_accumulation_steps`` a multiple of ``steps_per_generation * num_iterations``,
  no vLLM importance sampling), with ``scale_rewards`` "group" or "none" and
  ``per_device_*_batch_size`` a multiple of the group size, each process's generation batch holds whole
  groups (TRL's sampler repeats a prompt G times in a row; checked on the prompts) and the adapter
  shuffles it by whole groups, so every micro-batch holds whole groups, also with accumulation and
  several processes. The batch carries each completion's reward, correct flag and group id
  (``lens_rewards``, ``lens_correct``, ``lens_group_ids``) and the loss is
  ``lk.lens_policy_loss_from_logits`` / ``_from_hidden``: the LENS confidences come from the loss's own
  log-probs, so no extra old-log-prob pass runs. Otherwise the two-stage path above runs.
  ``lens/fused_step`` logs 1.0 or 0.0 per loss call; ``lens_fused_step=False`` forces the two-stage path.
- KL with ``beta > 0`` and TRL's default ``use_bias_correction_kl=True``: k3 times the importance
  ratio, with its gradient, aggregated as TRL aggregates the loss type (the fused heads take their
  log-probs from ``lk.token_logprobs`` / ``lk.linear_token_logprobs`` for it).
- Graded rewards: ``lens_correct_reward_func`` (the verifier among the reward functions) and
  ``lens_correct_threshold`` say which completions are correct (``correct=`` of
  ``lk.group_advantages``); the advantages are computed on TRL's total weighted reward. With several
  reward functions or a weight other than 1 and neither option, the trainer refuses to build.
- The two-stage path warns once per reason (the option and the extra forward it costs); the ``lens/``
  group statistics are logged with every loss call (also on steps that train on a buffered generation).
- TRL's completions log (``self._logs["advantages"]``) holds the advantages actually trained, and two
  extra columns, ``lens_advantage`` (3 significant digits: TRL prints 2 decimals) and
  ``lens_confidence``; ``lens/mean_confidence_negative`` is the all-wrong groups' mean confidence.
- Options the adapter does not support (loss types luspo and vespo, ``top_entropy_quantile < 1``,
  ``off_policy_mask_threshold``, adaptive entropy) fall back to TRL's own loss with one warning: no
  loss term is ever dropped silently.

See docs/trl.md for the recipe.

Supported TRL versions: 1.x, where ``_get_per_token_logps_and_entropies`` returns 3 values (from
1.7) or 2 (before 1.7); both arities are handled. Tested against TRL 1.16.0.
"""
from __future__ import annotations

import inspect
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch

from .. import (AdvantageConfig, LossConfig, group_advantages, lens_policy_loss_from_hidden, lens_policy_loss_from_logits,
               linear_token_logprobs, policy_loss, policy_loss_from_hidden, policy_loss_from_logits, token_logprobs)
from . import require

_trl = require("trl", "trl", "lens_kernels.integrations.trl")
GRPOConfig = _trl.GRPOConfig
GRPOTrainer = _trl.GRPOTrainer

ADVANTAGE_ESTIMATORS = ("grpo", "lens", "dr_grpo")
FUSED_LOSS_HEADS = (None, "logits", "hidden")
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
_GLOBAL_NORMALIZER_LOSSES = ("dapo", "cispo")
TRL_EPS = 1e-4
LENS_STAT_NAMES = ("frac_negative_groups", "frac_mixed_groups", "frac_all_correct_groups", "mean_abs_adv_negative",
                   "mean_abs_adv_mixed", "mean_confidence_wrong", "mean_confidence_right")
# forward inputs the adapter's own model call does not pass on (TRL's log-prob pass does)
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images")


@dataclass
class LensGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the lens_kernels options.

    Args:
        advantage_estimator: "grpo" (TRL's advantages), "lens" (LENS, needs binary rewards) or
            "dr_grpo" (rewards minus the group mean).
        lens_alpha: weight of negative-group advantages under LENS (the paper's 0.25).
        fused_loss_head: None (TRL's log-prob pass, then ``lk.policy_loss``), "logits" or "hidden".
        lens_fused_step: take the one-call LENS step when its preconditions hold (see the module
            docstring); False always takes the two-stage path.
        lens_correct_reward_func: graded rewards: the reward function (its name in the trainer's
            ``reward_func_names``, or its index) whose value says whether a completion is correct.
        lens_correct_threshold: correct means that reward (or, when no function is named, the total
            weighted reward) >= this; default 1.0 when a function is named. With neither option the
            total reward must be binary (0/1).
    """

    advantage_estimator: str = field(default="grpo", metadata={"help": "grpo, lens or dr_grpo"})
    lens_alpha: float = field(default=0.25, metadata={"help": "LENS weight of negative-group advantages"})
    fused_loss_head: Optional[str] = field(default=None, metadata={"help": "None, 'logits' or 'hidden'"})
    lens_fused_step: bool = field(default=True, metadata={"help": "one-call LENS step when its preconditions hold"})
    lens_correct_reward_func: Optional[str] = field(
        default=None, metadata={"help": "name (or index) of the reward function that verifies correctness"})
    lens_correct_threshold: Optional[float] = field(
        default=None, metadata={"help": "a completion is correct when its verifier reward (or, with no verifier "
                                        "named, its total weighted reward) is >= this"})

    def __post_init__(self):
        super().__post_init__()
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"advantage_estimator must be one of {list(ADVANTAGE_ESTIMATORS)}, got {self.advantage_estimator!r}")
        if self.fused_loss_head not in FUSED_LOSS_HEADS:
            raise ValueError(f"fused_loss_head must be one of {list(FUSED_LOSS_HEADS)}, got {self.fused_loss_head!r}")
        if not isinstance(self.lens_alpha, (int, float)) or self.lens_alpha < 0:
            raise ValueError(f"lens_alpha must be a number >= 0, got {self.lens_alpha!r}")
        if self.lens_correct_threshold is not None and (isinstance(self.lens_correct_threshold, bool) or not isinstance(
                self.lens_correct_threshold, (int, float))):
            raise ValueError(f"lens_correct_threshold must be a number, got {self.lens_correct_threshold!r}")
        if (self.lens_correct_reward_func is not None or self.lens_correct_threshold is not None) \
                and self.advantage_estimator != "lens":
            raise ValueError("lens_correct_reward_func / lens_correct_threshold need advantage_estimator='lens'")
        if self.advantage_estimator != "grpo" and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("advantage_estimator='lens'/'dr_grpo' needs multi_objective_aggregation='sum_then_normalize'")


def unpack_logps_output(out):
    """``(logps, entropies, aux_loss)`` from ``_get_per_token_logps_and_entropies``, which returns 2
    values before TRL 1.7 and 3 from 1.7 on."""
    if len(out) == 3:
        return out
    if len(out) == 2:
        return out[0], out[1], None
    raise ValueError(f"_get_per_token_logps_and_entropies returned {len(out)} values; expected 2 or 3")


def unsupported_reason(trainer) -> Optional[str]:
    """Why the lens loss cannot reproduce this trainer's TRL loss exactly, or None."""
    if trainer.loss_type not in SUPPORTED_LOSS_TYPES:
        return f"loss_type={trainer.loss_type!r}"
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        return "top_entropy_quantile < 1"
    if getattr(trainer, "off_policy_mask_threshold", None) is not None:
        return "off_policy_mask_threshold"
    if getattr(trainer, "use_adaptive_entropy", False):
        return "adaptive entropy control"
    return None


def bias_corrected_kl(trainer) -> bool:
    """TRL's default KL with beta > 0: k3 times the importance ratio (``use_bias_correction_kl=True``)."""
    return trainer.beta != 0.0 and bool(getattr(trainer.args, "use_bias_correction_kl", False))


def fused_head_reason(trainer) -> Optional[str]:
    """Why the loss cannot be computed by one op on logits or hidden states, or None."""
    if trainer.loss_type in _GLOBAL_NORMALIZER_LOSSES and trainer._entropy_bonus_enabled:
        return "fused_loss_head with the entropy bonus of loss_type dapo/cispo"
    return None


def _group_size(trainer, mode):
    return trainer.num_generations if mode == "train" else trainer.num_generations_eval


def _local_batch_size(trainer, mode):
    args = trainer.args
    return args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size


def fused_step_blocker(trainer, output, mode, prompts=None) -> Optional[str]:
    """Why this generation batch cannot take the one-call LENS step, or None. Decided once per generation
    batch from the config, the output's keys and the prompts (host objects): no device value is read.

    The step needs every micro-batch to hold whole groups: a process's generation batch holds whole
    groups when ``per_device_*_batch_size`` is a multiple of the group size (TRL's sampler repeats each
    prompt G times in a row and each process takes consecutive rows), and the adapter shuffles the
    generation batch by whole groups (``_prepare_inputs``), so TRL's split into ``steps_per_generation``
    micro-batches keeps them whole too."""
    args = trainer.args
    if getattr(args, "advantage_estimator", "grpo") != "lens":
        return "advantage_estimator is not 'lens'"
    if not getattr(args, "lens_fused_step", True):
        return "lens_fused_step=False"
    if "old_per_token_logps" in output:  # TRL computes them only when the policy may have moved (or for vLLM IS)
        return "off-policy: TRL computed old_per_token_logps"
    if trainer.scale_rewards == "batch":
        return "scale_rewards='batch' needs the whole generation batch"
    group_size = _group_size(trainer, mode)
    if _local_batch_size(trainer, mode) % group_size != 0:
        return (f"per_device_{mode}_batch_size is not a multiple of the group size {group_size}: "
                "micro-batches hold partial groups")
    if mode == "train" and args.steps_per_generation != 1 and not hasattr(_trl_grpo_module(), "shuffle_sequence_dict"):
        return "this TRL version's shuffle cannot be made group-wise"
    if prompts is not None and any(prompts[i] != prompts[j] for i in range(0, len(prompts), group_size)
                                   for j in range(i + 1, min(i + group_size, len(prompts)))):
        return "this process's rows are not whole groups of one prompt each"
    reason = unsupported_reason(trainer) or fused_head_reason(trainer)
    if reason is not None:
        return reason
    if getattr(trainer, "aux_loss_enabled", False):
        return "the MoE aux loss comes from TRL's log-prob pass"
    if getattr(args, "fused_loss_head", None) is None and getattr(args, "cast_lm_head_to_fp32", False):
        return "cast_lm_head_to_fp32 applies to TRL's log-prob pass"
    if any(key in output for key in _MULTIMODAL_KEYS):
        return "multimodal inputs"
    return None


def negative_group_mean(values, rewards, correct, group_ids):
    """Mean of ``values`` [N] over the scored completions of all-wrong groups (0-d; 0 when there is
    none). ``correct`` None: the binary reward says it. Pairwise group test: no host read."""
    valid = ~torch.isnan(rewards)
    right = (rewards == 1) if correct is None else correct.bool()
    right = right & valid
    same = group_ids.reshape(-1, 1) == group_ids.reshape(1, -1)
    in_negative = valid & ~(same & right.reshape(1, -1)).any(dim=1)
    weight = in_negative.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def _trl_grpo_module():
    return sys.modules[GRPOTrainer.__module__]


def group_shuffle(seq_dict, group_size):
    """TRL's ``shuffle_sequence_dict`` by whole groups: rows [g*G, (g+1)*G) stay together and in order,
    the groups are permuted (one ``randperm`` on the global generator, as TRL's)."""
    n = len(next(v for v in seq_dict.values() if v is not None))
    perm = (torch.randperm(n // group_size).unsqueeze(1) * group_size + torch.arange(group_size)).reshape(-1)

    def permute(v):
        if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
            return v
        if isinstance(v, torch.Tensor):
            return v[perm.to(v.device)]
        return [v[i] for i in perm.tolist()]

    return {key: permute(value) for key, value in seq_dict.items()}


def trl_kl_aggregate(trainer, per_token, mask, num_tokens):
    """A per-token term aggregated as TRL aggregates its loss for ``trainer.loss_type`` (before the
    gradient-accumulation scale)."""
    weighted = per_token * mask
    if trainer.loss_type in ("grpo", "sapo"):
        return (weighted.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if trainer.loss_type == "bnpo":
        return weighted.sum() / mask.sum().clamp(min=1.0)
    if trainer.loss_type == "dr_grpo":
        return weighted.sum() / (per_token.size(0) * trainer.max_completion_length)
    return weighted.sum() / num_tokens  # dapo, cispo: the global normalizer


def trl_bias_corrected_kl(trainer, logps, ref_logps, old_logps, mask):
    """TRL's KL with ``use_bias_correction_kl``: k3(l, l_ref) times the importance ratio exp(l - l_old)
    (token level) or exp(masked mean of l - l_old) (sequence level), with the gradient through both; the
    ratio is taken before ``delta`` clamps it, as in TRL."""
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if trainer.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    d = ref_logps - logps
    return (torch.exp(d) - d - 1) * torch.exp(log_ratio)


def loss_config_for(trainer) -> LossConfig:
    """The ``LossConfig`` of a GRPO trainer's resolved attributes (entropy bonus excluded: the adapter
    adds it with TRL's own normalizer)."""
    args = trainer.args
    return LossConfig.from_trl(SimpleNamespace(
        loss_type=trainer.loss_type,
        epsilon=trainer.epsilon_low,
        epsilon_high=trainer.epsilon_high,
        delta=getattr(args, "delta", None),
        beta=trainer.beta,
        importance_sampling_level=trainer.importance_sampling_level,
        sapo_temperature_pos=getattr(args, "sapo_temperature_pos", 1.0),
        sapo_temperature_neg=getattr(args, "sapo_temperature_neg", 1.05),
        max_completion_length=trainer.max_completion_length,
        entropy_coef=0.0,
    ))


def _explain_binary(exc):
    """group_advantages' "rewards must be binary" error, led by the TRL options that fix it (the core
    API's own remedy, ``correct=``, is not something a trainer user passes)."""
    if "binary" in str(exc):
        detail = str(exc).split("; pass correct=")[0]
        return ValueError(
            "LENS needs to know which completions are correct: set LensGRPOConfig(lens_correct_reward_func="
            "<name of the verifier reward function>, lens_correct_threshold=<its value for a correct answer>), "
            "or lens_correct_threshold alone for a threshold on the total weighted reward. Without either "
            f"option the total reward must be 0 or 1 ({detail})")
    return exc


@contextmanager
def _binary_hint():
    try:
        yield
    except ValueError as exc:
        raise _explain_binary(exc) from exc


class LensGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with LENS advantages and the lens_kernels loss; see the module docstring."""

    _lens_warned = False
    _lens_log_appended = 0
    _lens_log_start = None
    _lens_correct_index = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lens_log_appended = 0  # entries TRL appended to self._logs["advantages"] so far
        self._lens_log_start = None  # absolute position of the current generation batch in that log
        self._lens_correct_index = self._resolve_correct_func()
        self._check_correctness_is_named()
        self._lens_warned_keys = set()
        self._lens_step_stats = {}  # mode -> the two-stage path's group statistics of the current generation

    def _check_correctness_is_named(self):
        """Refuse, when the trainer is built, a LENS run whose notion of "correct" would silently be the
        summed reward: with several reward functions (a format reward alone can make the total 1) or a
        weight other than 1, the user must name the verifier or the threshold."""
        args = self.args
        if getattr(args, "advantage_estimator", "grpo") != "lens" or args.lens_correct_reward_func is not None \
                or args.lens_correct_threshold is not None:
            return
        names = list(self.reward_func_names)
        weights = [float(w) for w in self.reward_weights.tolist()]
        if len(names) == 1 and weights == [1.0]:
            return
        why = (f"{len(names)} reward functions {names}" if len(names) > 1
               else f"reward weight {weights[0]:g} on {names[0]!r}")
        raise ValueError(
            f"advantage_estimator='lens' with {why} needs to know which completions are correct; otherwise the "
            "total weighted reward would decide it (a format reward alone could make an answer correct). Set "
            f"LensGRPOConfig(lens_correct_reward_func={names[0]!r}, lens_correct_threshold=1.0) with the name of "
            "the reward function that verifies the answer and its value for a correct answer, or "
            "lens_correct_threshold=<total weighted reward of a correct answer> to decide on the total")

    def _resolve_correct_func(self) -> Optional[int]:
        """The index of ``lens_correct_reward_func`` among the reward functions, checked at start."""
        name = getattr(self.args, "lens_correct_reward_func", None)
        if name is None:
            return None
        names = list(self.reward_func_names)
        if name in names:
            return names.index(name)
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            index = int(name)
            if 0 <= index < len(names):
                return index
        raise ValueError(f"lens_correct_reward_func={name!r} is not one of the reward functions {names} "
                         f"(a name or an index in 0..{len(names) - 1})")

    def lens_correct(self, rewards_per_func, rewards) -> Optional[torch.Tensor]:
        """[N] bool: which completions are correct (None: the binary total reward says it)."""
        threshold = getattr(self.args, "lens_correct_threshold", None)
        if self._lens_correct_index is None and threshold is None:
            return None
        if self._lens_correct_index is not None:
            values = rewards_per_func[:, self._lens_correct_index]
            threshold = 1.0 if threshold is None else threshold
        else:
            values = rewards
        return values >= threshold  # NaN (not scored) is not correct

    # ----- stage A: advantages on the gathered batch -------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._lens_rewards_per_func = rewards_per_func  # gathered over processes, as TRL returns it
        return rewards_per_func

    def _prepare_inputs(self, generation_batch):
        """TRL's, with the generation batch shuffled by whole groups when it carries the one-call LENS
        step (so that TRL's split into ``steps_per_generation`` micro-batches keeps groups whole)."""
        module = _trl_grpo_module()
        original = getattr(module, "shuffle_sequence_dict", None)
        if original is None or getattr(self.args, "advantage_estimator", "grpo") != "lens" \
                or self.args.steps_per_generation == 1:  # one micro-batch: TRL's row shuffle keeps groups whole
            return super()._prepare_inputs(generation_batch)

        def shuffle(seq_dict):
            if "lens_group_ids" in seq_dict:
                return group_shuffle(seq_dict, self.num_generations)
            return original(seq_dict)

        module.shuffle_sequence_dict = shuffle
        try:
            return super()._prepare_inputs(generation_batch)
        finally:
            module.shuffle_sequence_dict = original

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        estimator = getattr(self.args, "advantage_estimator", "grpo")
        if estimator == "grpo":
            return output
        mode = "train" if self.model.training else "eval"
        group_size = _group_size(self, mode)
        rewards_per_func = self._lens_rewards_per_func
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards = torch.where(torch.isnan(rewards_per_func).all(dim=1), torch.nan, rewards)
        correct = self.lens_correct(rewards_per_func, rewards) if estimator == "lens" else None
        local = output["completion_ids"].size(0)
        start = self.accelerator.process_index * local
        self._lens_log_appended += rewards.numel()
        self._lens_log_start = self._lens_log_appended - rewards.numel()
        prompts = [x.get("prompt") if isinstance(x, dict) else x for x in inputs]
        self._extend_completion_columns(rewards.numel())
        blocker = fused_step_blocker(self, output, mode, prompts)
        if blocker is None:
            # this process's rows are whole groups in TRL's order (checked above): the loss op computes
            # their advantages, one micro-batch of whole groups at a time
            output["lens_rewards"] = rewards[start:start + local]
            output["lens_group_ids"] = torch.arange(local, device=rewards.device) // group_size
            output["lens_rows"] = torch.arange(start, start + local, device=rewards.device)
            if correct is not None:
                output["lens_correct"] = correct[start:start + local]
            # the loss op computes the advantages; NaN makes any other reader of this key fail loudly
            output["advantages"] = torch.full_like(output["advantages"], torch.nan)
            self._lens_step_stats.pop(mode, None)
            return output
        if estimator == "lens":
            self._warn_two_stage(blocker, extra_forward="old_per_token_logps" not in output)
        kwargs = dict(group_size=group_size, eps=TRL_EPS, nan_rewards="zero_advantage", correct=correct)
        with _binary_hint():
            if estimator == "lens":
                old_logps = output.get("old_per_token_logps")
                if old_logps is None:
                    old_logps = self._old_logps_for_lens(output, mode)
                mask = output["completion_mask"]
                if "tool_mask" in output:
                    mask = mask * output["tool_mask"]
                old_logps = self.accelerator.gather(self.accelerator.pad_across_processes(old_logps, dim=1))
                mask = self.accelerator.gather(self.accelerator.pad_across_processes(mask, dim=1))
                advantages, stats = group_advantages(
                    rewards, estimator="lens", old_logps=old_logps, mask=mask, scale=self.scale_rewards,
                    lens_alpha=float(self.args.lens_alpha), **kwargs)
            else:
                advantages, stats = group_advantages(rewards, estimator="dr_grpo", **kwargs)
        output["advantages"] = advantages[start:start + local].to(output["advantages"].dtype)
        rows = torch.arange(advantages.numel(), device=advantages.device)
        self._log_trained_advantages(rows, advantages, stats.get("confidence"))
        # logged by every loss call of this generation batch (also the steps that do not generate)
        self._lens_step_stats[mode] = self._lens_stat_values(stats, rewards, correct, rows // group_size)
        return output

    def _warn_two_stage(self, reason, extra_forward):
        """One warning per reason when LENS cannot take the one-call step: the option and the cost."""
        if reason == "lens_fused_step=False" or reason in self._lens_warned_keys:
            return
        self._lens_warned_keys.add(reason)
        args = self.args
        if reason.startswith("off-policy"):
            reason = (f"the samples are off-policy (steps_per_generation={args.steps_per_generation}, "
                      f"num_iterations={self.num_iterations}, gradient_accumulation_steps="
                      f"{args.gradient_accumulation_steps}: the accumulation is not a multiple of "
                      "steps_per_generation * num_iterations, or vLLM importance sampling is on), so TRL runs its "
                      "old-log-prob pass")
        cost = ("one extra no-grad forward over the generation batch per generation (the old log-probs LENS "
                "needs; about a third of a forward+backward)" if extra_forward else
                "TRL's own old-log-prob forward over the generation batch per generation, and the advantages are "
                "computed from those log-probs")
        warnings.warn(f"lens_kernels: LENS takes the two-stage path, not the one-call step, because {reason}. "
                      f"Cost: {cost}. lens/fused_step logs 0.0.", stacklevel=3)

    def _extend_completion_columns(self, count):
        """Two columns of TRL's completions table (``self._logs["extra"]``) kept in step with its
        advantage column: ``lens_advantage`` (3 significant digits: TRL prints advantages to 2
        decimals, so the ~1e-3 LENS advantages of an all-wrong group would read 0.00) and
        ``lens_confidence`` (the completion's mean token probability)."""
        extra = self._logs.get("extra") if isinstance(getattr(self, "_logs", None), dict) else None
        if extra is None:
            return
        for column in ("lens_advantage", "lens_confidence"):
            extra[column].extend([""] * count)

    def _lens_stat_values(self, stats, rewards, correct, group_ids):
        """The ``lens/`` statistics as host floats (one transfer), with the negative groups' mean
        confidence, which shows (with ``mean_abs_adv_negative``) that LENS acts on all-wrong groups."""
        values = {name: stats[name] for name in LENS_STAT_NAMES if name in stats}
        if "confidence" in stats:
            values["mean_confidence_negative"] = negative_group_mean(stats["confidence"], rewards, correct, group_ids)
        if not values:
            return {}
        return dict(zip(values, torch.stack([v.float().reshape(()) for v in values.values()]).tolist()))

    def _log_trained_advantages(self, rows, advantages, confidence=None):
        """Write the advantages actually trained into TRL's completions log (``self._logs["advantages"]``,
        which TRL filled with its own GRPO advantages) and the ``lens_advantage`` / ``lens_confidence``
        columns: ``rows`` are positions in the gathered generation batch. The logs are bounded deques
        that end at the same newest entry, so positions are kept as absolute counts."""
        log = self._logs.get("advantages") if isinstance(getattr(self, "_logs", None), dict) else None
        if log is None or self._lens_log_start is None:
            return
        extra = self._logs.get("extra", {})
        columns = [(extra.get("lens_advantage"), advantages, "{:.3g}"),
                   (extra.get("lens_confidence"), confidence, "{:.4f}")]
        first = self._lens_log_appended - len(log)  # absolute position of log[0]
        rows = rows.tolist()
        for row, value in zip(rows, advantages.float().tolist()):
            position = self._lens_log_start + row - first
            if 0 <= position < len(log):
                log[position] = value
        for column, values, form in columns:
            if column is None or values is None:
                continue
            shift = len(log) - len(column)
            for row, value in zip(rows, values.float().tolist()):
                position = self._lens_log_start + row - first - shift
                if 0 <= position < len(column):
                    column[position] = form.format(value)

    def _log_lens_stats(self, mode, stats, inputs):
        """The one-call step's group statistics of this process's micro-batch under ``lens/``, averaged
        over processes and read back in one transfer."""
        values = {name: stats[name] for name in LENS_STAT_NAMES if name in stats}
        if "confidence" in stats:
            values["mean_confidence_negative"] = negative_group_mean(
                stats["confidence"], inputs["lens_rewards"], inputs.get("lens_correct"), inputs["lens_group_ids"])
        if not values:
            return
        stacked = torch.stack([v.float().reshape(()) for v in values.values()])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.gather(stacked.unsqueeze(0)).mean(0)
        for name, value in zip(values, stacked.tolist()):
            self._metrics[mode][f"lens/{name}"].append(value)

    def _old_logps_for_lens(self, output, mode):
        """The old-policy log-probs TRL skips when they equal the current ones; LENS needs them."""
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        batch_size = _local_batch_size(self, mode)
        with torch.no_grad():
            out = self._get_per_token_logps_and_entropies(
                self.model, ids, attention_mask, output["completion_ids"].size(1), batch_size=batch_size)
        return unpack_logps_output(out)[0]

    # ----- stage B: the loss ---------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        fused_step = "lens_rewards" in inputs  # decided per generation batch by fused_step_blocker
        self._metrics[mode]["lens/fused_step"].append(1.0 if fused_step else 0.0)
        if not fused_step:  # the statistics of the generation batch this micro-batch comes from
            for name, value in getattr(self, "_lens_step_stats", {}).get(mode, {}).items():
                self._metrics[mode][f"lens/{name}"].append(value)
        reason = unsupported_reason(self)
        if reason is None and getattr(self.args, "fused_loss_head", None) is not None:
            reason = fused_head_reason(self)
        if reason is not None and getattr(self.args, "fused_loss_head", None) is None:
            self._warn_once(f"lens_kernels: {reason} is not supported; using TRL's own loss")
            return super()._compute_loss(model, inputs)
        if reason is not None:
            self._warn_once(f"lens_kernels: {reason} is not supported by the fused head; using TRL's log-prob pass")
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)

        config = loss_config_for(self)
        bias_kl = bias_corrected_kl(self)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type in _GLOBAL_NORMALIZER_LOSSES:
            num_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_tokens = num_tokens * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            scale = 1.0
        else:
            num_tokens, scale = None, 1.0 / accumulation
        is_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_weights = inputs["importance_sampling_ratio"]
            is_weights = is_weights.squeeze(-1) if is_weights.dim() == 2 and is_weights.size(1) == 1 else is_weights
        advantages = inputs["advantages"]
        common = dict(old_logps=inputs.get("old_per_token_logps"), ref_logps=inputs.get("ref_per_token_logps"),
                      is_weights=is_weights, num_tokens=num_tokens)

        fused = getattr(self.args, "fused_loss_head", None) if reason is None else None
        if fused_step:  # fused_step_blocker ruled out every reason above
            fused = fused or "logits"
        aux_loss = logps = entropies = None
        if fused is None or bias_kl:
            # the log-probs as a tensor: TRL's pass, or (fused head + TRL's bias-corrected KL, which the
            # fused ops do not have) lens_kernels' differentiable log-prob op on the logits / hidden states
            if fused is None:
                kwargs = {"compute_entropy": True}
                if "compute_aux_loss" in inspect.signature(self._get_per_token_logps_and_entropies).parameters:
                    kwargs["compute_aux_loss"] = getattr(self, "aux_loss_enabled", False)
                logps, entropies, aux_loss = unpack_logps_output(self._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, **kwargs))
            else:
                logps, entropies = self._head_logps(model, fused, input_ids, attention_mask, completion_ids, mask)
            if fused_step:  # the one-call step's stages, with the KL term added between them
                with _binary_hint():
                    step = self._lens_step_kwargs(inputs, mode, whole=False)
                    options = step.pop("advantage_config").kwargs()
                    advantages, stats = group_advantages(old_logps=logps.detach(), mask=mask, **step, **options)
                inputs = dict(inputs, advantages=advantages)
                self._after_fused_step(mode, inputs, advantages, stats)
            loss, metrics = policy_loss(logps, advantages, mask, config=config.replace(beta=0.0) if bias_kl else config,
                                        **common)
            if bias_kl:
                per_token_kl = trl_bias_corrected_kl(self, logps, common["ref_logps"], common["old_logps"], mask)
                loss = loss + self.beta * trl_kl_aggregate(self, per_token_kl, mask, num_tokens)
                metrics = dict(metrics, kl=(per_token_kl.detach() * mask).sum() / mask.sum().clamp(min=1.0))
            policy = loss.detach()
            loss = loss * scale
            if self._entropy_bonus_enabled:
                entropy_mean = (entropies * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
                loss = loss - self.entropy_coef * entropy_mean
        else:
            if self._entropy_bonus_enabled:
                config = config.replace(entropy_coef=float(self.entropy_coef), entropy_agg_mode="token-mean")
            # the loss is scaled below, so the op's upstream gradient is `scale` (the grad-scale contract)
            lens = self._lens_step_kwargs(inputs, mode) if fused_step else None
            with _binary_hint():
                loss, metrics = self._fused_loss(model, fused, input_ids, attention_mask, completion_ids, mask,
                                                 advantages, config, dict(common, grad_scale=scale), lens)
            if fused_step:
                inputs = dict(inputs, advantages=metrics["advantages"])
                self._after_fused_step(mode, inputs, metrics["advantages"], metrics)
            policy = metrics["policy_loss"] + config.beta * metrics["kl"]  # TRL's policy_loss includes the KL
            loss = loss * scale
        if self._entropy_bonus_enabled:
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if aux_loss is not None and getattr(self, "aux_loss_enabled", False):
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_loss_metrics(mode, mask, metrics, logps, inputs, entropies)
        return loss

    def _after_fused_step(self, mode, inputs, advantages, stats):
        """Log what the one-call step trained: its group statistics and, in the completions log, the
        advantages of this micro-batch's rows."""
        self._log_lens_stats(mode, stats, inputs)
        rows = inputs.get("lens_rows")
        if rows is not None:
            advantages = advantages.detach()
            confidence = stats.get("confidence")
            confidence = advantages.new_full(advantages.shape, torch.nan) if confidence is None else confidence.detach()
            if self.accelerator.num_processes > 1:
                rows, advantages, confidence = (self.accelerator.gather(t) for t in (rows, advantages, confidence))
            self._log_trained_advantages(rows, advantages, confidence)

    def _lens_step_kwargs(self, inputs, mode, whole=True):
        """The advantage options of the one-call LENS step: those the two-stage path gives
        ``group_advantages``; ``group_size`` with ``group_ids`` makes the fused op check whole groups."""
        kwargs = dict(rewards=inputs["lens_rewards"], group_ids=inputs["lens_group_ids"], correct=inputs.get("lens_correct"),
                      advantage_config=AdvantageConfig(estimator="lens", scale=self.scale_rewards, eps=TRL_EPS,
                                                       nan_rewards="zero_advantage", lens_alpha=float(self.args.lens_alpha)))
        if whole:
            kwargs["group_size"] = _group_size(self, mode)
        return kwargs

    def _head_logps(self, model, fused, input_ids, attention_mask, completion_ids, mask):
        """Differentiable token log-probs and entropies by lens_kernels' op on the logits or hidden states."""
        k = completion_ids.size(1)
        if fused == "logits":
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=k + 1).logits
            return token_logprobs(logits[:, -(k + 1):-1, :], completion_ids, temperature=self.temperature,
                                  return_entropy=True)
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
        head = model.get_output_embeddings()
        return linear_token_logprobs(out.hidden_states[-1][:, -(k + 1):-1, :], head.weight, completion_ids,
                                     bias=getattr(head, "bias", None), temperature=self.temperature,
                                     return_entropy=True)

    def _fused_loss(self, model, fused, input_ids, attention_mask, completion_ids, mask, advantages, config, common,
                    lens=None):
        """The loss head from logits or hidden states: TRL's forward, then one lens_kernels op (with ``lens``,
        the one-call LENS step, which computes the advantages itself)."""
        k = completion_ids.size(1)
        if fused == "logits":
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=k + 1).logits
            logits = logits[:, -(k + 1):-1, :]
            if lens is not None:
                return lens_policy_loss_from_logits(logits, completion_ids, mask, temperature=self.temperature,
                                                    config=config, **lens, **common)
            return policy_loss_from_logits(logits, completion_ids, mask, advantages,
                                           temperature=self.temperature, config=config, **common)
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1][:, -(k + 1):-1, :]
        head = model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        if lens is not None:
            return lens_policy_loss_from_hidden(hidden, head.weight, completion_ids, mask, bias=bias,
                                                temperature=self.temperature, config=config, **lens, **common)
        return policy_loss_from_hidden(hidden, head.weight, completion_ids, mask, advantages, bias=bias,
                                       temperature=self.temperature, config=config, **common)

    def _log_loss_metrics(self, mode, mask, metrics, logps, inputs, entropies):
        """TRL's loss metrics under TRL's names, reduced over processes as TRL does."""
        count = mask.sum().float()

        def global_mean(value):
            totals = self.accelerator.reduce(torch.stack([value.float() * count, count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_mean(metrics["kl"]))
        entropy = metrics["entropy"] if entropies is None else (entropies * mask).sum() / count.clamp(min=1.0)
        self._metrics[mode]["entropy"].append(global_mean(entropy))
        if self.loss_type == "cispo" or self.loss_type == "sapo":
            if self.loss_type == "cispo" and (logps is not None or "lens_rewards" in inputs):
                # the one-call LENS step is on-policy: rho = 1
                ratio = self._ratio(logps, inputs, mask) if logps is not None else torch.ones_like(mask)
                clipped = (ratio > self.epsilon_high) & (inputs["advantages"].reshape(len(mask), -1) > 0)
                self._metrics[mode]["cispo_clip_ratio"].append(global_mean(self._masked_mean(clipped, mask)))
            return
        for name, key in (("low_mean", "clip_frac_low"), ("high_mean", "clip_frac_high"), ("region_mean", "clip_frac")):
            self._metrics[mode][f"clip_ratio/{name}"].append(global_mean(metrics[key]))

    def _ratio(self, logps, inputs, mask):
        old = inputs.get("old_per_token_logps")
        log_ratio = (logps - (logps if old is None else old)).detach()
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
        return torch.exp(log_ratio)

    @staticmethod
    def _masked_mean(flags, mask):
        flags = flags.float().expand_as(mask)
        return (flags * mask).sum() / mask.sum().clamp(min=1.0)

    def _warn_once(self, message):
        if not self._lens_warned:
            warnings.warn(message, stacklevel=3)
            self._lens_warned = True
