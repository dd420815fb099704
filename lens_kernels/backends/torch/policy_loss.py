"""The policy loss from log-probs: the per-token loss and its closed-form gradient coefficients dL/dl
and dL/dH, computed in forward. The fused GPU kernels port the same coefficients, so testing this
module against the autograd of ``reference.py`` tests the formulas they implement."""
from __future__ import annotations

import torch

from ...config import LossConfig
from ._common import (WorkBuffers, chunk_entropy, chunk_log_softmax, compute_dtype, flat_keep, mark_bad, per_token,
                      row_chunk_pairs, slice_tau, tau_rows, write_grad)
from .vocab_shard import chunk_rows


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


def gated_product(x, gate):
    """x * gate, exactly 0 where the gate is 0 even when x is infinite (an overflowed ratio): the float64
    reference's value there, where IEEE would give 0 * inf = NaN."""
    return torch.where(gate == 0, torch.zeros((), dtype=x.dtype, device=x.device), x * gate)


def token_coefficients(l, l_old, A, mask_f, cfg: LossConfig, is_weights=None):
    """Per-token policy term f, its derivative through the ratio df/drho, its direct derivative df/dl,
    the ratio rho and d rho / d(log-ratio) (0 where the log-ratio clamp is active).

    rho may be +inf (a log-ratio above ~88.7 nats in fp32); every gate then selects, so a clipped,
    capped or saturated token keeps df = 0 and a zero advantage or IS weight a zero term. Callers
    combine df and drho with ``gated_product`` for the same reason. Written so that autograd through
    these expressions also gives the exact second derivatives (``PolicyLoss`` with
    ``create_graph=True``): the stop-gradients of GSPO-token and CISPO are ``detach()``."""
    if cfg.ratio_level == "token":
        log_r = l - l_old
    else:
        seq = ((l - l_old) * mask_f).sum(-1, keepdim=True) / mask_f.sum(-1, keepdim=True).clamp(min=1.0)
        log_r = seq.expand_as(l)
        if cfg.ratio_level == "sequence_token":
            # GSPO-token: the sequence's value, a token's own gradient (sg(s_i) + l_t - sg(l_t)); the same
            # numbers here, and the exact second derivative when autograd differentiates this expression
            log_r = log_r.detach() + (l - l.detach())
    inside = None
    if cfg.log_ratio_clamp is not None:
        c = cfg.log_ratio_clamp
        inside = (log_r >= -c) & (log_r <= c)
        log_r = log_r.clamp(-c, c)
    rho = torch.exp(log_r)
    zero = torch.zeros((), dtype=l.dtype, device=l.device)
    drho = rho if inside is None else torch.where(inside, rho, zero)
    direct = None
    if cfg.policy_loss == "ppo":
        lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.eps_high
        t1 = gated_product(rho if cfg.delta is None else rho.clamp(max=cfg.delta), A)
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
        capped = rho.detach().clamp(max=cfg.cispo_ratio_cap)  # sg(): CISPO's weight takes no gradient
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
        f, df = gated_product(f, w), gated_product(df, w)
        direct = None if direct is None else gated_product(direct, w)
    return f, df, direct, rho, drho


def kl_and_grad(l, l_ref, cfg: LossConfig):
    """The KL estimate per token and its derivative in l. An infinite difference (a -inf log-prob) gives
    the estimate's limit with derivative 0, as the reference does; the clamp selects a zero derivative
    (the unclamped derivative may be infinite there)."""
    d = l_ref - l
    if cfg.kl_estimator == "k1":
        kl, dkl = -d, torch.ones_like(d)
    elif cfg.kl_estimator == "k2":
        kl, dkl = 0.5 * d * d, -d
    else:
        infinite = torch.isinf(d)
        d_safe = torch.where(infinite, torch.zeros((), dtype=d.dtype, device=d.device), d)
        ed = torch.exp(d_safe)
        kl = torch.where(infinite, torch.full((), float("inf"), dtype=d.dtype, device=d.device), ed - d_safe - 1.0)
        dkl = torch.where(infinite, torch.zeros((), dtype=d.dtype, device=d.device), 1.0 - ed)
    if cfg.kl_clamp is not None:
        c = cfg.kl_clamp
        dkl = torch.where((kl >= -c) & (kl <= c), dkl, torch.zeros((), dtype=d.dtype, device=d.device))
        kl = kl.clamp(-c, c)
    return kl, dkl


def loss_terms(logps, entropy, advantages, mask, old_logps, ref_logps, is_weights, cfg: LossConfig,
               num_tokens, num_sequences):
    """(loss, metrics [9], dL/dl, dL/dH or None) of the policy loss from [B, T] log-probs.

    Whatever sits under the mask (log-probs, advantages, old and reference log-probs, IS weights,
    entropy) is replaced by 0 before it is read, so NaN or garbage there influences nothing.
    """
    cdt = logps.dtype
    keep = mask != 0
    mask_f = keep.to(cdt)
    zero = torch.zeros((), dtype=cdt, device=logps.device)
    l = torch.where(keep, logps, zero)
    l_old = l if old_logps is None else torch.where(keep, old_logps.to(cdt), zero)
    A = torch.where(keep, _as_tokens(advantages, l), zero)
    is_w = None if is_weights is None else torch.where(keep, _as_tokens(is_weights, l), zero)
    f, df, direct, rho, drho = token_coefficients(l, l_old, A, mask_f, cfg, is_w)
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
    if cfg.ratio_level == "sequence":
        lengths = mask_f.sum(-1, keepdim=True).clamp(min=1.0)
        # the sequence's rho is also broadcast over its masked tokens: select, never multiply by the mask
        g_l = g_l + torch.where(keep, gated_product(drho, u.sum(-1, keepdim=True)) / lengths, zero)
    else:  # token, sequence_token
        g_l = g_l + gated_product(drho, u)
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
    inf = torch.full((1,), float("inf"), dtype=cdt, device=l.device)
    # one extra element, so that an empty micro-batch reduces to +-inf (then reported as 1)
    r_min = torch.cat([torch.where(keep, rho, inf).reshape(-1), inf]).amin()
    r_max = torch.cat([torch.where(keep, rho, -inf).reshape(-1), -inf]).amax()
    one = torch.ones((), dtype=cdt, device=l.device)
    metrics = torch.stack([
        policy, kl_mean, ent_mean,
        low.sum() / n_tok, high.sum() / n_tok, (low | high).sum() / n_tok,
        torch.where(keep, rho, zero).sum() / n_tok,
        # an overflowed ratio is +inf, a real value: only an empty micro-batch reports 1
        torch.where(keep.any(), r_min, one), torch.where(keep.any(), r_max, one),
    ]).to(cdt)
    return loss, metrics, g_l, g_h


# ---------------------------------------------------------------------------------------------
# Token-level ratios: the loss gradient in forward (docs/design.md, Kernel designs), on the torch backend too.
# ---------------------------------------------------------------------------------------------
def token_inputs(mask, advantages, old_logps, ref_logps, is_weights, cfg: LossConfig, num_tokens, num_sequences,
                 grad_scale, cdt):
    """The per-token inputs of ``token_loss_grads`` as flat [N] tensors of ``cdt``: keep, the
    aggregation weights w and w_h (times grad_scale), A, l_old, l_ref and the IS weights (None when
    not given). Masked tokens hold 0 in every one of them, whatever the caller's tensors hold there."""
    B, T = mask.shape
    keep = (mask != 0).reshape(-1)
    mask_f = keep.to(cdt).view(B, T)
    agg = dict(num_tokens=num_tokens, num_sequences=num_sequences, norm_length=cfg.loss_norm_length,
               dp_size=cfg.dp_size)
    w = aggregation_weights(mask_f, cfg.loss_agg_mode, **agg)
    w_h = w if cfg.entropy_agg_mode in (None, cfg.loss_agg_mode) else aggregation_weights(
        mask_f, cfg.entropy_agg_mode, **agg)
    zero = torch.zeros((), dtype=cdt, device=mask.device)
    guard = lambda x: None if x is None else torch.where(keep, x, zero)  # noqa: E731
    flat = lambda x: None if x is None else x.reshape(-1).to(cdt)  # noqa: E731
    # grad_scale folds into the weights: every coefficient is linear in them
    return dict(keep=keep, w=(w * grad_scale).reshape(-1), w_h=(w_h * grad_scale).reshape(-1),
                A=guard(per_token(advantages, (B, T), cdt)), l_old=guard(flat(old_logps)),
                l_ref=guard(flat(ref_logps)),
                is_w=None if is_weights is None else guard(per_token(is_weights, (B, T), cdt)))


def token_loss_grads(l, entropy, keep, A, l_old, l_ref, is_weights, w, w_h, cfg: LossConfig):
    """(dL/dl, dL/dH) of each token for token-level ratios: both depend on the token's own values only,
    given its aggregation weights w (loss) and w_h (entropy bonus) over the whole micro-batch. Every
    argument has one shape (a chunk of tokens as [1, r]); masked tokens get exactly 0. dL/dH is None
    without an entropy bonus."""
    zero = torch.zeros((), dtype=l.dtype, device=l.device)
    l = torch.where(keep, l, zero)
    l_old = l if l_old is None else torch.where(keep, l_old, zero)  # garbage under the mask must not NaN
    _, df, direct, _, drho = token_coefficients(l, l_old, A, keep.to(l.dtype), cfg, is_weights)
    g_l = gated_product(drho, w * df)
    if direct is not None:
        g_l = g_l + w * direct
    if cfg.beta != 0.0:
        _, dkl = kl_and_grad(l, torch.where(keep, l_ref, zero), cfg)
        g_l = g_l + cfg.beta * w * dkl
    g_h = None if cfg.entropy_coef == 0.0 else -cfg.entropy_coef * w_h
    return g_l, g_h


def chunk_coefficients(tok, start, stop, logp, entropy, cfg):
    """``token_loss_grads`` of the tokens [start, stop) (flat [r] in, flat [r] out)."""
    row = lambda x: None if x is None else x[start:stop].view(1, -1)  # noqa: E731
    g_l, g_h = token_loss_grads(logp.view(1, -1), entropy.view(1, -1), row(tok["keep"]), row(tok["A"]),
                                row(tok["l_old"]), row(tok["l_ref"]), row(tok["is_w"]), row(tok["w"]),
                                row(tok["w_h"]), cfg)
    return g_l.view(-1), None if g_h is None else g_h.view(-1)


def fused_logits_loss_forward(logits, out, targets, mask, advantages, old_logps, ref_logps, is_weights,
                              temperature, cfg: LossConfig, num_tokens, num_sequences, grad_scale):
    """Token-level ratios: per row chunk, log p (one log_softmax pass), p = exp(log p), the entropy, the
    per-token loss coefficients and dL/dz = g_t onehot - p (g_l + g_h (log p + H)) written into ``out``
    at once (``out`` shaped as ``logits``, any layout; ``logits`` itself overwrites them), for the
    upstream gradient ``grad_scale``: one exponentiation per logit for forward and backward together,
    two [rows, V] work buffers. Returns (logp [N], entropy [N]) in the compute dtype and ``out``."""
    B, T, V = logits.shape
    n = B * T
    cdt = compute_dtype(logits.dtype)
    device = logits.device
    t, keep, bad = flat_keep(targets, mask, V)
    tok = token_inputs(mask, advantages, old_logps, ref_logps, is_weights, cfg, num_tokens, num_sequences,
                       grad_scale, cdt)
    tau = tau_rows(temperature, (B, T), tok["w"])
    logp = torch.empty(n, dtype=cdt, device=device)
    entropy = torch.empty(n, dtype=cdt, device=device)
    work = WorkBuffers(min(chunk_rows(logits), n), V, cdt, device) if n else None
    zero = torch.zeros((), dtype=cdt, device=device)
    # the entropy gradient needs log p after the entropy sum (a dot); without it, y is consumed
    bonus = cfg.entropy_coef != 0.0
    for chunk, dst, start in row_chunk_pairs(logits, out, chunk_rows(logits)):
        stop = start + chunk.shape[0]
        y, e = work.get(stop - start)
        t_c, keep_c, bad_c, tau_c = t[start:stop], keep[start:stop], bad[start:stop], slice_tau(tau, start, stop)
        logp_t, l_i = chunk_log_softmax(chunk, t_c, tau_c, keep_c, y, e)  # y = log p + c, e = p l_i
        log_l = torch.log(l_i)
        logp_t = logp_t - log_l
        lp = mark_bad(torch.where(keep_c, logp_t, zero), bad_c)
        logp[start:stop] = lp
        # -sum (e / l)(y - log l) = -sum e y / l + log l
        ent = torch.where(keep_c, chunk_entropy(logp_t, y, e, keep_a=bonus) / l_i + log_l, zero)
        entropy[start:stop] = ent
        g_l, g_h = chunk_coefficients(tok, start, stop, lp, ent, cfg)
        write_grad(y, e, t_c, tau_c, l_i, log_l, ent, mark_bad(g_l, bad_c), g_h, mark_bad(g_l, bad_c), dst)
    return logp, entropy, out


def rescale_grad_(grad, ratio) -> None:
    """grad *= ratio (a [1] tensor on grad's device): the grad-scale correction of a gradient computed
    in forward. On CPU a ratio of exactly 1 costs nothing."""
    if grad.device.type == "cpu" and bool(ratio == 1.0):
        return
    grad.mul_(ratio.to(grad.dtype))
