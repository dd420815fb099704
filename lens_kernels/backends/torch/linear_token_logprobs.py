"""linear_token_logprobs on the torch backend: the logits of one row chunk at a time, never [N, V]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (active_rows, chunk_partials, compute_dtype, finish_partials, flat_keep, grad_coefficients,
                      grad_rows, kept_rows_index, logprob_entropy_rows, mark_bad, new_partials, no_grad_rows,
                      rows_per_chunk, slice_tau, tau_rows)


def linear_chunk_rows(weight, hidden):
    return rows_per_chunk(weight.shape[0], 2 * torch.finfo(compute_dtype(hidden.dtype)).bits // 8
                          + hidden.element_size())


def _kept(h, rows_kept):
    """h with the rows that are not kept replaced by zeros (a copy only when some row is left out):
    NaN in a masked row must not reach dW through 0 * NaN."""
    if rows_kept is None or (h.device.type == "cpu" and bool(rows_kept.all())):
        return h
    return torch.where(rows_kept.unsqueeze(1), h, torch.zeros((), dtype=h.dtype, device=h.device))


def _work(z, cdt):
    """(y, e) buffers of a chunk: y reuses the GEMM output when it is already in the compute dtype."""
    y = z if z.dtype == cdt else torch.empty(z.shape, dtype=cdt, device=z.device)
    return y, torch.empty(z.shape, dtype=cdt, device=z.device)


def linear_vocab_shard_partials(hidden, weight, bias, targets, temperature=1.0, keep=None):
    """``vocab_shard_partials(hidden @ weight.T + bias, targets)`` a row chunk at a time.

    hidden [..., H]; weight [V, H] (the whole lm_head or a shard of its rows); bias [V] or None;
    keep: optional flat [N] bool (rows left out are read as zeros).
    """
    h = hidden.reshape(-1, weight.shape[1])
    n = h.shape[0]
    cdt = compute_dtype(hidden.dtype)
    t = targets.reshape(-1)
    parts = new_partials(n, cdt, hidden.device)
    tau = tau_rows(temperature, hidden.shape[:-1], parts[0])
    rows = linear_chunk_rows(weight, hidden)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        k = None if keep is None else keep[start:stop]
        z = F.linear(_kept(h[start:stop], k), weight, bias)
        y, e = _work(z, cdt)
        stats = chunk_partials(z, t[start:stop], slice_tau(tau, start, stop), k, y, e)
        for out, part in zip(parts, stats):
            out[start:stop] = part
        del z, y, e
    return parts


def linear_vocab_shard_grad(hidden, weight, bias, targets, temperature, lse, entropy, g_logp, g_entropy=None,
                            g_target=None, needs=(True, True, True)):
    """(d_hidden, d_weight, d_bias) of ``linear_vocab_shard_partials``' logits; ``needs`` says which
    to compute (None for the others). For a shard, d_hidden is this shard's part of the sum over shards.
    Rows whose coefficients are all 0 contribute exact zeros, whatever their hidden states hold.
    """
    need_h, need_w, need_b = needs
    h = hidden.reshape(-1, weight.shape[1])
    n = h.shape[0]
    t = targets.reshape(-1)
    cdt = lse.dtype
    tau = tau_rows(temperature, hidden.shape[:-1], lse)
    rows = linear_chunk_rows(weight, hidden)
    g_t = g_logp if g_target is None else g_target
    active = active_rows(g_logp, g_entropy, g_t)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d_hidden = torch.empty_like(h) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (need_b and bias is not None) else None
    sl = lambda x: None if x is None else x[start:stop]  # noqa: E731
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        hs = _kept(h[start:stop], active[start:stop])
        z = F.linear(hs, weight, bias)
        y, e = _work(z, cdt)
        grad_rows(z, t[start:stop], slice_tau(tau, start, stop), lse[start:stop], entropy[start:stop],
                  g_logp[start:stop], sl(g_entropy), g_t[start:stop], y, e, e)
        del z, y
        dz_in = e.to(h.dtype)
        if need_h:
            torch.matmul(dz_in, weight, out=d_hidden[start:stop])
        if need_w:
            d_weight.add_((dz_in.t() @ hs).to(acc))
        if d_bias is not None:
            d_bias.add_(e.sum(0).to(acc))
        del e, dz_in
    d_hidden = None if d_hidden is None else d_hidden.view(hidden.shape)
    d_weight = None if d_weight is None else d_weight.to(weight.dtype)
    d_bias = None if d_bias is None else d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias


def linear_logprobs_no_grad(hidden, weight, bias, targets, mask, temperature, want_entropy):
    """(logp, entropy or None) shaped like ``targets`` when no gradient will follow: the logits GEMM
    runs on the kept rows only (gathered first on CPU when some are masked), a row chunk at a time,
    and no lse is kept for a backward."""
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, weight.shape[1])
    t, keep, bad = flat_keep(targets, mask, weight.shape[0])
    n, cdt, device = t.numel(), compute_dtype(hidden.dtype), hidden.device
    tau = tau_rows(temperature, lead, torch.empty(0, dtype=cdt, device=device))
    idx = kept_rows_index(keep)
    count = n if idx is None else idx.numel()
    logp = torch.zeros(n, dtype=cdt, device=device)
    entropy = torch.zeros(n, dtype=cdt, device=device) if want_entropy else None
    if count:
        rows = min(no_grad_rows(weight.shape[0], cdt), count)
        y = torch.empty(rows, weight.shape[0], dtype=cdt, device=device)
        e = torch.empty_like(y) if want_entropy else None
        w_t = weight.t()
        for start in range(0, count, rows):
            sel = slice(start, min(count, start + rows)) if idx is None else idx[start:start + rows]
            hs = h[sel]
            r = hs.shape[0]

            def source(buf, hs=hs, r=r):
                if hs.dtype != buf.dtype:
                    return F.linear(hs, weight, bias)
                if bias is None:
                    return torch.mm(hs, w_t, out=buf[:r])
                return torch.addmm(bias, hs, w_t, out=buf[:r])

            lp, ent = logprob_entropy_rows(source, t[sel], tau if not torch.is_tensor(tau) else tau[sel],
                                           want_entropy, y[:r], None if e is None else e[:r])
            if idx is None:
                logp[sel] = lp
                if want_entropy:
                    entropy[sel] = ent
            else:
                logp.index_copy_(0, sel, lp)
                if want_entropy:
                    entropy.index_copy_(0, sel, ent)
        if idx is None and keep is not None:
            zero = torch.zeros((), dtype=cdt, device=device)
            logp = torch.where(keep, logp, zero)
            entropy = None if entropy is None else torch.where(keep, entropy, zero)
    return mark_bad(logp, bad).view(lead), None if entropy is None else entropy.view(lead)


def linear_token_logprobs_forward(hidden, weight, bias, targets, mask, temperature, variant=""):
    """(logp [N], entropy [N], lse [N]) in the compute dtype; masked tokens 0, a kept out-of-range
    target NaN. ``variant`` is the backend's option string (none here)."""
    t, keep, bad = flat_keep(targets, mask, weight.shape[0])
    logp, lse, entropy = finish_partials(*linear_vocab_shard_partials(hidden, weight, bias, t, temperature, keep))
    if keep is not None:
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp, entropy = torch.where(keep, logp, zero), torch.where(keep, entropy, zero)
    return mark_bad(logp, bad), entropy, lse


def linear_token_logprobs_backward(hidden, weight, bias, targets, mask, temperature, lse, entropy, g_logp,
                                   g_entropy, needs, variant=""):
    """(d_hidden, d_weight, d_bias) for flat upstream gradients (either may be None); ``needs`` says
    which to compute (None for the others)."""
    t, keep, bad = flat_keep(targets, mask, weight.shape[0])
    g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep, bad)
    return linear_vocab_shard_grad(hidden, weight, bias, t, temperature, lse, entropy.reshape(-1).to(lse.dtype),
                                   g_l, g_h, needs=needs)
