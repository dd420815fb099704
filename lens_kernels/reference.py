"""Float64 reference of every op (SPEC section 2): the oracle every backend is tested against.

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
def token_logprobs(logits, targets, temperature=1.0, mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """l_t = z_t[y_t] / tau - logsumexp_v(z_t[v] / tau);   H_t = -sum_v p_v log p_v, p = softmax(z_t / tau).

    logits [..., V], targets [...] (ids), temperature a float or a tensor broadcastable to
    targets. Masked positions (mask == 0) give l = 0 and H = 0. Returns float64 (logps, entropy).
    """
    z = _f64(logits)
    tau = temperature if not torch.is_tensor(temperature) else _f64(temperature).unsqueeze(-1)
    x = z / tau
    log_p = torch.log_softmax(x, dim=-1)
    if mask is not None:
        keep = mask.to(torch.bool)
        safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    else:
        keep, safe_targets = None, targets
    logps = log_p.gather(-1, safe_targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    if keep is not None:
        logps = torch.where(keep, logps, torch.zeros_like(logps))
        entropy = torch.where(keep, entropy, torch.zeros_like(entropy))
    return logps, entropy


def linear_token_logprobs(hidden, weight, targets, bias=None, temperature=1.0, mask=None):
    """z = hidden @ weight^T (+ bias), then ``token_logprobs(z, ...)``: hidden [..., H], weight [V, H]."""
    z = _f64(hidden) @ _f64(weight).T
    if bias is not None:
        z = z + _f64(bias)
    return token_logprobs(z, targets, temperature, mask)


def sequence_mean(values, mask):
    """s_i = sum_t m_it v_it / max(1, sum_t m_it)."""
    m = _f64(mask)
    return (_f64(values) * m).sum(-1) / m.sum(-1).clamp(min=1.0)


# -------------------------------------------------------------------------------------------------
# Advantages (SPEC 2.1)
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
    """Advantages A_i for each completion, group by group (SPEC 2.1). Returns float64 [N].

    - grpo:     A_i = (r_i - mean_g r) / (std_g r + eps)
    - dr_grpo:  A_i = r_i - mean_g r
    - rloo:     A_i = r_i - (sum_g r - r_i) / (n_g - 1)
    - scale "batch": the divisor is the std of all rewards instead of the group's; "none": no divisor.
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
    NaN rewards with nan_rewards="zero_advantage" are left out of every group statistic and get 0.
    """
    r_all = [float(v) for v in _f64(rewards).tolist()]
    n = len(r_all)
    if scale is None:
        scale = "group" if estimator in ("grpo", "lens") else "none"
    c_all = [float(v) for v in _f64(correct).tolist()] if correct is not None else list(r_all)
    valid = [not math.isnan(v) for v in r_all]
    if nan_rewards == "raise" and not all(valid):
        raise ValueError("rewards contain NaN")

    if estimator == "lens":
        s_mean = sequence_mean(old_logps, mask).tolist()
        s_sum = (_f64(old_logps) * _f64(mask)).sum(-1).tolist()
        pbar = [math.exp(v) for v in s_mean]
        log_q = s_mean if lens_d_estimate == "mean" else s_sum

    groups = group_members(n, group_size, group_ids)
    values = list(r_all)  # the values centered per group: rewards, or LENS-calibrated rewards
    kinds = {}
    for members in groups:
        members = [i for i in members if valid[i]]
        if not members:
            continue
        G = len(members)
        k = sum(c_all[i] for i in members)
        kind = "negative" if k == 0 else ("correct" if k == G else "mixed")
        kinds[tuple(members)] = kind
        if estimator != "lens" or kind == "correct":
            continue
        if (lens_groups == "negative" and kind == "mixed") or (lens_groups == "mixed" and kind == "negative"):
            continue
        max_p = max(pbar[i] for i in members)
        D = 2.0 * max_p
        if kind == "mixed":
            inv = sum(math.exp(min(-log_q[i], 709.0)) if c_all[i] > 0 else 0.0 for i in members)
            D_imp = G / inv if inv > 0 else math.inf
            D = max(D_imp, D)
        for i in members:
            denom = D - pbar[i]
            penalty = pbar[i] / denom if denom > 0 else 0.0
            values[i] = r_all[i] - (1.0 - c_all[i]) * penalty / G

    batch_values = [values[i] for i in range(n) if valid[i]]
    batch_std = _std(batch_values, std_unbiased) if len(batch_values) > 1 else 0.0
    adv = [0.0] * n
    for members, kind in kinds.items():
        vals = [values[i] for i in members]
        G = len(members)
        mean = sum(vals) / G
        for i in members:
            if estimator == "lens":
                if kind == "correct" or (lens_groups == "mixed" and kind == "negative"):
                    a = 0.0
                elif kind == "negative":
                    a = lens_alpha * (values[i] - mean)
                else:
                    a = _scaled(values[i] - mean, vals, scale, batch_std, eps, std_unbiased)
            elif estimator == "rloo":
                a = values[i] - (sum(vals) - values[i]) / (G - 1) if G > 1 else 0.0
                a = _scaled(a, vals, scale, batch_std, eps, std_unbiased)
            else:  # grpo, dr_grpo
                a = _scaled(values[i] - mean, vals, scale, batch_std, eps, std_unbiased)
            adv[i] = a
    return torch.tensor(adv, dtype=F64)


def _scaled(a, group_values, scale, batch_std, eps, unbiased):
    if scale == "group":
        return a / (_std(group_values, unbiased) + eps)
    if scale == "batch":
        return a / (batch_std + eps)
    return a


# -------------------------------------------------------------------------------------------------
# Policy loss (SPEC 2.2)
# -------------------------------------------------------------------------------------------------
def per_token_policy_loss(logps, old_logps, advantages, mask, cfg: LossConfig, is_weights=None):
    """The policy term per token, and the ratio rho used for the clip metrics.

    log r = l - l_old per token, or per sequence s - s_old (broadcast over t), optionally clamped
    to +-log_ratio_clamp; "sequence_token" keeps the value of the sequence ratio but routes the
    gradient through each token: log r_t = l_t - sg(l_t) + sg(s - s_old).
    """
    l, l_old, m = _f64(logps), _f64(old_logps), _f64(mask)
    A = _f64(advantages)
    if A.dim() == 1:
        A = A.unsqueeze(-1)
    if cfg.ratio_level == "token":
        log_r = l - l_old
    else:
        seq_log_r = ((l - l_old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
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
        w = _f64(is_weights)
        loss = loss * (w.unsqueeze(-1) if w.dim() == 1 else w)
    return loss, rho


def kl_estimate(logps, ref_logps, cfg: LossConfig):
    """k1 = l - l_ref;  k2 = (l - l_ref)^2 / 2;  k3 = exp(l_ref - l) - (l_ref - l) - 1; clamped to +-kl_clamp."""
    d = _f64(ref_logps) - _f64(logps)
    if cfg.kl_estimator == "k1":
        kl = -d
    elif cfg.kl_estimator == "k2":
        kl = 0.5 * d * d
    else:
        kl = torch.exp(d) - d - 1.0
    if cfg.kl_clamp is not None:
        kl = kl.clamp(-cfg.kl_clamp, cfg.kl_clamp)
    return kl


def aggregate(values, mask, mode, num_tokens=None, num_sequences=None, norm_length=None, dp_size=1.0):
    """The aggregations of SPEC 2.2 (see ``LossConfig``), times dp_size."""
    v, m = _f64(values), _f64(mask)
    B, T = m.shape
    T_norm = m.sum().clamp(min=1.0) if num_tokens is None else torch.as_tensor(num_tokens, dtype=F64)
    B_norm = float(B) if num_sequences is None else torch.as_tensor(num_sequences, dtype=F64)
    if mode == "token-mean":
        out = (v * m).sum() / T_norm
    elif mode == "seq-mean-token-mean":
        out = ((v * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / B_norm
    elif mode == "seq-mean-token-sum":
        out = (v * m).sum() / B_norm
    elif mode == "seq-mean-token-sum-norm":
        L = float(T) if norm_length is None else float(norm_length)
        out = (v * m).sum() / (B_norm * L)
    elif mode == "token-sum":
        out = (v * m).sum()
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

    old_logps defaults to sg(logps) (on-policy: rho = 1 with the gradient of rho).
    """
    cfg = config
    l = _f64(logps)
    l_old = l.detach() if old_logps is None else _f64(old_logps)
    m = _f64(mask)
    per_token, rho = per_token_policy_loss(l, l_old, advantages, m, cfg, is_weights)
    agg = dict(num_tokens=num_tokens, num_sequences=num_sequences, norm_length=cfg.loss_norm_length,
               dp_size=cfg.dp_size)
    metrics = {}
    total = per_token
    if cfg.beta != 0.0:
        kl = kl_estimate(l, ref_logps, cfg)
        total = total + cfg.beta * kl
        metrics["kl"] = _masked_mean(kl, m)
    loss = aggregate(total, m, cfg.loss_agg_mode, **agg)
    metrics["policy_loss"] = aggregate(per_token, m, cfg.loss_agg_mode, **agg).detach()
    if entropy is not None:
        H = _f64(entropy)
        metrics["entropy"] = _masked_mean(H, m).detach()
        if cfg.entropy_coef != 0.0:
            loss = loss - cfg.entropy_coef * aggregate(H, m, cfg.entropy_agg_mode or cfg.loss_agg_mode, **agg)
    A = _f64(advantages)
    A = A.unsqueeze(-1) if A.dim() == 1 else A
    r = rho.detach()
    low = ((r < 1.0 - cfg.epsilon_low) & (A < 0)).to(F64)
    high = ((r > 1.0 + cfg.eps_high) & (A > 0)).to(F64)
    metrics["clip_frac_low"] = _masked_mean(low, m)
    metrics["clip_frac_high"] = _masked_mean(high, m)
    metrics["clip_frac"] = _masked_mean(torch.clamp(low + high, max=1.0), m)
    metrics["ratio_mean"] = _masked_mean(r, m)
    keep = m > 0
    if keep.any():
        metrics["ratio_min"], metrics["ratio_max"] = r[keep].min(), r[keep].max()
    else:
        metrics["ratio_min"] = metrics["ratio_max"] = torch.tensor(1.0, dtype=F64)
    return loss, metrics


def _masked_mean(v, m):
    return (v.detach() * m).sum() / m.sum().clamp(min=1.0)


def policy_loss_from_logits(logits, targets, mask, advantages, temperature=1.0, **kwargs):
    """``policy_loss(token_logprobs(logits, targets), ...)`` with the entropy from the same logits."""
    logps, entropy = token_logprobs(logits, targets, temperature, mask)
    return policy_loss(logps, advantages, mask, entropy=entropy, **kwargs)


def policy_loss_from_hidden(hidden, weight, targets, mask, advantages, bias=None, temperature=1.0, **kwargs):
    """``policy_loss_from_logits(hidden @ weight^T + bias, ...)``."""
    logps, entropy = linear_token_logprobs(hidden, weight, targets, bias, temperature, mask)
    return policy_loss(logps, advantages, mask, entropy=entropy, **kwargs)
