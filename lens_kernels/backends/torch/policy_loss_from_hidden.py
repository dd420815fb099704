"""The fast mode of policy_loss_from_hidden on the torch backend (a plain launcher: the autograd is in
``lens_kernels.loss``): the gradient in forward, 3 GEMMs, no logits recompute. The lean mode is
``linear_token_logprobs`` then the policy loss, chosen by the op."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...config import LossConfig
from ._common import chunk_ey, chunk_stats, compute_dtype, flat_keep, mark_bad, rows_per_chunk, slice_tau, tau_rows, write_grad
from .policy_loss import chunk_coefficients, token_inputs


def torch_chunk_step(z, targets, tau, coef_fn):
    """The per-row step of the fast mode on one chunk of logits z [r, V] (owned, may be overwritten):
    log-probs and entropy, then the coefficients ``coef_fn(logp, entropy) -> (g_l, g_h)``, then dL/dz
    in the compute dtype. Returns (dL/dz, logp, entropy). The Triton backend passes its own."""
    cdt = compute_dtype(z.dtype)
    y = z if z.dtype == cdt else torch.empty(z.shape, dtype=cdt, device=z.device)  # z is ours: reuse it
    e = torch.empty(z.shape, dtype=cdt, device=z.device)
    m, l_i, y_t = chunk_stats(z, targets, tau, None, y, e)
    ey = chunk_ey(z, tau, None, m, l_i, y, e, keep_y=True)
    del z
    log_l = torch.log(l_i)
    logp, entropy = y_t - log_l, log_l - ey / l_i
    g_l, g_h = coef_fn(logp, entropy)
    write_grad(y, e, targets, tau, l_i, log_l, entropy, g_l, g_h, g_l, e)
    return e, logp, entropy


def kept_rows(h: torch.Tensor, keep) -> torch.Tensor:
    """h with the rows that are not kept replaced by zeros (a copy only when some row is masked)."""
    if keep is None:
        return h
    if h.device.type == "cpu" and bool(keep.all()):
        return h
    return torch.where(keep.unsqueeze(1), h, torch.zeros((), dtype=h.dtype, device=h.device))


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


def fast_hidden_loss_forward(hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, is_weights,
                             temperature, cfg: LossConfig, num_tokens, num_sequences, grad_scale, needs,
                             chunk_step=None, rows=None):
    """The fast mode of the hidden-state loss head, token-level ratios: per row chunk, logits = h W^T + b
    (GEMM 1), the per-row step (log-probs, entropy, the per-token loss coefficients, dL/dz over the
    chunk buffer), dX = dz W (GEMM 2) and dW += dz^T h (GEMM 3, fp32 accumulator), all for the
    upstream gradient ``grad_scale``. ``needs`` = which of (hidden, weight, bias) get a gradient (a
    frozen weight skips GEMM 3). ``chunk_step`` is the per-row step (``torch_chunk_step`` here; the
    Triton backend passes its kernels), ``rows`` the rows per chunk.

    Returns (logp [N], entropy [N], (d_hidden, d_weight, d_bias)), each gradient None if not wanted."""
    need_h, need_w, need_b = needs
    chunk_step = chunk_step or torch_chunk_step
    B, T = targets.shape
    vocab, width = weight.shape
    h = hidden.reshape(-1, width)
    n = h.shape[0]
    cdt = compute_dtype(hidden.dtype)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    rows = rows or rows_per_chunk(vocab, 2 * (torch.finfo(cdt).bits // 8) + hidden.element_size())
    t, keep, bad = flat_keep(targets, mask, vocab)
    tok = token_inputs(mask, advantages, old_logps, ref_logps, is_weights, cfg, num_tokens, num_sequences,
                       grad_scale, cdt)
    tau = tau_rows(temperature, targets.shape, tok["w"])

    logp = torch.empty(n, dtype=cdt, device=h.device)
    entropy = torch.empty_like(logp)
    d_hidden = torch.empty_like(h) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    d_bias = torch.zeros(vocab, dtype=acc, device=h.device) if (need_b and bias is not None) else None
    for start in range(0, n, rows):
        stop = min(n, start + rows)

        def coef_fn(logp_c, entropy_c):
            g_l, g_h = chunk_coefficients(tok, start, stop, mark_bad(logp_c, bad[start:stop]), entropy_c, cfg)
            return mark_bad(g_l, bad[start:stop]), g_h

        # masked rows are read as zeros: NaN there must not reach dW through 0 * NaN
        hs = kept_rows(h[start:stop], None if keep is None else keep[start:stop])
        dz, logp[start:stop], entropy[start:stop] = chunk_step(
            F.linear(hs, weight, bias), t[start:stop], slice_tau(tau, start, stop), coef_fn)
        dz_in = dz.to(h.dtype)
        if need_h:
            torch.matmul(dz_in, weight, out=d_hidden[start:stop])
        if need_w:
            accumulate_t_mm(d_weight, dz_in, hs)
        if d_bias is not None:
            d_bias.add_(dz.sum(0, dtype=acc))
        del dz, dz_in  # free this chunk's buffers before the next GEMM allocates
    zero = torch.zeros((), dtype=cdt, device=h.device)
    logp = mark_bad(torch.where(keep, logp, zero), bad)
    entropy = torch.where(keep, entropy, zero)
    grads = (None if d_hidden is None else d_hidden.view(hidden.shape),
             None if d_weight is None else d_weight.to(weight.dtype),
             None if d_bias is None else d_bias.to(bias.dtype))
    return logp, entropy, grads
