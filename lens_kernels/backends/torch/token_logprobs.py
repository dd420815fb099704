"""token_logprobs on the torch backend: forward keeps lse and entropy per token; backward recomputes
the softmax chunk by chunk (``vocab_shard_grad``), optionally in place into the logits buffer."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import (check_inplace_target, compute_dtype, finish_partials, flat_keep, flat_rows, grad_coefficients,
                      kept_rows_index, logprob_entropy_rows, mark_bad, no_grad_rows, tau_rows)
from .vocab_shard import vocab_shard_grad, vocab_shard_partials


def logprob_stats(logits, t, keep, bad, temperature):
    """(logp, lse, entropy) flat [N]; masked tokens 0, a kept out-of-range target NaN."""
    logp, lse, entropy = finish_partials(*vocab_shard_partials(logits, t, temperature, keep))
    if keep is not None:
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp = torch.where(keep, logp, zero)
        entropy = torch.where(keep, entropy, zero)
    return mark_bad(logp, bad), lse, entropy


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


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, temperature, inplace_grad):
        lead = logits.shape[:-1]
        if inplace_grad:
            check_inplace_target(logits)
        t, keep, bad = flat_keep(targets, mask, logits.shape[-1])
        logp, lse, entropy = logprob_stats(logits, t, keep, bad, temperature)
        ctx.save_for_backward(logits, t, lse, entropy, keep if keep is not None else torch.empty(0), bad)
        ctx.has_keep = keep is not None
        ctx.temperature = temperature
        ctx.inplace_grad = inplace_grad
        ctx.set_materialize_grads(False)
        return logp.view(lead), entropy.view(lead)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, t, lse, entropy, keep, bad = ctx.saved_tensors
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None
        g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep if ctx.has_keep else None, bad)
        grad = vocab_shard_grad(logits, t, ctx.temperature, lse, entropy, g_l, g_h, inplace=ctx.inplace_grad)
        return grad, None, None, None, None


def token_logprobs(logits, targets, mask=None, temperature=1.0, return_entropy=False, inplace_grad=False):
    """Under torch.compile: the custom ops (``token_logprobs_op``), where ``inplace_grad`` is a
    hint that is not taken (the traced graph owns its buffers). Eager: ``TokenLogprobsFunction``."""
    if torch.compiler.is_compiling():
        logp, entropy = token_logprobs_op(logits, targets, mask, temperature)
    elif not (torch.is_grad_enabled() and logits.requires_grad):
        return logprobs_no_grad(logits, targets, mask, temperature, return_entropy)
    else:
        logp, entropy = TokenLogprobsFunction.apply(logits, targets, mask, temperature, inplace_grad)
    return logp, (entropy if return_entropy else None)


# ---------------------------------------------------------------------------------------------
# The same op as a torch.library custom op, for torch.compile: the graph holds one opaque node per
# direction (the chunk loop, its host-side flags and its buffers stay out of the trace), with a fake
# implementation for shapes and the backward registered as its autograd formula.
# ---------------------------------------------------------------------------------------------
def split_temperature(temperature):
    """(float, tensor or None): a custom op's schema takes the two forms as two arguments."""
    return (1.0, temperature) if torch.is_tensor(temperature) else (float(temperature), None)


def _cdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("lens_kernels::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor], tau: float,
                       tau_t: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [...], entropy [...], lse [N]) of ``token_logprobs`` (see ``TokenLogprobsFunction``)."""
    t, keep, bad = flat_keep(targets, mask, logits.shape[-1])
    logp, lse, entropy = logprob_stats(logits, t, keep, bad, tau if tau_t is None else tau_t)
    lead = logits.shape[:-1]
    return logp.view(lead).clone(), entropy.view(lead).clone(), lse


@token_logprobs_fwd.register_fake
def _(logits, targets, mask, tau, tau_t):
    cdt = _cdt(logits.dtype)
    lead = logits.shape[:-1]
    return (logits.new_empty(lead, dtype=cdt), logits.new_empty(lead, dtype=cdt),
            logits.new_empty((targets.numel(),), dtype=cdt))


@torch.library.custom_op("lens_kernels::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor], tau: float,
                       tau_t: Optional[torch.Tensor], lse: torch.Tensor, entropy: torch.Tensor,
                       g_logp: torch.Tensor, g_entropy: torch.Tensor) -> torch.Tensor:
    """dL/dlogits (contiguous, the logits' dtype) for upstream gradients g_logp and g_entropy."""
    t, keep, bad = flat_keep(targets, mask, logits.shape[-1])
    g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep, bad)
    return vocab_shard_grad(logits, t, tau if tau_t is None else tau_t, lse, entropy.reshape(-1).to(lse.dtype),
                            g_l, g_h)


@token_logprobs_bwd.register_fake
def _(logits, targets, mask, tau, tau_t, lse, entropy, g_logp, g_entropy):
    return logits.new_empty(logits.shape)


def _fwd_setup(ctx, inputs, output):
    logits, targets, mask, tau, tau_t = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, mask, tau_t, lse, entropy)
    ctx.tau = tau


def _fwd_backward(ctx, g_logp, g_entropy, _g_lse):
    logits, targets, mask, tau_t, lse, entropy = ctx.saved_tensors
    if g_logp is None:
        g_logp = torch.zeros_like(entropy)
    if g_entropy is None:
        g_entropy = torch.zeros_like(entropy)
    grad = token_logprobs_bwd(logits, targets, mask, ctx.tau, tau_t, lse, entropy, g_logp, g_entropy)
    return grad, None, None, None, None


token_logprobs_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def token_logprobs_op(logits, targets, mask=None, temperature=1.0):
    """``token_logprobs`` through the custom ops (the traceable form; never in place)."""
    tau, tau_t = split_temperature(temperature)
    logp, entropy, _ = token_logprobs_fwd(logits, targets, mask, tau, tau_t)
    return logp, entropy
