"""group_advantages: GRPO, Dr. GRPO, RLOO, batch scaling and LENS (SPEC 2.1), vectorized.

Every group statistic is a scatter over a dense group index, so there is no Python loop over groups
and no host sync: group ids of any values and order are densified by a sort, with buffers of N slots
(slots without members stay empty), so the number of groups never has to be read on the host.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    MASK_DTYPES,
    check_finite_number,
    check_mask,
    check_same_device,
    check_shape,
    check_tensor,
    value_checks_enabled,
)

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "lens")
SCALES = ("group", "batch", "none")
LENS_D_ESTIMATES = ("mean", "sequence")
LENS_GROUPS = ("all", "negative", "mixed")
NAN_REWARDS = ("raise", "zero_advantage")

# Per-trainer conventions for the std's eps (SPEC 2.1): pass as eps=TRAINER_EPS["verl"].
TRAINER_EPS = {"trl": 1e-4, "verl": 1e-6, "openrlhf": 1e-9}


def dense_group_index(n: int, group_size: Optional[int], group_ids: Optional[torch.Tensor], device) -> torch.Tensor:
    """Each completion's group as an index in [0, N): completions share an index iff they share a group."""
    if group_ids is None:
        return torch.arange(n, device=device) // group_size
    order = torch.argsort(group_ids, stable=True)
    sorted_ids = group_ids[order]
    starts = torch.ones(n, dtype=torch.long, device=device)
    if n > 1:
        starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    dense_sorted = torch.cumsum(starts, 0) - 1
    index = torch.empty_like(dense_sorted)
    index[order] = dense_sorted
    return index


def _group_sum(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(values).index_add_(0, index, values)


def _validate(rewards, group_size, group_ids, estimator, old_logps, mask, correct, scale, eps, lens_alpha,
              lens_d_estimate, lens_groups, nan_rewards, process_group=None):
    """Local checks. With a process group, the checks of the whole batch (group size, values) run
    after the gather (``_check_batch``), on the same data on every rank, so all ranks raise alike."""
    check_tensor("rewards", rewards, dtypes=FLOAT_DTYPES + INDEX_DTYPES + (torch.bool,), ndim=(1,), expected="[N]")
    n = rewards.shape[0]
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
    if scale is not None and scale not in SCALES:
        raise ValueError(f"scale must be one of {list(SCALES)} (or None for the estimator's default), got {scale!r}")
    if lens_d_estimate not in LENS_D_ESTIMATES:
        raise ValueError(f"lens_d_estimate must be one of {list(LENS_D_ESTIMATES)}, got {lens_d_estimate!r}")
    if lens_groups not in LENS_GROUPS:
        raise ValueError(f"lens_groups must be one of {list(LENS_GROUPS)}, got {lens_groups!r}")
    if nan_rewards not in NAN_REWARDS:
        raise ValueError(f"nan_rewards must be one of {list(NAN_REWARDS)}, got {nan_rewards!r}")
    for name, value in (("eps", eps), ("lens_alpha", lens_alpha)):
        check_finite_number(name, value, low=0.0)
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (contiguous groups) or group_ids ([N] group of each completion)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    else:
        check_tensor("group_ids", group_ids, dtypes=INDEX_DTYPES, ndim=(1,), expected="[N]")
        check_shape("group_ids", group_ids, (n,), "[N]")
    if correct is not None:
        check_tensor("correct", correct, dtypes=MASK_DTYPES, ndim=(1,), expected="[N]")
        check_shape("correct", correct, (n,), "[N]")
    if estimator == "lens":
        if old_logps is None:
            raise ValueError("old_logps [N, T] (the sampling policy's token log-probs) is required for estimator='lens'")
        check_tensor("old_logps", old_logps, dtypes=FLOAT_DTYPES, ndim=(2,), expected="[N, T]")
        if old_logps.shape[0] != n:
            raise ValueError(f"old_logps must have shape [N, T] with N = {n}, got {list(old_logps.shape)}")
        if mask is not None:
            check_mask(mask, tuple(old_logps.shape), expected="[N, T] (as old_logps)")
    check_same_device([("rewards", rewards), ("group_ids", group_ids), ("old_logps", old_logps), ("mask", mask),
                       ("correct", correct)])
    if process_group is not None:
        from .distributed import check_process_group
        check_process_group("process_group", process_group)
    else:
        _check_batch(rewards, group_size, estimator, correct, nan_rewards)


def _check_batch(rewards, group_size, estimator, correct, nan_rewards, where="rewards.shape[0]"):
    n = rewards.shape[0]
    if group_size is not None and n % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of completions N={n} ({where})")
    if value_checks_enabled(rewards) and rewards.dtype.is_floating_point:
        if bool(torch.isinf(rewards).any()):
            i = int(torch.isinf(rewards).nonzero()[0])
            raise ValueError(f"rewards must be finite; rewards[{i}] = {float(rewards[i])}")
        if nan_rewards == "raise" and bool(torch.isnan(rewards).any()):
            i = int(torch.isnan(rewards).nonzero()[0])
            raise ValueError(
                f"rewards must not be NaN (rewards[{i}] is NaN); pass nan_rewards='zero_advantage' to give "
                "such completions advantage 0 as TRL does"
            )
    if estimator == "lens" and correct is None and value_checks_enabled(rewards):
        r = rewards.double()
        bad = ~((r == 0) | (r == 1) | torch.isnan(r))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"rewards must be binary (0 or 1) for estimator='lens', got rewards[{i}] = {float(r[i])}; "
                "pass correct= ([N] bool) to use graded rewards"
            )


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    estimator: str = "grpo",
    old_logps: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    correct: Optional[torch.Tensor] = None,
    scale: Optional[str] = None,
    eps: float = 1e-4,
    std_unbiased: bool = True,
    lens_alpha: float = 0.25,
    lens_d_estimate: str = "mean",
    lens_groups: str = "all",
    nan_rewards: str = "raise",
    process_group=None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Advantages of a rollout batch of N completions in groups (SPEC 2.1). No gradient, no host sync.

    Args:
        rewards: [N] rewards (binary for LENS unless ``correct`` is given); N = 0 gives an empty
            result. Values (finite; binary for LENS) are checked when values are checked: CPU
            tensors always, GPU tensors with ``LENS_KERNELS_CHECK=1``, never under ``torch.compile``.
        group_size: G for contiguous groups [0..G), [G..2G), ...; or
        group_ids: [N] integer group of each completion, in any order.
        estimator: "grpo" (r - mean) / (std + eps); "dr_grpo" r - mean; "rloo" leave-one-out
            baseline; "lens" (LENS calibrated rewards, see ``reference.group_advantages``).
        old_logps: [N, T] token log-probs under the sampling policy (LENS confidence: the mean over
            the kept tokens; masked entries are never read). mask: [N, T] 0/1 completion mask for
            them (default all ones; another value is a ValueError when values are checked).
        correct: [N] bool, which completions are correct (LENS with graded rewards; group kinds).
        scale: "group" (per-group std), "batch" (std of the whole batch, TRL scale_rewards="batch"),
            "none"; None means "group" for grpo/lens and "none" for dr_grpo/rloo.
        eps: added to the std, finite >= 0: TRL 1e-4, verl 1e-6, OpenRLHF 1e-9 (``TRAINER_EPS``).
        std_unbiased: Bessel's correction (True, as TRL and verl).
        lens_alpha: weight of negative-group advantages, finite >= 0 (the method's hyperparameter, 0.25).
        lens_d_estimate: "mean" (D_imp from pbar = exp(mean log-prob)) or "sequence" (from the raw
            sequence probability).
        lens_groups: "all", or the paper's ablations "negative" (LENS on negative groups only) and
            "mixed" (LENS on mixed groups only).
        nan_rewards: "raise", or "zero_advantage": NaN-reward completions are left out of the group
            statistics and get advantage 0 (TRL).
        process_group: a ``torch.distributed`` group whose ranks each hold a slice of the rollout
            batch (a group's completions may sit on different ranks). Every argument is this rank's
            slice; ``group_ids`` are global, ``group_size`` counts contiguous groups of the batch
            concatenated in rank order. The group statistics see the whole batch: per completion,
            the reward, correct flag, group id and (LENS) the old log-prob sum and length are
            gathered, never the [N, T] log-probs. Returns this rank's slice of the advantages (and
            of ``confidence``); the other metrics are those of the whole batch, on every rank.
            Identical to the single-process call on the concatenated batch.

    Returns:
        (advantages [N] fp32 (fp64 for fp64 rewards), metrics): 0-d tensors ``frac_negative_groups``,
        ``frac_mixed_groups``, ``frac_all_correct_groups``, ``frac_zero_std_groups``,
        ``mean_abs_adv_negative``, ``mean_abs_adv_mixed``, ``mean_abs_adv_all_correct``, and for LENS
        ``mean_confidence_wrong``, ``mean_confidence_right`` and the [N] ``confidence``.
    """
    _validate(rewards, group_size, group_ids, estimator, old_logps, mask, correct, scale, eps, lens_alpha,
              lens_d_estimate, lens_groups, nan_rewards, process_group)
    options = (scale, eps, std_unbiased, lens_alpha, lens_d_estimate, lens_groups)
    with torch.no_grad():
        cdt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
        seq_stats = sequence_log_stats(old_logps, mask, cdt) if estimator == "lens" else None
        if process_group is None:
            return _group_advantages(rewards, group_size, group_ids, estimator, seq_stats, correct, *options)
        return _distributed_group_advantages(process_group, rewards, group_size, group_ids, estimator, seq_stats,
                                             correct, nan_rewards, options)


def sequence_log_stats(old_logps, mask, cdt):
    """(sum_t m l_old, sum_t m) of each completion, in the compute dtype: all LENS needs of old_logps."""
    lp = old_logps.to(cdt)
    if mask is None:
        return lp.sum(-1), torch.full(lp.shape[:-1], lp.shape[-1], dtype=cdt, device=lp.device)
    keep = mask.to(torch.bool)  # the 0/1 mask: an unweighted sum over the kept tokens, and their count
    lp = torch.where(keep, lp, torch.zeros((), dtype=cdt, device=lp.device))
    return lp.sum(-1), keep.to(cdt).sum(-1)


def _distributed_group_advantages(group, rewards, group_size, group_ids, estimator, seq_stats, correct,
                                  nan_rewards, options):
    from .distributed import gather_rows

    local = [rewards]
    local += [] if group_ids is None else [group_ids]
    local += [] if correct is None else [correct]
    local += [] if seq_stats is None else list(seq_stats)
    gathered, offset = gather_rows(group, local)
    whole = iter(gathered)
    rewards_all = next(whole)
    ids_all = None if group_ids is None else next(whole)
    correct_all = None if correct is None else next(whole)
    stats_all = None if seq_stats is None else (next(whole), next(whole))
    _check_batch(rewards_all, group_size, estimator, correct_all, nan_rewards,
                 where="completions summed over the process group")
    adv, metrics = _group_advantages(rewards_all, group_size, ids_all, estimator, stats_all, correct_all, *options)
    stop = offset + rewards.shape[0]
    if "confidence" in metrics:
        metrics["confidence"] = metrics["confidence"][offset:stop]
    return adv[offset:stop], metrics


def _group_advantages(rewards, group_size, group_ids, estimator, seq_stats, correct, scale, eps,
                      std_unbiased, lens_alpha, lens_d_estimate, lens_groups):
    n = rewards.shape[0]
    device = rewards.device
    cdt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = "group" if estimator in ("grpo", "lens") else "none"
    gidx = dense_group_index(n, group_size, group_ids, device)

    r = rewards.to(cdt)
    valid = ~torch.isnan(r)
    v = valid.to(cdt)
    zero = torch.zeros((), dtype=cdt, device=device)
    r0 = torch.where(valid, r, zero)
    c = (correct.to(torch.bool) if correct is not None else r0 > 0).to(cdt) * v

    count = _group_sum(v, gidx)
    k = _group_sum(c, gidx)
    exists = count > 0
    is_neg_g = exists & (k == 0)
    is_all_g = exists & (k == count)
    is_mixed_g = exists & ~is_neg_g & ~is_all_g
    is_neg, is_all, is_mixed = is_neg_g[gidx], is_all_g[gidx], is_mixed_g[gidx]
    count_i = count[gidx]

    x = r0
    metrics: Dict[str, torch.Tensor] = {}
    lens_on_neg = estimator == "lens" and lens_groups != "mixed"
    lens_on_mixed = estimator == "lens" and lens_groups != "negative"
    if estimator == "lens":
        seq_sum, length = seq_stats
        seq_mean = seq_sum / length.clamp(min=1.0)
        pbar = torch.exp(seq_mean)
        log_q = seq_mean if lens_d_estimate == "mean" else seq_sum
        max_p = torch.zeros(n, dtype=cdt, device=device).scatter_reduce_(
            0, gidx, pbar * v, reduce="amax", include_self=True)
        inv_q = torch.where(c > 0, torch.exp(-log_q), zero)  # may be inf: then D_imp = 0
        d_imp = count / _group_sum(inv_q, gidx)
        D = torch.where(is_mixed_g, torch.maximum(d_imp, 2.0 * max_p), 2.0 * max_p)[gidx]
        denom = D - pbar
        penalty = torch.where(denom > 0, pbar / torch.where(denom > 0, denom, torch.ones_like(denom)), zero)
        applies = (is_neg & lens_on_neg) | (is_mixed & lens_on_mixed)
        x = torch.where(applies, r0 - (1.0 - c) * penalty / count_i.clamp(min=1.0), r0)
        wrong, right = v * (1.0 - c), c
        metrics["mean_confidence_wrong"] = (pbar * wrong).sum() / wrong.sum().clamp(min=1.0)
        metrics["mean_confidence_right"] = (pbar * right).sum() / right.sum().clamp(min=1.0)
        metrics["confidence"] = pbar

    safe_count = count.clamp(min=1.0)
    group_total = _group_sum(x * v, gidx)
    mean_i = (group_total / safe_count)[gidx]
    centered = (x - mean_i) * v
    sq = _group_sum(centered * centered, gidx)
    if std_unbiased:
        std_g = torch.where(count > 1, torch.sqrt(sq / (count - 1.0).clamp(min=1.0)), torch.zeros_like(sq))
    else:
        std_g = torch.sqrt(sq / safe_count)
    n_valid = v.sum()
    batch_mean = (x * v).sum() / n_valid.clamp(min=1.0)
    batch_sq = (((x - batch_mean) * v) ** 2).sum()
    batch_std = torch.sqrt(batch_sq / ((n_valid - 1.0) if std_unbiased else n_valid).clamp(min=1.0))
    batch_std = torch.where(n_valid > 1, batch_std, zero)

    if estimator == "rloo":
        loo_mean = (group_total[gidx] - x) / (count_i - 1.0).clamp(min=1.0)
        base = torch.where(count_i > 1, x - loo_mean, zero)
    else:
        base = x - mean_i
    if scale == "group":
        scaled = base / (std_g[gidx] + eps)
    elif scale == "batch":
        scaled = base / (batch_std + eps)
    else:
        scaled = base
    if estimator == "lens":
        adv = torch.where(is_mixed, scaled, zero)
        neg_adv = lens_alpha * base if lens_on_neg else torch.zeros_like(base)
        adv = torch.where(is_neg, neg_adv, adv)
    else:
        adv = scaled
    adv = torch.where(valid, adv, zero)

    n_groups = exists.to(cdt).sum().clamp(min=1.0)
    metrics["frac_negative_groups"] = is_neg_g.to(cdt).sum() / n_groups
    metrics["frac_mixed_groups"] = is_mixed_g.to(cdt).sum() / n_groups
    metrics["frac_all_correct_groups"] = is_all_g.to(cdt).sum() / n_groups
    r_max = torch.zeros(n, dtype=cdt, device=device).scatter_reduce_(0, gidx, torch.where(valid, r0, -torch.inf),
                                                                     reduce="amax", include_self=False)
    r_min = torch.zeros(n, dtype=cdt, device=device).scatter_reduce_(0, gidx, torch.where(valid, r0, torch.inf),
                                                                     reduce="amin", include_self=False)
    metrics["frac_zero_std_groups"] = (exists & (r_max == r_min)).to(cdt).sum() / n_groups
    abs_adv = adv.abs()
    for name, kind in (("negative", is_neg), ("mixed", is_mixed), ("all_correct", is_all)):
        sel = kind.to(cdt) * v
        metrics[f"mean_abs_adv_{name}"] = (abs_adv * sel).sum() / sel.sum().clamp(min=1.0)
    return adv, metrics
