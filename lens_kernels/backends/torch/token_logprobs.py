"""token_logprobs on the torch backend: plain launchers (the op, its autograd and its validation are
``lens_kernels.logprobs``). Forward keeps the lse per token; backward recomputes the softmax chunk by
chunk (``vocab_shard_grad``), into a fresh buffer or into the logits themselves."""
from __future__ import annotations

import torch

from ._common import (compute_dtype, finish_partials, flat_keep, flat_rows, grad_coefficients, kept_rows_index,
                      logprob_entropy_rows, mark_bad, no_grad_rows, tau_rows)
from .vocab_shard import vocab_shard_grad, vocab_shard_partials


def logprobs_no_grad(logits, targets, mask, temperature, want_entropy):
    """(logp, entropy or None) shaped like ``targets``, when no gradient will follow: no lse is kept
    for a backward, only the kept rows are computed (gathered first on CPU when some are masked), and
    a ``logits[:, :-1]`` slice is walked in blocks of whole sequences, never a copy of it whole."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    t, keep, bad = flat_keep(targets, mask, vocab)
    n, cdt, device = t.numel(), compute_dtype(logits.dtype), logits.device
    tau = tau_rows(temperature, lead, torch.empty(0, dtype=cdt, device=device))
    logp = torch.zeros(n, dtype=cdt, device=device)
    entropy = torch.zeros(n, dtype=cdt, device=device) if want_entropy else None
    rows = no_grad_rows(vocab, cdt)
    idx = kept_rows_index(keep)
    layout = flat_rows(logits) if idx is not None else None
    count = n if layout is None else idx.numel()
    if count == 0:
        return mark_bad(logp, bad).view(lead), None if entropy is None else entropy.view(lead)
    y = torch.empty(min(rows, count), vocab, dtype=cdt, device=device)
    e = torch.empty_like(y) if want_entropy else None
    sl = lambda x, sel: x if not torch.is_tensor(x) else x[sel]  # noqa: E731
    if layout is not None:  # the kept rows only, gathered into the work buffer
        flat, step = layout
        where = idx if step is None else (idx // lead[-1]) * step + idx % lead[-1]
        for start in range(0, count, rows):
            sel = idx[start:start + rows]
            src = where[start:start + rows]
            r = sel.numel()

            def source(buf, src=src, r=r):
                if flat.dtype != buf.dtype:
                    return flat.index_select(0, src)
                return torch.index_select(flat, 0, src, out=buf[:r])

            lp, h = logprob_entropy_rows(source, t[sel], sl(tau, sel), want_entropy, y[:r],
                                         None if e is None else e[:r])
            logp.index_copy_(0, sel, lp)
            if want_entropy:
                entropy.index_copy_(0, sel, h)
    else:
        for block, start in _row_blocks(logits, rows):
            stop = start + block.shape[:-1].numel()
            r = stop - start
            lp, h = logprob_entropy_rows(lambda buf, block=block: block, t[start:stop], sl(tau, slice(start, stop)),
                                         want_entropy, y[:r], None if e is None else e[:r])
            logp[start:stop] = lp
            if want_entropy:
                entropy[start:stop] = h
        if keep is not None:
            zero = torch.zeros((), dtype=cdt, device=device)
            logp = torch.where(keep, logp, zero)
            entropy = None if entropy is None else torch.where(keep, entropy, zero)
    return mark_bad(logp, bad).view(lead), None if entropy is None else entropy.view(lead)


def _row_blocks(x, rows):
    """(block, index of its first row): up to ``rows`` rows of x [..., V] at a time, never a copy: row
    chunks of x when its rows flatten, else blocks of whole sequences x[b0:b1] (a ``logits[:, :-1]``
    slice), or row chunks of one sequence when a sequence alone has more than ``rows`` rows."""
    vocab = x.shape[-1]
    try:
        flat = x.view(-1, vocab)
    except RuntimeError:
        flat = None
    if flat is not None:
        for start in range(0, flat.shape[0], rows):
            yield flat[start:start + rows], start
        return
    per = x[0].numel() // vocab if x.shape[0] else 0
    if per <= rows:
        step = rows // per
        for b in range(0, x.shape[0], step):
            yield x[b:b + step], b * per
        return
    for b in range(x.shape[0]):
        for start in range(0, per, rows):
            yield x[b][start:start + rows], b * per + start


def token_logprobs_forward(logits, targets, mask, temperature):
    """(logp [N], entropy [N], stats [2, N]: the row max m and log l of z / tau) in the compute dtype
    (fp32; fp64 for fp64 logits). m and log l stay apart: their sum loses log l when |z| is near the
    fp32 maximum."""
    t, keep, bad = flat_keep(targets, mask, logits.shape[-1])
    m_i, l_i, ey, target_shifted = vocab_shard_partials(logits, t, temperature, keep)
    logp, _, entropy = finish_partials(m_i, l_i, ey, target_shifted)
    if keep is not None:
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp = torch.where(keep, logp, zero)
        entropy = torch.where(keep, entropy, zero)
    return mark_bad(logp, bad), entropy, torch.stack((m_i, torch.log(l_i)))


def token_logprobs_backward(logits, targets, mask, temperature, stats, entropy, g_logp, g_entropy, out):
    """Writes dL/dlogits for the flat upstream gradients g_logp, g_entropy (either may be None) into
    ``out`` (shaped as logits; ``out is logits`` overwrites them in place) and returns it."""
    t, keep, bad = flat_keep(targets, mask, logits.shape[-1])
    m_i, log_l = stats.unbind(0)
    lse = m_i + log_l
    split = None
    # one shift by lse where it is exact (the usual case, one pass fewer); apart where it is not. The
    # check reads values: free on CPU; on a GPU the torch fallback always subtracts apart
    if logits.device.type != "cpu" or not bool(((lse - m_i == log_l) | ~torch.isfinite(lse)).all()):
        lse, split = m_i, log_l
    g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep, bad)
    return vocab_shard_grad(logits, t, temperature, lse, entropy.reshape(-1).to(lse.dtype), g_l, g_h, out=out,
                            log_l=split)
