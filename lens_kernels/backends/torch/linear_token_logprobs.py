"""linear_token_logprobs on the torch backend: the logits of one row chunk at a time, never [N, V]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (compute_dtype, finish_partials, flat_keep, grad_coefficients, new_partials, rows_backward,
                      rows_partials, rows_per_chunk, slice_tau, tau_rows)


def linear_chunk_rows(weight, hidden):
    return rows_per_chunk(weight.shape[0], 2 * torch.finfo(compute_dtype(hidden.dtype)).bits // 8
                          + hidden.element_size())


def linear_vocab_shard_partials(hidden, weight, bias, targets, temperature=1.0):
    """``vocab_shard_partials(hidden @ weight.T + bias, targets)`` a row chunk at a time.

    hidden [..., H]; weight [V, H] (the whole lm_head or a shard of its rows); bias [V] or None.
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
        y = F.linear(h[start:stop], weight, bias).to(cdt)
        for out, part in zip(parts, rows_partials(y, t[start:stop], slice_tau(tau, start, stop))):
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
    tau = tau_rows(temperature, hidden.shape[:-1], lse)
    rows = linear_chunk_rows(weight, hidden)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d_hidden = torch.empty_like(h) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (need_b and bias is not None) else None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        hs = h[start:stop]
        y = F.linear(hs, weight, bias).to(cdt)
        dz = rows_backward(y, t[start:stop], slice_tau(tau, start, stop), lse[start:stop], entropy[start:stop],
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
        t, keep = flat_keep(targets, mask)
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
