"""The torch backend: portable, chunked, and the CPU path (SPEC section 4).

- ``token_logprobs`` / ``linear_token_logprobs``: row chunks, so that no more than one chunk of
  [rows, V] is ever live in fp32 (``CHUNK_BYTES`` bounds the working set of a chunk, all buffers
  included). Forward keeps lse and entropy per token; backward recomputes the softmax chunk by chunk.
  Strided row views (``logits[:, :-1]``) are walked without a copy.
- ``policy_loss``: the per-token loss and its closed-form gradient coefficients dL/dl and dL/dH,
  computed in forward. The fused GPU kernels use the same coefficients, so testing this function
  against the autograd of ``reference.py`` tests the formulas they implement.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..config import LossConfig

DEVICES = ("cpu", "cuda")

# Upper bound on the bytes of [rows, V] work buffers live at once (fp32, all buffers of a chunk).
CHUNK_BYTES = int(os.environ.get("LENS_KERNELS_CHUNK_BYTES", str(256 << 20)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_chunk(vocab: int, bytes_per_row_elem: int) -> int:
    return max(1, CHUNK_BYTES // max(1, vocab * bytes_per_row_elem))


def _row_views(x: torch.Tensor, base: int = 0):
    """[(2-D view of rows, index of its first row in flattened order)], never copying ``x``."""
    vocab = x.shape[-1]
    try:
        return [(x.view(-1, vocab), base)]
    except RuntimeError:  # leading dims that do not flatten (a logits[:, :-1] slice): walk dim 0
        per = x[0].numel() // vocab if x.shape[0] else 0
        views = []
        for b in range(x.shape[0]):
            views.extend(_row_views(x[b], base + b * per))
        return views


def _chunks(x: torch.Tensor, rows: int):
    for view, base in _row_views(x):
        for start in range(0, view.shape[0], rows):
            yield view[start:start + rows], base + start


def _tau_rows(temperature, lead_shape, like: torch.Tensor):
    """Temperature as a float, or as a [N, 1] tensor in the compute dtype (broadcast over the rows)."""
    if not torch.is_tensor(temperature):
        return float(temperature)
    return temperature.to(like.device, like.dtype).expand(lead_shape).reshape(-1, 1)


def _slice_tau(tau, start: int, stop: int):
    return tau if not torch.is_tensor(tau) else tau[start:stop]


# ---------------------------------------------------------------------------------------------
# Row math shared by the logits and the hidden paths. ``y`` is an owned [r, V] buffer in the
# compute dtype holding the raw logits; it is overwritten.
# ---------------------------------------------------------------------------------------------
def _rows_partials(y: torch.Tensor, targets: torch.Tensor, tau):
    """Softmax partials of each row of y = z / tau (y is overwritten with y - m_i).

    Returns (m_i, l_i, ey_i, target_shifted): the row max, l_i = sum_v exp(y - m_i),
    ey_i = sum_v exp(y - m_i) (y - m_i) and y[target] - m_i. Partials of vocabulary shards combine
    across ranks (``lens_kernels.distributed``); ``_rows_forward`` combines those of a whole row.
    """
    if torch.is_tensor(tau) or tau != 1.0:
        y.div_(tau)
    m_i = y.amax(dim=-1, keepdim=True)
    y.sub_(m_i)
    target_shifted = y.gather(1, targets.unsqueeze(1)).squeeze(1)
    e = torch.exp(y)
    l_i = e.sum(dim=-1)
    # sum_v e_v y_v as a batched dot: no third [r, V] buffer
    ey = torch.bmm(e.unsqueeze(1), y.unsqueeze(2)).reshape(-1)
    return m_i.squeeze(1), l_i, ey, target_shifted


def finish_partials(m_i, l_i, ey, target_shifted):
    """(logp, lse, entropy) from the partials of whole rows: log p_t, logsumexp(z / tau), -sum p log p."""
    log_l = torch.log(l_i)
    return target_shifted - log_l, m_i + log_l, log_l - ey / l_i


def _rows_forward(y: torch.Tensor, targets: torch.Tensor, tau):
    """Returns (logp, lse, entropy) of each row."""
    return finish_partials(*_rows_partials(y, targets, tau))


def _rows_stats(y: torch.Tensor, targets: torch.Tensor, tau):
    """Leaves y = z / tau - m_i (row max m_i) and returns (logp, m_i, log_l, entropy) of each row,
    with log_l = log sum exp(z / tau - m_i), so that log p = y - log_l without recomputing y."""
    m_i, l_i, ey, target_shifted = _rows_partials(y, targets, tau)
    log_l = torch.log(l_i)
    return target_shifted - log_l, m_i, log_l, log_l - ey / l_i


def _rows_backward(y: torch.Tensor, targets, tau, lse, entropy, g_logp, g_entropy, g_target=None):
    """Overwrites y (raw logits) with dL/dz = (1/tau) [g_t onehot - g_l p - g_H p (log p + H)].

    g_t = g_l for whole rows; a vocabulary shard passes g_t = 0 on rows whose target it does not hold.
    """
    if torch.is_tensor(tau) or tau != 1.0:
        y.div_(tau)
    y.sub_(lse.unsqueeze(1))  # log p
    p = torch.exp(y)
    if g_entropy is not None:
        y.add_(entropy.unsqueeze(1)).mul_(g_entropy.unsqueeze(1)).add_(g_logp.unsqueeze(1))
        y.mul_(p).neg_()
    else:
        torch.mul(p, g_logp.unsqueeze(1), out=y).neg_()
    y.scatter_add_(1, targets.unsqueeze(1), (g_logp if g_target is None else g_target).unsqueeze(1))
    if torch.is_tensor(tau) or tau != 1.0:
        y.div_(tau)
    return y


def _flat_keep(targets: torch.Tensor, mask: Optional[torch.Tensor]):
    t = targets.reshape(-1).long()
    if mask is None:
        return t, None
    keep = mask.reshape(-1).to(torch.bool)
    return torch.where(keep, t, torch.zeros_like(t)), keep


# ---------------------------------------------------------------------------------------------
# Row-chunked partials and gradients of a logits tensor, whole or a vocabulary shard of it
# ---------------------------------------------------------------------------------------------
def grad_coefficients(lse, g_logp, g_entropy, keep):
    """g_l and g_H as flat [N] vectors in the compute dtype; masked tokens get exact zeros."""
    cdt = lse.dtype
    n = lse.numel()
    g_l = torch.zeros(n, dtype=cdt, device=lse.device) if g_logp is None else g_logp.reshape(-1).to(cdt)
    g_h = None if g_entropy is None else g_entropy.reshape(-1).to(cdt)
    if keep is not None:
        g_l = g_l * keep
        g_h = None if g_h is None else g_h * keep
    return g_l, g_h


def _new_partials(n: int, cdt: torch.dtype, device):
    return tuple(torch.empty(n, dtype=cdt, device=device) for _ in range(4))


def vocab_shard_partials(logits, targets, temperature=1.0):
    """Softmax partials of each row of a [..., V] logits tensor or of a vocabulary shard of it.

    Args:
        logits: [..., V] (a strided row view is walked without a copy).
        targets: [...] int64 ids in [0, V); for rows whose target lies in another shard any id in
            range (the combine ignores their target logit).
        temperature: a float or a tensor broadcastable to ``targets``.

    Returns:
        (m_i, l_i, ey_i, target_shifted), four flat [N] tensors in the compute dtype (see
        ``_rows_partials``).
    """
    n = targets.numel()
    cdt = _compute_dtype(logits.dtype)
    t = targets.reshape(-1)
    parts = _new_partials(n, cdt, logits.device)
    tau = _tau_rows(temperature, logits.shape[:-1], parts[0])
    rows = rows_per_chunk(logits.shape[-1], 2 * torch.finfo(cdt).bits // 8)
    for chunk, start in _chunks(logits, rows):
        stop = start + chunk.shape[0]
        y = chunk.to(cdt, copy=True)
        for out, part in zip(parts, _rows_partials(y, t[start:stop], _slice_tau(tau, start, stop))):
            out[start:stop] = part
    return parts


def vocab_shard_grad(logits, targets, temperature, lse, entropy, g_logp, g_entropy=None, g_target=None,
                     inplace=False):
    """dL/dlogits of a [..., V] logits tensor (or shard) from the global lse and entropy.

    lse, entropy, g_logp, g_entropy, g_target: flat [N] in the compute dtype (g_entropy may be None;
    g_target defaults to g_logp). ``inplace`` writes the gradient into ``logits``. Returns the
    gradient, shaped and typed as ``logits``.
    """
    vocab = logits.shape[-1]
    cdt = lse.dtype
    t = targets.reshape(-1)
    tau = _tau_rows(temperature, logits.shape[:-1], lse)
    grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    rows = rows_per_chunk(vocab, 2 * torch.finfo(cdt).bits // 8)
    for chunk, start in _chunks(logits, rows):
        stop = start + chunk.shape[0]
        y = chunk.to(cdt, copy=True)
        dy = _rows_backward(y, t[start:stop], _slice_tau(tau, start, stop), lse[start:stop], entropy[start:stop],
                            g_logp[start:stop], None if g_entropy is None else g_entropy[start:stop],
                            None if g_target is None else g_target[start:stop])
        if inplace:
            chunk.copy_(dy)
        else:
            grad.view(-1, vocab)[start:stop].copy_(dy)
        del y, dy  # free this chunk's buffer before the next one is allocated
    return grad


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------
class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, temperature, inplace_grad):
        lead = logits.shape[:-1]
        t, keep = _flat_keep(targets, mask)
        logp, lse, entropy = finish_partials(*vocab_shard_partials(logits, t, temperature))
        if keep is not None:
            zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
            logp = torch.where(keep, logp, zero)
            entropy = torch.where(keep, entropy, zero)
        ctx.save_for_backward(logits, t, lse, entropy, keep if keep is not None else torch.empty(0))
        ctx.has_keep = keep is not None
        ctx.temperature = temperature
        ctx.inplace_grad = inplace_grad
        ctx.set_materialize_grads(False)
        return logp.view(lead), entropy.view(lead)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, t, lse, entropy, keep = ctx.saved_tensors
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None
        g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep if ctx.has_keep else None)
        grad = vocab_shard_grad(logits, t, ctx.temperature, lse, entropy, g_l, g_h, inplace=ctx.inplace_grad)
        return grad, None, None, None, None


def token_logprobs(logits, targets, mask=None, temperature=1.0, return_entropy=False, inplace_grad=False):
    logp, entropy = TokenLogprobsFunction.apply(logits, targets, mask, temperature, inplace_grad)
    return logp, (entropy if return_entropy else None)


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs: logits of a row chunk, never [N, V]
# ---------------------------------------------------------------------------------------------
def _linear_rows(weight, hidden):
    return rows_per_chunk(weight.shape[0], 2 * torch.finfo(_compute_dtype(hidden.dtype)).bits // 8
                          + hidden.element_size())


def linear_vocab_shard_partials(hidden, weight, bias, targets, temperature=1.0):
    """``vocab_shard_partials(hidden @ weight.T + bias, targets)`` a row chunk at a time.

    hidden [..., H]; weight [V, H] (the whole lm_head or a shard of its rows); bias [V] or None.
    """
    h = hidden.reshape(-1, weight.shape[1])
    n = h.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    t = targets.reshape(-1)
    parts = _new_partials(n, cdt, hidden.device)
    tau = _tau_rows(temperature, hidden.shape[:-1], parts[0])
    rows = _linear_rows(weight, hidden)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        y = F.linear(h[start:stop], weight, bias).to(cdt)
        for out, part in zip(parts, _rows_partials(y, t[start:stop], _slice_tau(tau, start, stop))):
            out[start:stop] = part
    return parts


def linear_vocab_shard_grad(hidden, weight, bias, targets, temperature, lse, entropy, g_logp, g_entropy=None,
                            g_target=None, needs=(True, True, True)):
    """(d_hidden, d_weight, d_bias) of ``linear_vocab_shard_partials``' logits; ``needs`` says which
    to compute (None for the others). For a shard, d_hidden is this shard's part of the sum over shards.
    """
    need_h, need_w, need_b = needs
    h = hidden.reshape(-1, weight.shape[1])
    n = h.shape[0]
    t = targets.reshape(-1)
    cdt = lse.dtype
    tau = _tau_rows(temperature, hidden.shape[:-1], lse)
    rows = _linear_rows(weight, hidden)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d_hidden = torch.empty_like(h) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (need_b and bias is not None) else None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        hs = h[start:stop]
        y = F.linear(hs, weight, bias).to(cdt)
        dz = _rows_backward(y, t[start:stop], _slice_tau(tau, start, stop), lse[start:stop], entropy[start:stop],
                            g_logp[start:stop], None if g_entropy is None else g_entropy[start:stop],
                            None if g_target is None else g_target[start:stop])
        dz_in = dz.to(h.dtype)
        if need_h:
            torch.matmul(dz_in, weight, out=d_hidden[start:stop])
        if need_w:
            d_weight.add_((dz_in.t() @ hs).to(acc))
        if d_bias is not None:
            d_bias.add_(dz.sum(0).to(acc))
        del y, dz, dz_in
    d_hidden = None if d_hidden is None else d_hidden.view(hidden.shape)
    d_weight = None if d_weight is None else d_weight.to(weight.dtype)
    d_bias = None if d_bias is None else d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, temperature):
        lead = hidden.shape[:-1]
        t, keep = _flat_keep(targets, mask)
        logp, lse, entropy = finish_partials(*linear_vocab_shard_partials(hidden, weight, bias, t, temperature))
        if keep is not None:
            zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
            logp = torch.where(keep, logp, zero)
            entropy = torch.where(keep, entropy, zero)
        ctx.save_for_backward(hidden, weight, bias, t, lse, entropy, keep if keep is not None else torch.empty(0))
        ctx.has_keep = keep is not None
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logp.view(lead), entropy.view(lead)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, t, lse, entropy, keep = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if (g_logp is None and g_entropy is None) or not any(needs):
            return None, None, None, None, None, None
        g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep if ctx.has_keep else None)
        d_hidden, d_weight, d_bias = linear_vocab_shard_grad(hidden, weight, bias, t, ctx.temperature, lse, entropy,
                                                             g_l, g_h, needs=needs)
        return d_hidden, d_weight, d_bias, None, None, None


def linear_token_logprobs(hidden, weight, targets, bias=None, mask=None, temperature=1.0, return_entropy=False):
    logp, entropy = LinearTokenLogprobsFunction.apply(hidden, weight, bias, targets, mask, temperature)
    return logp, (entropy if return_entropy else None)


# ---------------------------------------------------------------------------------------------
# policy_loss: per-token loss and closed-form gradient coefficients
# ---------------------------------------------------------------------------------------------
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


def policy_loss_from_hidden(hidden, weight, targets, mask, advantages, bias=None, old_logps=None,
                            ref_logps=None, is_weights=None, temperature=1.0,
                            config: LossConfig = LossConfig(), num_tokens=None, num_sequences=None,
                            grad_scale=1.0, mode="fast"):
    """mode="fast" with token-level ratios computes the gradient in forward (3 GEMMs, see
    ``FastHiddenLossFunction``). Sequence-level ratios (GSPO) need every token of a sequence before any
    token's gradient is known, so they take the lean path (forward, a per-sequence reduction, then
    backward recomputing the logits), as does a call that needs no gradient at all."""
    if mode == "fast" and fast_mode_applies(config, hidden, weight, bias):
        rows = rows_per_chunk(weight.shape[0], 2 * (torch.finfo(_compute_dtype(hidden.dtype)).bits // 8)
                              + hidden.element_size())
        return fast_policy_loss_from_hidden(
            hidden, weight, targets, mask, advantages, bias, old_logps, ref_logps, is_weights, temperature,
            config, num_tokens, num_sequences, grad_scale, chunk_step=_torch_chunk_step, rows=rows)
    logps, entropy = linear_token_logprobs(hidden, weight, targets, bias, mask, temperature, True)
    return policy_loss(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config,
                       num_tokens, num_sequences)


# ---------------------------------------------------------------------------------------------
# policy_loss_from_hidden, mode="fast": the gradient in forward, 3 GEMMs, no logits recompute
# ---------------------------------------------------------------------------------------------
def fast_mode_applies(cfg: LossConfig, hidden, weight, bias) -> bool:
    """Token-level ratios, and a gradient wanted (else the 2 gradient GEMMs would be wasted)."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return cfg.ratio_level == "token" and wants_grad


def token_loss_grads(l, entropy, keep, A, l_old, l_ref, is_weights, w, w_h, cfg: LossConfig):
    """(dL/dl, dL/dH) of each token for token-level ratios: both depend on the token's own values only,
    given its aggregation weights w (loss) and w_h (entropy bonus) over the whole micro-batch. Every
    argument has one shape (a chunk of tokens as [1, r]); masked tokens get exactly 0. dL/dH is None
    without an entropy bonus."""
    zero = torch.zeros((), dtype=l.dtype, device=l.device)
    l = torch.where(keep, l, zero)
    l_old = l if l_old is None else torch.where(keep, l_old, zero)  # garbage under the mask must not NaN
    _, df, direct, _, drho = token_coefficients(l, l_old, A, keep.to(l.dtype), cfg, is_weights)
    g_l = w * df * drho
    if direct is not None:
        g_l = g_l + w * direct
    if cfg.beta != 0.0:
        _, dkl = kl_and_grad(l, torch.where(keep, l_ref, zero), cfg)
        g_l = g_l + cfg.beta * w * dkl
    g_h = None if cfg.entropy_coef == 0.0 else -cfg.entropy_coef * w_h
    return g_l, g_h


def _torch_chunk_step(z, targets, tau, coef_fn):
    """The per-row step of the fast mode on one chunk of logits z [r, V] (owned, may be overwritten):
    log-probs and entropy, then the coefficients ``coef_fn(logp, entropy) -> (g_l, g_h)``, then dL/dz
    written over the chunk buffer. Returns (dL/dz, logp, entropy). The Triton backend passes its own."""
    y = z.to(_compute_dtype(z.dtype))
    del z  # the GEMM output, when y is an upcast copy
    logp, _, log_l, entropy = _rows_stats(y, targets, tau)  # y = z / tau - m_i
    g_l, g_h = coef_fn(logp, entropy)
    _rows_backward(y, targets, 1.0, log_l, entropy, g_l, g_h)  # (y - log_l) is log p: no tau here
    if torch.is_tensor(tau) or tau != 1.0:
        y.div_(tau)
    return y, logp, entropy


def accumulate_t_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a^T @ b, with the products of bf16/fp16 operands accumulated in acc's dtype (fp32)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a.t(), b)
        return
    if acc.device.type == "cuda":
        try:  # cuBLAS with an fp32 output: no rounding of the chunk's partial sum to bf16
            acc.add_(torch.mm(a.t(), b, out_dtype=acc.dtype))
            return
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
            pass
    acc.addmm_(a.t().to(acc.dtype), b.to(acc.dtype))


def _per_token(x, shape, dtype):
    """A [B] or [B, T] per-sequence / per-token value as a flat [B * T] tensor of ``dtype``."""
    x = x.to(dtype)
    return (x.unsqueeze(-1).expand(shape) if x.dim() == 1 else x).reshape(-1)


_grad_scale_warned = False


def upstream_correction(grad_output: torch.Tensor, grad_scale: float):
    """grad_output / grad_scale for a gradient computed in forward for upstream ``grad_scale``
    (SPEC 5, grad-scale contract), or None when nothing is to be done. On CPU the check is free: a
    factor != 1 warns once. On a GPU it would sync, so the factor is always applied (exact when it is
    1: one elementwise pass over the gradients) and no warning is given."""
    global _grad_scale_warned
    ratio = grad_output.detach() / grad_scale
    if grad_output.device.type != "cpu":
        return ratio
    if bool(ratio == 1.0):
        return None
    if not _grad_scale_warned:
        _grad_scale_warned = True
        warnings.warn(f"lens_kernels: backward got grad_output {float(grad_output)} != grad_scale {grad_scale}; "
                      "the gradient computed in forward is rescaled (pass grad_scale= to avoid the extra pass)")
    return ratio


class FastHiddenLossFunction(torch.autograd.Function):
    """Forward: per row chunk, logits = h W^T + b (GEMM 1), the per-row step (log-probs, entropy, the
    per-token loss coefficients, dL/dz over the chunk buffer), dX = dz W (GEMM 2) and dW += dz^T h
    (GEMM 3, fp32 accumulator). Backward only scales the stored gradients by grad_output / grad_scale.
    A frozen weight skips GEMM 3. Token-level ratios only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, is_weights,
                temperature, cfg, num_tokens, num_sequences, grad_scale, chunk_step, rows):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        B, T = targets.shape
        vocab, width = weight.shape
        h = hidden.reshape(-1, width)
        n = h.shape[0]
        cdt = _compute_dtype(hidden.dtype)
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        t, keep = _flat_keep(targets, mask)
        mask_f = mask.to(cdt)
        agg = dict(num_tokens=num_tokens, num_sequences=num_sequences, norm_length=cfg.loss_norm_length,
                   dp_size=cfg.dp_size)
        w = aggregation_weights(mask_f, cfg.loss_agg_mode, **agg)
        w_h = w if cfg.entropy_agg_mode in (None, cfg.loss_agg_mode) else aggregation_weights(
            mask_f, cfg.entropy_agg_mode, **agg)
        # grad_scale folds into the weights: every coefficient is linear in them
        w, w_h = (w * grad_scale).reshape(-1), (w_h * grad_scale).reshape(-1)
        A = _per_token(advantages, (B, T), cdt)
        l_old = None if old_logps is None else old_logps.reshape(-1).to(cdt)
        l_ref = None if ref_logps is None else ref_logps.reshape(-1).to(cdt)
        is_w = None if is_weights is None else _per_token(is_weights, (B, T), cdt)
        tau = _tau_rows(temperature, targets.shape, mask_f)

        logp = torch.empty(n, dtype=cdt, device=h.device)
        entropy = torch.empty_like(logp)
        d_hidden = torch.empty_like(h) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        d_bias = torch.zeros(vocab, dtype=acc, device=h.device) if (need_b and bias is not None) else None
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            row = lambda x: None if x is None else x[start:stop].view(1, -1)  # noqa: E731
            keep_c = torch.ones(1, stop - start, dtype=torch.bool, device=h.device) if keep is None else row(keep)

            def coef_fn(logp_c, entropy_c):
                g_l, g_h = token_loss_grads(logp_c.view(1, -1), entropy_c.view(1, -1), keep_c, row(A), row(l_old),
                                            row(l_ref), row(is_w), row(w), row(w_h), cfg)
                return g_l.view(-1), None if g_h is None else g_h.view(-1)

            hs = h[start:stop]
            dz, logp[start:stop], entropy[start:stop] = chunk_step(
                F.linear(hs, weight, bias), t[start:stop], _slice_tau(tau, start, stop), coef_fn)
            dz_in = dz.to(h.dtype)
            if need_h:
                torch.matmul(dz_in, weight, out=d_hidden[start:stop])
            if need_w:
                accumulate_t_mm(d_weight, dz_in, hs)
            if d_bias is not None:
                d_bias.add_(dz.sum(0, dtype=acc))
            del dz, dz_in  # free this chunk's buffers before the next GEMM allocates
        if keep is not None:
            zero = torch.zeros((), dtype=cdt, device=h.device)
            logp = torch.where(keep, logp, zero)
            entropy = torch.where(keep, entropy, zero)
        # the loss value and metrics from the same per-token values, by the same code as policy_loss
        loss, named = policy_loss(logp.view(B, T), advantages, mask, old_logps, ref_logps, entropy.view(B, T),
                                  is_weights, cfg, num_tokens, num_sequences)
        metrics = torch.stack([named[name] for name in METRIC_NAMES])
        ctx.grads = (None if d_hidden is None else d_hidden.view(hidden.shape),
                     None if d_weight is None else d_weight.to(weight.dtype),
                     None if d_bias is None else d_bias.to(bias.dtype))
        del d_weight  # the fp32 accumulator, before the caller's backward allocates anything
        ctx.grad_scale = grad_scale
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        if ctx.grads is None:
            raise RuntimeError("policy_loss_from_hidden(mode='fast') stores its gradient once: backward can run "
                               "only once (use mode='lean' to backward twice through the graph)")
        grads, ctx.grads = ctx.grads, None
        ratio = upstream_correction(grad_loss, ctx.grad_scale)
        if ratio is not None:
            for g in grads:
                if g is not None:
                    g.mul_(ratio)
        return grads + (None,) * 13


def fast_policy_loss_from_hidden(hidden, weight, targets, mask, advantages, bias, old_logps, ref_logps,
                                 is_weights, temperature, config, num_tokens, num_sequences, grad_scale,
                                 chunk_step, rows):
    """``FastHiddenLossFunction`` with the per-row step ``chunk_step`` (see ``_torch_chunk_step``) on
    chunks of ``rows`` rows. Returns (loss, metrics) as ``policy_loss``."""
    loss, metrics = FastHiddenLossFunction.apply(
        hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, is_weights, temperature, config,
        num_tokens, num_sequences, float(grad_scale), chunk_step, rows)
    return loss, dict(zip(METRIC_NAMES, metrics.unbind(0)))
