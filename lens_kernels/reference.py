"""Float64 reference of every op (docs/design.md, Math): the oracle every backend is tested against.

Written to be read, not to be fast: it materializes full [.., V] tensors, loops over groups in
Python, and lets autograd differentiate the plain formulas. Each function's docstring states the
equation it implements. This file is the single source of the formulas.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from .config import LossConfig

F64 = torch.float64


def _f64(x):
    return None if x is None else x.to(F64)


# -------------------------------------------------------------------------------------------------
# Token log-probs and entropy
# -------------------------------------------------------------------------------------------------
def _tau(temperature, lead_ndim):
    """The temperature as a float64 tensor that broadcasts against [..., V] logits: [] and [B, T]
    (or [N]) as given, a per-sequence [B] or [B, 1] over every token of its row."""
    if not torch.is_tensor(temperature):
        return float(temperature)
    tau = _f64(temperature)
    if tau.dim() == 1 and lead_ndim == 2:  # [B]: one per sequence, never along T
        tau = tau.unsqueeze(-1)
    return tau.unsqueeze(-1)


def token_logprobs(logits, targets, temperature=1.0, mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """l_t = z_t[y_t] / tau - logsumexp_v(z_t[v] / tau);   H_t = -sum_v p_v log p_v, p = softmax(z_t / tau).

    logits [..., V], targets [...] (ids), temperature a float or a tensor of shape [], [B], [B, 1],
    [B, T] (3-D logits) or [], [N] (2-D). Returns float64 (logps, entropy). Special values, exactly
    as docs/inputs.md says:

    - masked positions (mask == 0) give l = 0 and H = 0, whatever their logits and targets hold, and
      their gradient row is exactly 0 (the row is replaced by zeros *before* the softmax: a where()
      after it would still send 0 * NaN = NaN back through the softmax of a NaN row);
    - a -inf logit has p = 0 and adds 0 to H (0 log 0 = 0), with gradient 0;
    - a kept target whose logit is -inf has l = -inf; a kept row with no finite logit, or with a NaN
      or +inf logit, has NaN l and H;
    - a kept target outside [0, V) has l = NaN, and a NaN gradient row.
    """
    z = _f64(logits)
    V = z.shape[-1]
    targets = targets.long()
    keep = torch.ones(targets.shape, dtype=torch.bool, device=z.device) if mask is None else mask.to(torch.bool)
    z = torch.where(keep.unsqueeze(-1), z, torch.zeros((), dtype=F64))
    x = z / _tau(temperature, targets.dim())
    log_p = torch.log_softmax(x, dim=-1)
    in_range = (targets >= 0) & (targets < V)
    poisoned = (x == math.inf).any(-1)  # +inf - logsumexp is NaN there, but -inf elsewhere in the row
    safe_targets = torch.where(keep & in_range, targets, torch.zeros_like(targets))
    logps = log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    # a kept bad target: NaN, and (multiplied, not substituted) a NaN gradient row as well
    logps = logps * torch.where(keep & (~in_range | poisoned), math.nan, 1.0).to(F64)
    # 0 log 0 = 0 at -inf entries; the double where keeps -inf out of the product in backward too
    banned = log_p == -math.inf
    safe_log_p = torch.where(banned, torch.zeros((), dtype=F64), log_p)
    entropy = -torch.where(banned, torch.zeros((), dtype=F64), safe_log_p.exp() * safe_log_p).sum(-1)
    zero = torch.zeros((), dtype=F64)
    return torch.where(keep, logps, zero), torch.where(keep, entropy, zero)


def linear_token_logprobs(hidden, weight, targets, bias=None, temperature=1.0, mask=None):
    """z = hidden @ weight^T (+ bias), then ``token_logprobs(z, ...)``: hidden [..., H], weight [V, H]."""
    h = _f64(hidden)
    if mask is not None:  # a masked row is never read: not even dW = sum_t dz_t h_t may see 0 * NaN
        h = torch.where(mask.to(torch.bool).unsqueeze(-1), h, torch.zeros((), dtype=F64))
    z = h @ _f64(weight).T
    if bias is not None:
        z = z + _f64(bias)
    return token_logprobs(z, targets, temperature, mask)


def _keep(mask, like):
    """The 0/1 mask as bool (every token kept for None)."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return mask.to(torch.bool)


def _masked(values, keep, fill=0.0):
    """values where the token is kept, ``fill`` elsewhere: a where, never a product with the mask, so a
    NaN or inf under the mask reaches neither the value nor (through autograd) any gradient."""
    return torch.where(keep, _f64(values), torch.tensor(fill, dtype=F64))


def sequence_sum(values, mask):
    """sum_t m_it v_it, with masked values never read."""
    return _masked(values, _keep(mask, values)).sum(-1)


def sequence_mean(values, mask):
    """s_i = sum_t m_it v_it / max(1, sum_t m_it): the masked mean (the 0/1 mask: an unweighted sum
    over the kept tokens, divided by their count)."""
    keep = _keep(mask, values)
    return sequence_sum(values, keep) / keep.to(F64).sum(-1).clamp(min=1.0)


# -------------------------------------------------------------------------------------------------
# Advantages (docs/design.md, Advantages)
# -------------------------------------------------------------------------------------------------
def group_members(n: int, group_size=None, group_ids=None):
    """The list of groups, each a list of completion indices, in order of first appearance."""
    if group_ids is None:
        return [list(range(g, g + group_size)) for g in range(0, n, group_size)]
    groups: Dict[int, list] = {}
    for i, gid in enumerate(group_ids.tolist()):
        groups.setdefault(gid, []).append(i)
    return list(groups.values())


def _std(values, unbiased):
    n = len(values)
    if n < 2 and unbiased:
        return 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1 if unbiased else n)
    return math.sqrt(var)


def group_advantages(
    rewards,
    group_size=None,
    group_ids=None,
    estimator="grpo",
    old_logps=None,
    mask=None,
    correct=None,
    scale=None,
    eps=1e-4,
    std_unbiased=True,
    lens_alpha=0.25,
    lens_d_estimate="mean",
    lens_groups="all",
    nan_rewards="raise",
) -> torch.Tensor:
    """Advantages A_i for each completion, group by group (docs/design.md, Advantages). Returns float64 [N].

    - grpo:     A_i = (r_i - mean_g r) / (std_g r + eps)
    - dr_grpo:  A_i = r_i - mean_g r
    - rloo:     A_i = r_i - (sum_g r - r_i) / (n_g - 1)
    - scale "batch": the divisor is the std of all rewards instead of the group's; "none": no divisor.
      A divisor (std + eps) of 0 (eps = 0 and equal values) gives A_i = 0, and a group whose values
      are all equal is centered to exactly 0.
    - lens:
        pbar_i = exp(s_i^old)                      (confidence, s the masked mean old log-prob)
        q_i    = pbar_i, or exp(sum_t m l_old) with lens_d_estimate="sequence"
        negative group (k = 0):   D = 2 max_j pbar_j
        mixed group (0 < k < G):  D = max(D_imp, 2 max_j pbar_j),  D_imp = 1 / ((1/G) sum_i c_i / q_i)
        rt_i = r_i - (1 - c_i) (1/G) pbar_i / (D - pbar_i)
        mixed:    A_i = (rt_i - mean rt) / (std rt + eps)      (the chosen scale)
        negative: A_i = alpha (rt_i - mean rt)
        all-correct: A_i = 0
      with c_i = the correct mask, or r_i for binary rewards. ``lens_groups`` = "negative" keeps
      GRPO on mixed groups; "mixed" gives negative groups 0 (the paper's ablations).
      The penalty pbar_i / (D - pbar_i) is computed as t_i / (R - t_i) with t_i = exp(s_i - s_max)
      and R = D / max_j pbar_j (= 2, or in a mixed group max(G / sum_j c_j exp(s_max - log q_j), 2)):
      the same number, exact for any finite mean log-prob. A NaN confidence in a group LENS
      applies to makes all of that group's advantages NaN.
    - neg_uniform (LENS with one penalty for every wrong answer, the largest LENS gives):
        rt_i = r_i - (1 - c_i) / G
        mixed:    A_i = (rt_i - mean rt) / (std rt + eps)      (the chosen scale; for binary
                  rewards an affine map of r, so GRPO's advantages up to the eps)
        negative: A_i = alpha (r_i - mean_g r) - alpha / G     (binary rewards: -alpha / G each;
                  the penalty is not de-meaned, which would cancel it)
        all-correct: A_i = 0
    - nsr (negative-sample reinforcement): A_i = -(1 - c_i): -1 for every wrong answer, 0 for
      every right one, in every group; no baseline, no scale.
    NaN rewards with nan_rewards="zero_advantage" are left out of every group statistic and get 0.
    """
    r_all = [float(v) for v in _f64(rewards).tolist()]
    n = len(r_all)
    if scale is None:
        scale = "group" if estimator in ("grpo", "lens", "neg_uniform") else "none"
    c_all = [float(v) for v in _f64(correct).tolist()] if correct is not None else list(r_all)
    valid = [not math.isnan(v) for v in r_all]
    if nan_rewards == "raise" and not all(valid):
        raise ValueError("rewards contain NaN")

    if estimator == "lens":
        s_mean = sequence_mean(old_logps, mask).tolist()
        s_sum = sequence_sum(old_logps, mask).tolist()
        log_q = s_mean if lens_d_estimate == "mean" else s_sum

    groups = group_members(n, group_size, group_ids)
    values = list(r_all)  # the values centered per group: rewards, or calibrated rewards
    kinds = {}
    undefined = set()  # groups whose LENS advantages read a NaN confidence
    for members in groups:
        members = [i for i in members if valid[i]]
        if not members:
            continue
        G = len(members)
        k = sum(c_all[i] for i in members)
        kind = "negative" if k == 0 else ("correct" if k == G else "mixed")
        kinds[tuple(members)] = kind
        if kind == "correct":
            continue
        if estimator == "neg_uniform":
            for i in members:
                values[i] = r_all[i] - (1.0 - c_all[i]) / G
            continue
        if estimator != "lens":
            continue
        if (lens_groups == "negative" and kind == "mixed") or (lens_groups == "mixed" and kind == "negative"):
            continue
        if any(math.isnan(s_mean[i]) for i in members):
            undefined.add(tuple(members))
            continue
        s_max = max(s_mean[i] for i in members)

        def relative_confidence(i):  # pbar_i / max_j pbar_j
            return 0.0 if s_max == -math.inf else math.exp(s_mean[i] - s_max)

        R = 2.0  # D / max_j pbar_j
        if kind == "mixed":
            inv = sum(math.exp(min(s_max - log_q[i], 709.0)) if c_all[i] > 0 and s_max > -math.inf else 0.0
                      for i in members)
            R = max(G / inv if inv > 0 else math.inf, 2.0)
        for i in members:
            t = relative_confidence(i)
            penalty = t / (R - t)
            values[i] = r_all[i] - (1.0 - c_all[i]) * penalty / G

    batch_values = [values[i] for i in range(n) if valid[i]]
    batch_std = _std(batch_values, std_unbiased) if len(batch_values) > 1 else 0.0
    adv = [0.0] * n
    for members, kind in kinds.items():
        vals = [values[i] for i in members]
        G = len(members)
        mean = sum(vals) / G
        flat = max(vals) == min(vals)

        def centered(i):
            return 0.0 if flat else values[i] - mean

        for i in members:
            if members in undefined:
                a = math.nan
            elif estimator == "lens":
                if kind == "correct" or (lens_groups == "mixed" and kind == "negative"):
                    a = 0.0
                elif kind == "negative":
                    a = lens_alpha * centered(i)
                else:
                    a = _scaled(centered(i), vals, scale, batch_std, eps, std_unbiased)
            elif estimator == "neg_uniform":
                if kind == "correct":
                    a = 0.0
                elif kind == "negative":
                    a = lens_alpha * centered(i) - lens_alpha / G
                else:
                    a = _scaled(centered(i), vals, scale, batch_std, eps, std_unbiased)
            elif estimator == "nsr":
                a = -(1.0 - c_all[i])
            elif estimator == "rloo":
                a = values[i] - (sum(vals) - values[i]) / (G - 1) if G > 1 and not flat else 0.0
                a = _scaled(a, vals, scale, batch_std, eps, std_unbiased)
            else:  # grpo, dr_grpo
                a = _scaled(centered(i), vals, scale, batch_std, eps, std_unbiased)
            adv[i] = a
    return torch.tensor(adv, dtype=F64)


def _scaled(a, group_values, scale, batch_std, eps, unbiased):
    """a / (std + eps) for the chosen scale; 0 when that divisor is 0 (then a is 0 as well)."""
    if scale == "group":
        divisor = (0.0 if max(group_values) == min(group_values) else _std(group_values, unbiased)) + eps
    elif scale == "batch":
        divisor = batch_std + eps
    else:
        return a
    return a / divisor if divisor > 0 else 0.0


# -------------------------------------------------------------------------------------------------
# Policy loss (docs/design.md, Policy loss)
# -------------------------------------------------------------------------------------------------
def per_token_policy_loss(logps, old_logps, advantages, mask, cfg: LossConfig, is_weights=None):
    """The policy term per token, and the ratio rho used for the clip metrics.

    log r = l - l_old per token, or per sequence s - s_old (broadcast over t), optionally clamped
    to +-log_ratio_clamp; "sequence_token" keeps the value of the sequence ratio but routes the
    gradient through each token: log r_t = l_t - sg(l_t) + sg(s - s_old).
    Masked entries of every input are replaced before use (``policy_loss`` does it; so does this).
    """
    keep = _keep(mask, logps)
    l, l_old = _masked(logps, keep), _masked(old_logps, keep)
    A = _per_token(advantages, keep, 0.0)
    if cfg.ratio_level == "token":
        log_r = l - l_old
    else:
        seq_log_r = sequence_mean(l - l_old, keep).unsqueeze(-1)
        if cfg.ratio_level == "sequence":
            log_r = seq_log_r.expand_as(l)
        else:
            log_r = l - l.detach() + seq_log_r.detach()
    if cfg.log_ratio_clamp is not None:
        log_r = log_r.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    rho = torch.exp(log_r)

    if cfg.policy_loss == "ppo":
        rho_clipped = rho.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.eps_high)
        rho_unclipped = rho if cfg.delta is None else rho.clamp(max=cfg.delta)
        loss = -torch.minimum(rho_unclipped * A, rho_clipped * A)
        if cfg.dual_clip is not None:
            loss = torch.where(A < 0, torch.minimum(loss, -cfg.dual_clip * A), loss)
    elif cfg.policy_loss == "cispo":
        loss = -rho.clamp(max=cfg.cispo_ratio_cap).detach() * A * l
    else:  # sapo
        tau = torch.where(A > 0, torch.tensor(cfg.sapo_temperature_pos, dtype=F64),
                          torch.tensor(cfg.sapo_temperature_neg, dtype=F64))
        loss = -(4.0 / tau) * torch.sigmoid(tau * (rho - 1.0)) * A
    if is_weights is not None:
        loss = loss * _per_token(is_weights, keep, 1.0)
    return _masked(loss, keep), rho


def _per_token(values, keep, fill):
    """A [B] (per sequence) or [B, T] input as [B, T], ``fill`` under the mask."""
    v = _f64(values)
    if v.dim() == 1:
        v = v.unsqueeze(-1).expand(keep.shape)
    return _masked(v, keep, fill)


def kl_estimate(logps, ref_logps, cfg: LossConfig):
    """k1 = l - l_ref;  k2 = (l - l_ref)^2 / 2;  k3 = exp(l_ref - l) - (l_ref - l) - 1; clamped to +-kl_clamp.

    At an infinite difference (l = -inf: a kept target with a -inf logit) the estimate is its limit
    (k1 -d, k2 and k3 +inf; IEEE would give inf - inf = NaN for k3), and with ``kl_clamp`` the bound,
    with gradient 0 (the double where keeps inf out of backward: 0 * inf would be NaN).
    """
    d = _f64(ref_logps) - _f64(logps)
    infinite = torch.isinf(d)
    d_safe = torch.where(infinite, torch.zeros((), dtype=F64), d)
    if cfg.kl_estimator == "k1":
        kl, limit = -d_safe, -d
    elif cfg.kl_estimator == "k2":
        kl, limit = 0.5 * d_safe * d_safe, torch.full_like(d, math.inf)
    else:
        kl, limit = torch.exp(d_safe) - d_safe - 1.0, torch.full_like(d, math.inf)
    kl = torch.where(infinite, limit.detach(), kl)
    if cfg.kl_clamp is not None:
        kl = kl.clamp(-cfg.kl_clamp, cfg.kl_clamp)
    return kl


def aggregate(values, mask, mode, num_tokens=None, num_sequences=None, norm_length=None, dp_size=1.0):
    """The aggregations of docs/design.md, Policy loss (see ``LossConfig``), times dp_size.

    Masked values are never read (a where, not a product with the mask). Empty work (B = 0, T = 0 or
    every token masked) gives 0: the default normalizers are clamped to >= 1.
    """
    keep = _keep(mask, values)
    v = _masked(values, keep)
    B, T = keep.shape
    count = keep.to(F64).sum()
    T_norm = count.clamp(min=1.0) if num_tokens is None else torch.as_tensor(num_tokens, dtype=F64)
    B_norm = float(max(B, 1)) if num_sequences is None else torch.as_tensor(num_sequences, dtype=F64)
    if mode == "token-mean":
        out = v.sum() / T_norm
    elif mode == "seq-mean-token-mean":
        out = sequence_mean(v, keep).sum() / B_norm
    elif mode == "seq-mean-token-sum":
        out = v.sum() / B_norm
    elif mode == "seq-mean-token-sum-norm":
        L = float(max(T, 1)) if norm_length is None else float(norm_length)
        out = v.sum() / (B_norm * L)
    elif mode == "token-sum":
        out = v.sum()
    else:
        raise ValueError(mode)
    return out * dp_size


def policy_loss(
    logps,
    advantages,
    mask,
    old_logps=None,
    ref_logps=None,
    entropy=None,
    is_weights=None,
    config: LossConfig = LossConfig(),
    num_tokens=None,
    num_sequences=None,
):
    """loss = agg(policy term + beta * KL) - entropy_coef * agg_H(H); returns (loss, metrics), float64.

    old_logps defaults to sg(logps) (on-policy: rho = 1 with the gradient of rho). Nothing at a masked
    position (log-probs, old and reference log-probs, entropy, advantages, IS weights) is read: each
    is replaced before use, so a NaN there reaches neither the loss nor a gradient.
    """
    cfg = config
    keep = _keep(mask, logps)
    l = _masked(logps, keep)
    l_old = l.detach() if old_logps is None else _masked(old_logps, keep)
    per_token, rho = per_token_policy_loss(l, l_old, advantages, keep, cfg, is_weights)
    agg = dict(num_tokens=num_tokens, num_sequences=num_sequences, norm_length=cfg.loss_norm_length,
               dp_size=cfg.dp_size)
    metrics = {}
    total = per_token
    if cfg.beta != 0.0:
        kl = _masked(kl_estimate(l, _masked(ref_logps, keep), cfg), keep)
        total = total + cfg.beta * kl
        metrics["kl"] = _masked_mean(kl, keep)
    loss = aggregate(total, keep, cfg.loss_agg_mode, **agg)
    metrics["policy_loss"] = aggregate(per_token, keep, cfg.loss_agg_mode, **agg).detach()
    if entropy is not None:
        H = _masked(entropy, keep)
        metrics["entropy"] = _masked_mean(H, keep).detach()
        if cfg.entropy_coef != 0.0:
            loss = loss - cfg.entropy_coef * aggregate(H, keep, cfg.entropy_agg_mode or cfg.loss_agg_mode, **agg)
    A = _per_token(advantages, keep, 0.0)
    r = rho.detach()
    low = ((r < 1.0 - cfg.epsilon_low) & (A < 0)).to(F64)
    high = ((r > 1.0 + cfg.eps_high) & (A > 0)).to(F64)
    metrics["clip_frac_low"] = _masked_mean(low, keep)
    metrics["clip_frac_high"] = _masked_mean(high, keep)
    metrics["clip_frac"] = _masked_mean(torch.clamp(low + high, max=1.0), keep)
    metrics["ratio_mean"] = _masked_mean(r, keep)
    if keep.any():
        metrics["ratio_min"], metrics["ratio_max"] = r[keep].min(), r[keep].max()
    else:
        metrics["ratio_min"] = metrics["ratio_max"] = torch.tensor(1.0, dtype=F64)
    return loss, metrics


def _masked_mean(v, keep):
    keep = keep.to(torch.bool)
    return _masked(v.detach(), keep).sum() / keep.to(F64).sum().clamp(min=1.0)


def policy_loss_from_logits(logits, targets, mask, advantages, temperature=1.0, **kwargs):
    """``policy_loss(token_logprobs(logits, targets), ...)`` with the entropy from the same logits."""
    logps, entropy = token_logprobs(logits, targets, temperature, mask)
    return policy_loss(logps, advantages, mask, entropy=entropy, **kwargs)


def policy_loss_from_hidden(hidden, weight, targets, mask, advantages, bias=None, temperature=1.0, **kwargs):
    """``policy_loss_from_logits(hidden @ weight^T + bias, ...)``."""
    logps, entropy = linear_token_logprobs(hidden, weight, targets, bias, temperature, mask)
    return policy_loss(logps, advantages, mask, entropy=entropy, **kwargs)
