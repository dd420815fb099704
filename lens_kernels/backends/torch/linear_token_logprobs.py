"""linear_token_logprobs on the torch backend: the logits of one row chunk at a time, never [N, V]."""
from __future__ import annotations

from typing import Optional, Tuple

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


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, temperature):
        lead = hidden.shape[:-1]
        t, keep, bad = flat_keep(targets, mask, weight.shape[0])
        logp, lse, entropy = finish_partials(*linear_vocab_shard_partials(hidden, weight, bias, t, temperature, keep))
        if keep is not None:
            zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
            logp = torch.where(keep, logp, zero)
            entropy = torch.where(keep, entropy, zero)
        logp = mark_bad(logp, bad)
        ctx.save_for_backward(hidden, weight, bias, t, lse, entropy, keep if keep is not None else torch.empty(0), bad)
        ctx.has_keep = keep is not None
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logp.view(lead), entropy.view(lead)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, t, lse, entropy, keep, bad = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if (g_logp is None and g_entropy is None) or not any(needs):
            return None, None, None, None, None, None
        g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep if ctx.has_keep else None, bad)
        d_hidden, d_weight, d_bias = linear_vocab_shard_grad(hidden, weight, bias, t, ctx.temperature, lse, entropy,
                                                             g_l, g_h, needs=needs)
        return d_hidden, d_weight, d_bias, None, None, None


def linear_token_logprobs(hidden, weight, targets, bias=None, mask=None, temperature=1.0, return_entropy=False):
    """Eager: ``LinearTokenLogprobsFunction``; under torch.compile the custom ops below."""
    if torch.compiler.is_compiling():
        tau, tau_t = (1.0, temperature) if torch.is_tensor(temperature) else (float(temperature), None)
        logp, entropy, _ = linear_token_logprobs_fwd(hidden, weight, bias, targets, mask, tau, tau_t)
    elif not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))):
        return linear_logprobs_no_grad(hidden, weight, bias, targets, mask, temperature, return_entropy)
    else:
        logp, entropy = LinearTokenLogprobsFunction.apply(hidden, weight, bias, targets, mask, temperature)
    return logp, (entropy if return_entropy else None)


# ---------------------------------------------------------------------------------------------
# The same op as torch.library custom ops, for torch.compile (see token_logprobs.py).
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lens_kernels::linear_token_logprobs_fwd", mutates_args=())
def linear_token_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              targets: torch.Tensor, mask: Optional[torch.Tensor], tau: float,
                              tau_t: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [...], entropy [...], lse [N]) of ``linear_token_logprobs``."""
    t, keep, bad = flat_keep(targets, mask, weight.shape[0])
    temperature = tau if tau_t is None else tau_t
    logp, lse, entropy = finish_partials(*linear_vocab_shard_partials(hidden, weight, bias, t, temperature, keep))
    if keep is not None:
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp, entropy = torch.where(keep, logp, zero), torch.where(keep, entropy, zero)
    lead = hidden.shape[:-1]
    return mark_bad(logp, bad).view(lead).clone(), entropy.view(lead).clone(), lse


@linear_token_logprobs_fwd.register_fake
def _(hidden, weight, bias, targets, mask, tau, tau_t):
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lead = hidden.shape[:-1]
    return (hidden.new_empty(lead, dtype=cdt), hidden.new_empty(lead, dtype=cdt),
            hidden.new_empty((targets.numel(),), dtype=cdt))


@torch.library.custom_op("lens_kernels::linear_token_logprobs_bwd", mutates_args=())
def linear_token_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              targets: torch.Tensor, mask: Optional[torch.Tensor], tau: float,
                              tau_t: Optional[torch.Tensor], lse: torch.Tensor, entropy: torch.Tensor,
                              g_logp: torch.Tensor, g_entropy: torch.Tensor, need_h: bool, need_w: bool,
                              need_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias); a gradient that is not needed is an empty [0] tensor."""
    t, keep, bad = flat_keep(targets, mask, weight.shape[0])
    g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep, bad)
    grads = linear_vocab_shard_grad(hidden, weight, bias, t, tau if tau_t is None else tau_t, lse,
                                    entropy.reshape(-1).to(lse.dtype), g_l, g_h, needs=(need_h, need_w, need_b))
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@linear_token_logprobs_bwd.register_fake
def _(hidden, weight, bias, targets, mask, tau, tau_t, lse, entropy, g_logp, g_entropy, need_h, need_w, need_b):
    empty = hidden.new_empty(0)
    return (hidden.new_empty(hidden.shape) if need_h else empty, weight.new_empty(weight.shape) if need_w else empty,
            bias.new_empty(bias.shape) if (need_b and bias is not None) else empty)


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, targets, mask, tau, tau_t = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, mask, tau_t, lse, entropy)
    ctx.tau = tau


def _linear_backward(ctx, g_logp, g_entropy, _g_lse):
    hidden, weight, bias, targets, mask, tau_t, lse, entropy = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    g_logp = torch.zeros_like(entropy) if g_logp is None else g_logp
    g_entropy = torch.zeros_like(entropy) if g_entropy is None else g_entropy
    d_h, d_w, d_b = linear_token_logprobs_bwd(hidden, weight, bias, targets, mask, ctx.tau, tau_t, lse, entropy,
                                              g_logp, g_entropy, need_h, need_w, need_b and bias is not None)
    return (d_h if need_h else None, d_w if need_w else None, d_b if (need_b and bias is not None) else None,
            None, None, None, None)


linear_token_logprobs_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)
