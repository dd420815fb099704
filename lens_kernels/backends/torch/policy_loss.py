"""The policy loss from log-probs: the per-token loss and its closed-form gradient coefficients dL/dl
and dL/dH, computed in forward. The fused GPU kernels port the same coefficients, so testing this
module against the autograd of ``reference.py`` tests the formulas they implement."""
from __future__ import annotations

import torch

from ...config import LossConfig
from .token_logprobs import token_logprobs


METRIC_NAMES = ("policy_loss", "kl", "entropy", "clip_frac_low", "clip_frac_high", "clip_frac",
                "ratio_mean", "ratio_min", "ratio_max")


def aggregation_weights(mask_f: torch.Tensor, mode: str, num_tokens=None, num_sequences=None,
                        norm_length=None, dp_size: float = 1.0) -> torch.Tensor:
    """w_t such that agg(v) = sum_t w_t v_t, for each aggregation mode (see ``LossConfig``)."""
    B, T = mask_f.shape
    if mode == "token-mean":
        denom = mask_f.sum().clamp(min=1.0) if num_tokens is None else num_tokens
        w = mask_f / denom
    elif mode == "seq-mean-token-mean":
        b_norm = B if num_sequences is None else num_sequences
        w = mask_f / (mask_f.sum(-1, keepdim=True).clamp(min=1.0) * b_norm)
    elif mode == "seq-mean-token-sum":
        w = mask_f / (B if num_sequences is None else num_sequences)
    elif mode == "seq-mean-token-sum-norm":
        length = float(T) if norm_length is None else float(norm_length)
        w = mask_f / ((B if num_sequences is None else num_sequences) * length)
    else:  # token-sum
        w = mask_f
    return w * dp_size if dp_size != 1.0 else w


def _as_tokens(x, like):
    x = x.to(like.dtype)
    return x.unsqueeze(-1).expand_as(like) if x.dim() == 1 else x


def token_coefficients(l, l_old, A, mask_f, cfg: LossConfig, is_weights=None):
    """Per-token policy term f, its derivative through the ratio df/drho, its direct derivative df/dl,
    the ratio rho and d rho / d(log-ratio) (0 where the log-ratio clamp is active)."""
    if cfg.ratio_level == "token":
        log_r = l - l_old
    else:
        seq = ((l - l_old) * mask_f).sum(-1, keepdim=True) / mask_f.sum(-1, keepdim=True).clamp(min=1.0)
        log_r = seq.expand_as(l)
    inside = None
    if cfg.log_ratio_clamp is not None:
        c = cfg.log_ratio_clamp
        inside = (log_r >= -c) & (log_r <= c)
        log_r = log_r.clamp(-c, c)
    rho = torch.exp(log_r)
    drho = rho if inside is None else rho * inside
    zero = torch.zeros((), dtype=l.dtype, device=l.device)
    direct = None
    if cfg.policy_loss == "ppo":
        lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.eps_high
        t1 = (rho if cfg.delta is None else rho.clamp(max=cfg.delta)) * A
        d1 = A if cfg.delta is None else A * (rho <= cfg.delta)
        t2 = rho.clamp(lo, hi) * A
        d2 = A * ((rho >= lo) & (rho <= hi))
        # torch.minimum splits the gradient at ties (rho inside the clip range gives t1 == t2)
        f = -torch.minimum(t1, t2)
        df = -torch.where(t1 < t2, d1, torch.where(t2 < t1, d2, 0.5 * (d1 + d2)))
        if cfg.dual_clip is not None:
            bound = -cfg.dual_clip * A
            neg = A < 0
            df = torch.where(neg & (f > bound), zero, torch.where(neg & (f == bound), 0.5 * df, df))
            f = torch.where(neg, torch.minimum(f, bound), f)
    elif cfg.policy_loss == "cispo":
        capped = rho.clamp(max=cfg.cispo_ratio_cap)
        f = -capped * A * l
        df = torch.zeros_like(l)
        direct = -capped * A
    else:  # sapo
        tau = torch.where(A > 0, torch.tensor(cfg.sapo_temperature_pos, dtype=l.dtype, device=l.device),
                          torch.tensor(cfg.sapo_temperature_neg, dtype=l.dtype, device=l.device))
        s = torch.sigmoid(tau * (rho - 1.0))
        f = -(4.0 / tau) * s * A
        df = -4.0 * s * (1.0 - s) * A
    if is_weights is not None:
        w = _as_tokens(is_weights, l)
        f, df = f * w, df * w
        direct = None if direct is None else direct * w
    return f, df, direct, rho, drho


def kl_and_grad(l, l_ref, cfg: LossConfig):
    d = l_ref - l
    if cfg.kl_estimator == "k1":
        kl, dkl = -d, torch.ones_like(d)
    elif cfg.kl_estimator == "k2":
        kl, dkl = 0.5 * d * d, -d
    else:
        ed = torch.exp(d)
        kl, dkl = ed - d - 1.0, 1.0 - ed
    if cfg.kl_clamp is not None:
        c = cfg.kl_clamp
        dkl = dkl * ((kl >= -c) & (kl <= c))
        kl = kl.clamp(-c, c)
    return kl, dkl


class PolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, entropy, advantages, mask, old_logps, ref_logps, is_weights, cfg,
                num_tokens, num_sequences):
        cdt = logps.dtype
        keep = mask.to(torch.bool)
        mask_f = keep.to(cdt)
        zero = torch.zeros((), dtype=cdt, device=logps.device)
        l = torch.where(keep, logps, zero)
        l_old = l if old_logps is None else torch.where(keep, old_logps.to(cdt), zero)
        A = _as_tokens(advantages, l)
        f, df, direct, rho, drho = token_coefficients(l, l_old, A, mask_f, cfg, is_weights)
        agg = dict(num_tokens=num_tokens, num_sequences=num_sequences, norm_length=cfg.loss_norm_length,
                   dp_size=cfg.dp_size)
        w = aggregation_weights(mask_f, cfg.loss_agg_mode, **agg)
        policy = (w * f).sum()
        loss = policy
        g_l = torch.zeros_like(l) if direct is None else w * direct
        n_tok = mask_f.sum().clamp(min=1.0)
        kl_mean = zero
        if cfg.beta != 0.0:
            if ref_logps is None:
                raise ValueError("ref_logps is required when config.beta != 0 (the KL term)")
            kl, dkl = kl_and_grad(l, torch.where(keep, ref_logps.to(cdt), zero), cfg)
            loss = loss + cfg.beta * (w * kl).sum()
            g_l = g_l + cfg.beta * w * dkl
            kl_mean = (kl * mask_f).sum() / n_tok
        u = w * df  # dL/drho per token
        if cfg.ratio_level == "token":
            g_l = g_l + u * drho
        elif cfg.ratio_level == "sequence":
            lengths = mask_f.sum(-1, keepdim=True).clamp(min=1.0)
            g_l = g_l + u.sum(-1, keepdim=True) * drho * mask_f / lengths
        else:  # sequence_token
            g_l = g_l + u * drho
        g_h = None
        ent_mean = zero
        if entropy is not None:
            H = torch.where(keep, entropy.to(cdt), zero)
            ent_mean = (H * mask_f).sum() / n_tok
            if cfg.entropy_coef != 0.0:
                w_h = w if cfg.entropy_agg_mode in (None, cfg.loss_agg_mode) else aggregation_weights(
                    mask_f, cfg.entropy_agg_mode, **agg)
                loss = loss - cfg.entropy_coef * (w_h * H).sum()
                g_h = -cfg.entropy_coef * w_h
        elif cfg.entropy_coef != 0.0:
            raise ValueError("entropy is required when config.entropy_coef != 0 (the entropy bonus)")
        low = (rho < 1.0 - cfg.epsilon_low) & (A < 0) & keep
        high = (rho > 1.0 + cfg.eps_high) & (A > 0) & keep
        inf = torch.full((), float("inf"), dtype=cdt, device=l.device)
        r_min = torch.where(keep, rho, inf).amin()
        r_max = torch.where(keep, rho, -inf).amax()
        one = torch.ones((), dtype=cdt, device=l.device)
        metrics = torch.stack([
            policy, kl_mean, ent_mean,
            low.sum() / n_tok, high.sum() / n_tok, (low | high).sum() / n_tok,
            (rho * mask_f).sum() / n_tok,
            torch.where(torch.isinf(r_min), one, r_min), torch.where(torch.isinf(r_max), one, r_max),
        ]).to(cdt)
        ctx.save_for_backward(g_l, g_h if g_h is not None else torch.empty(0))
        ctx.has_g_h = g_h is not None
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        g_l, g_h = ctx.saved_tensors
        d_logps = g_l * grad_loss
        d_entropy = g_h * grad_loss if ctx.has_g_h else None
        return d_logps, d_entropy, None, None, None, None, None, None, None, None


def policy_loss(logps, advantages, mask, old_logps=None, ref_logps=None, entropy=None, is_weights=None,
                config: LossConfig = LossConfig(), num_tokens=None, num_sequences=None):
    loss, metrics = PolicyLossFunction.apply(logps, entropy, advantages, mask, old_logps, ref_logps,
                                             is_weights, config, num_tokens, num_sequences)
    return loss, dict(zip(METRIC_NAMES, metrics.unbind(0)))


def policy_loss_from_logits(logits, targets, mask, advantages, old_logps=None, ref_logps=None, is_weights=None,
                            temperature=1.0, config: LossConfig = LossConfig(), num_tokens=None,
                            num_sequences=None, grad_scale=1.0, inplace=False):
    # The torch backend computes the logits gradient in backward from the actual grad_output, so
    # grad_scale (the fused kernels' contract) needs no correction here.
    logps, entropy = token_logprobs(logits, targets, mask, temperature, True, inplace)
    return policy_loss(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config,
                       num_tokens, num_sequences)
