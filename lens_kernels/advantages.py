"""group_advantages: GRPO, Dr. GRPO, RLOO, batch scaling, LENS and two simpler uses of negative groups
(a uniform penalty, negative-sample reinforcement), vectorized.

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

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "lens", "neg_uniform", "nsr")
# estimators that tell right from wrong: binary rewards, or a correct= mask
CORRECTNESS_ESTIMATORS = ("lens", "neg_uniform", "nsr")
SCALES = ("group", "batch", "none")
LENS_D_ESTIMATES = ("mean", "sequence")
LENS_GROUPS = ("all", "negative", "mixed")
NAN_REWARDS = ("raise", "zero_advantage")

# Per-trainer conventions for the std's eps (docs/design.md, Advantages): pass as eps=TRAINER_EPS["verl"].
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
    if estimator == "nsr" and scale not in (None, "none"):
        raise ValueError(f"scale must be None or 'none' for estimator='nsr' (its advantages are -1 for a wrong "
                         f"answer and 0 for a right one, never divided by a std), got {scale!r}")
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
    if correct is not None and correct.dtype != torch.bool and value_checks_enabled(correct):
        bad = (correct != 0) & (correct != 1)  # NaN too
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"correct must hold 0 or 1 (or be a bool tensor): which completions are right, not a "
                             f"grade; correct[{i}] = {float(correct[i])}")
    if estimator in CORRECTNESS_ESTIMATORS and correct is None and value_checks_enabled(rewards):
        r = rewards.double()
        bad = ~((r == 0) | (r == 1) | torch.isnan(r))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"rewards must be binary (0 or 1) for estimator={estimator!r}, got rewards[{i}] = {float(r[i])}; "
                "pass correct= ([N] bool) to use graded rewards"
            )


def _check_confidence(seq_sum, rewards):
    """LENS reads each completion's masked mean old log-prob: a NaN at a kept token makes it NaN."""
    if value_checks_enabled(seq_sum) and value_checks_enabled(rewards):
        bad = torch.isnan(seq_sum)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"old_logps must not be NaN at a kept token (mask 1): completion {i} has one (or both "
                             "+inf and -inf), so its LENS confidence is undefined")


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
    """Advantages of a rollout batch of N completions in groups (docs/design.md, Advantages). No gradient, no host sync.

    Args:
        rewards: [N] rewards (binary for lens, neg_uniform and nsr unless ``correct`` is given);
            N = 0 gives an empty result. Values (finite; binary for those) are checked when values
            are checked: CPU tensors always, GPU tensors with ``LENS_KERNELS_CHECK=1``, never under
            ``torch.compile``.
        group_size: G for contiguous groups [0..G), [G..2G), ...; or
        group_ids: [N] integer group of each completion, in any order.
        estimator: "grpo" (r - mean) / (std + eps); "dr_grpo" r - mean; "rloo" leave-one-out
            baseline; "lens" (LENS calibrated rewards); "neg_uniform" (LENS with the same penalty for
            every wrong answer: a negative group's wrong answers get -lens_alpha / G each, not
            de-meaned; mixed groups are normalized like GRPO); "nsr" (negative-sample
            reinforcement: -1 for every wrong answer, 0 for every right one, no baseline, no
            scale). Each formula is written out in ``reference.group_advantages``.
        old_logps: [N, T] token log-probs under the sampling policy (LENS confidence: the mean over
            the kept tokens; masked entries are never read). mask: [N, T] 0/1 completion mask for
            them (default all ones; another value is a ValueError when values are checked). A NaN
            at a kept token is a ValueError when values are checked; else every advantage of a
            group whose LENS advantages read that confidence is NaN (with scale="batch", whose std
            reads every group, every advantage), and so are the metrics that average over them.
        correct: [N] bool (or 0/1 of another dtype; other values are a ValueError when values are
            checked), which completions are correct (graded rewards with lens, neg_uniform, nsr;
            group kinds).
        scale: "group" (per-group std), "batch" (std of the whole batch, TRL scale_rewards="batch"),
            "none"; None means "group" for grpo/lens/neg_uniform and "none" for dr_grpo/rloo/nsr
            (nsr takes no other).
        eps: added to the std, finite >= 0: TRL 1e-4, verl 1e-6, OpenRLHF 1e-9 (``TRAINER_EPS``).
            With eps = 0 a group whose std is 0 (all its rewards equal) gets advantage 0, never
            0 / 0; so does every completion when the batch std is 0 with scale="batch".
        std_unbiased: Bessel's correction (True, as TRL and verl).
        lens_alpha: weight of negative-group advantages, finite >= 0 (the method's hyperparameter,
            0.25), for lens and neg_uniform.
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
            if seq_stats is not None:
                _check_confidence(seq_stats[0], rewards)
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
    if stats_all is not None:
        _check_confidence(stats_all[0], rewards_all)
    adv, metrics = _group_advantages(rewards_all, group_size, ids_all, estimator, stats_all, correct_all, *options)
    stop = offset + rewards.shape[0]
    if "confidence" in metrics:
        metrics["confidence"] = metrics["confidence"][offset:stop]
    return adv[offset:stop], metrics


def _group_amax(values: torch.Tensor, index: torch.Tensor, fill: float) -> torch.Tensor:
    """Per dense group, the max of ``values`` (``fill`` for an empty slot: every value was ``fill``)."""
    return torch.full_like(values, fill).scatter_reduce_(0, index, values, reduce="amax", include_self=True)


def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator where the denominator is > 0, else 0: a std (+ eps) of 0 means every
    centered value is 0 too, and 0 / 0 must not become NaN."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, torch.ones_like(denominator)),
                       torch.zeros_like(numerator))


def _group_advantages(rewards, group_size, group_ids, estimator, seq_stats, correct, scale, eps,
                      std_unbiased, lens_alpha, lens_d_estimate, lens_groups):
    n = rewards.shape[0]
    device = rewards.device
    cdt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = "group" if estimator in ("grpo", "lens", "neg_uniform") else "none"
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
    safe_count_i = count_i.clamp(min=1.0)

    x = r0
    metrics: Dict[str, torch.Tensor] = {}
    lens_on_neg = estimator == "lens" and lens_groups != "mixed"
    lens_on_mixed = estimator == "lens" and lens_groups != "negative"
    poisoned = None
    if estimator == "lens":
        seq_sum, length = seq_stats
        seq_mean = seq_sum / length.clamp(min=1.0)
        pbar = torch.exp(seq_mean)
        log_q = seq_mean if lens_d_estimate == "mean" else seq_sum
        # pbar_i / (D - pbar_i) relative to the group's most confident completion, in log space:
        # t_i = pbar_i / max_j pbar_j = exp(s_i - s_max) and R = D / max_j pbar_j, so the penalty
        # t_i / (R - t_i) is exact for any finite mean log-prob (exp(s_i) alone underflows fp32
        # below about -104). A group whose every confidence is 0 (s = -inf) gets t = 0.
        unknown = torch.isnan(seq_mean) & valid
        s_max = _group_amax(torch.where(valid & ~unknown, seq_mean, -torch.inf), gidx, -torch.inf)[gidx]
        finite_max = s_max > -torch.inf
        t = torch.where(finite_max, torch.exp(torch.where(finite_max, seq_mean - s_max, zero)), zero)
        # D_imp / max pbar = G / sum_{correct j} exp(s_max - log q_j): the sum may be inf (then D is
        # the confidence bound, 2 max pbar) or 0 (D_imp infinite: every penalty 0)
        inv_q = torch.where((c > 0) & finite_max, torch.exp(torch.where(finite_max, s_max - log_q, zero)), zero)
        inv_sum = _group_sum(inv_q, gidx)
        ratio_imp = torch.where(inv_sum > 0, count / torch.where(inv_sum > 0, inv_sum, torch.ones_like(inv_sum)),
                                torch.full_like(inv_sum, torch.inf))
        R = torch.where(is_mixed_g, torch.clamp(ratio_imp, min=2.0), torch.full_like(count, 2.0))[gidx]
        penalty = t / (R - t)  # R >= 2 >= 2 t: the denominator is >= 1 (NaN only from a NaN confidence)
        applies = (is_neg & lens_on_neg) | (is_mixed & lens_on_mixed)
        x = torch.where(applies & valid, r0 - (1.0 - c) * penalty / safe_count_i, r0)
        # a NaN confidence makes its group's LENS advantages undefined: NaN for the whole group
        poisoned = applies & (_group_sum(unknown.to(cdt), gidx)[gidx] > 0)
        wrong, right = valid & (c == 0), c > 0
        metrics["mean_confidence_wrong"] = (torch.where(wrong, pbar, zero).sum()
                                            / wrong.to(cdt).sum().clamp(min=1.0))
        metrics["mean_confidence_right"] = (torch.where(right, pbar, zero).sum()
                                            / right.to(cdt).sum().clamp(min=1.0))
        metrics["confidence"] = pbar
    elif estimator == "neg_uniform":
        # every wrong answer the same penalty, the largest LENS gives (its most confident mistake)
        x = r0 - (1.0 - c) / safe_count_i

    x_valid = torch.where(valid, x, zero)
    group_total = _group_sum(x_valid, gidx)
    mean_i = (group_total / count.clamp(min=1.0))[gidx]
    # a group whose values are all equal is centered exactly (to 0, not to a rounding residue that a
    # std of the same residue would blow up to O(1) at eps = 0)
    x_max = _group_amax(torch.where(valid, x, -torch.inf), gidx, -torch.inf)
    x_min = -_group_amax(torch.where(valid, -x, -torch.inf), gidx, -torch.inf)
    flat_i = (x_max == x_min)[gidx]
    centered = torch.where(valid & ~flat_i, x - mean_i, zero)
    sq = _group_sum(centered * centered, gidx)
    if std_unbiased:
        std_g = torch.where(count > 1, torch.sqrt(sq / (count - 1.0).clamp(min=1.0)), torch.zeros_like(sq))
    else:
        std_g = torch.sqrt(sq / count.clamp(min=1.0))
    n_valid = v.sum()
    batch_mean = x_valid.sum() / n_valid.clamp(min=1.0)
    batch_dev = torch.where(valid, x - batch_mean, zero)
    batch_dof = ((n_valid - 1.0) if std_unbiased else n_valid).clamp(min=1.0)
    batch_std = torch.sqrt((batch_dev * batch_dev).sum() / batch_dof)
    batch_std = torch.where(n_valid > 1, batch_std, zero)

    if estimator == "rloo":
        loo_mean = (group_total[gidx] - x) / (count_i - 1.0).clamp(min=1.0)
        base = torch.where((count_i > 1) & ~flat_i, x - loo_mean, zero)
    else:
        base = centered
    if scale == "group":
        scaled = _divide(base, std_g[gidx] + eps)
    elif scale == "batch":
        scaled = _divide(base, batch_std + eps)
    else:
        scaled = base
    if estimator == "lens":
        adv = torch.where(is_mixed, scaled, zero)
        neg_adv = lens_alpha * base if lens_on_neg else torch.zeros_like(base)
        adv = torch.where(is_neg, neg_adv, adv)
        adv = torch.where(poisoned, torch.full_like(adv, torch.nan), adv)
    elif estimator == "neg_uniform":
        # de-meaning would cancel the uniform penalty: only the rewards are centered, the penalty stays
        neg_adv = lens_alpha * (base - 1.0 / safe_count_i)
        adv = torch.where(is_neg, neg_adv, torch.where(is_mixed, scaled, zero))
    elif estimator == "nsr":
        adv = -(1.0 - c)
    else:
        adv = scaled
    adv = torch.where(valid, adv, zero)

    n_groups = exists.to(cdt).sum().clamp(min=1.0)
    metrics["frac_negative_groups"] = is_neg_g.to(cdt).sum() / n_groups
    metrics["frac_mixed_groups"] = is_mixed_g.to(cdt).sum() / n_groups
    metrics["frac_all_correct_groups"] = is_all_g.to(cdt).sum() / n_groups
    r_max = _group_amax(torch.where(valid, r0, -torch.inf), gidx, -torch.inf)
    r_min = -_group_amax(torch.where(valid, -r0, -torch.inf), gidx, -torch.inf)
    metrics["frac_zero_std_groups"] = (exists & (r_max == r_min)).to(cdt).sum() / n_groups
    abs_adv = adv.abs()
    for name, kind in (("negative", is_neg), ("mixed", is_mixed), ("all_correct", is_all)):
        sel = kind & valid
        metrics[f"mean_abs_adv_{name}"] = (torch.where(sel, abs_adv, zero).sum()
                                           / sel.to(cdt).sum().clamp(min=1.0))
    return adv, metrics
