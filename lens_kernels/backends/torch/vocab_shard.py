"""Softmax partials and the logits gradient of a [..., V] logits tensor or of a vocabulary shard of it,
a row chunk at a time. ``token_logprobs`` runs on these for whole rows; ``lens_kernels.distributed``
combines the partials of shards across ranks."""
from __future__ import annotations

import torch

from ._common import (WorkBuffers, active_rows, chunk_partials, compute_dtype, grad_rows, new_partials, row_chunk_pairs,
                      row_chunks, rows_per_chunk, slice_tau, tau_rows)


def chunk_rows(logits: torch.Tensor) -> int:
    """Rows per chunk: two [rows, V] compute-dtype buffers (y and exp(y))."""
    return rows_per_chunk(logits.shape[-1], 2 * torch.finfo(compute_dtype(logits.dtype)).bits // 8)


def vocab_shard_partials(logits, targets, temperature=1.0, keep=None):
    """Softmax partials of each row of a [..., V] logits tensor or of a vocabulary shard of it.

    Args:
        logits: [..., V] (a strided row view is walked without a copy).
        targets: [...] int64 ids in [0, V); for rows whose target lies in another shard any id in
            range (the combine ignores their target logit).
        temperature: a float, or a tensor of the shapes ``tau_rows`` accepts.
        keep: optional flat [N] bool: rows that are not kept are read as zeros (garbage there
            influences nothing; their partials are finite and meaningless).

    Returns:
        (m_i, l_i, ey_i, target_shifted), four flat [N] tensors in the compute dtype: the row max of
        z / tau, l_i = sum_v exp(z / tau - m_i), ey_i = sum_v exp(.) (z / tau - m_i) and
        z[target] / tau - m_i.
    """
    n = targets.numel()
    vocab = logits.shape[-1]
    cdt = compute_dtype(logits.dtype)
    t = targets.reshape(-1)
    parts = new_partials(n, cdt, logits.device)
    tau = tau_rows(temperature, logits.shape[:-1], parts[0])
    rows = chunk_rows(logits)
    work = WorkBuffers(min(rows, n), vocab, cdt, logits.device) if n else None
    for chunk, start in row_chunks(logits, rows):
        stop = start + chunk.shape[0]
        y, e = work.get(stop - start)
        stats = chunk_partials(chunk, t[start:stop], slice_tau(tau, start, stop),
                            None if keep is None else keep[start:stop], y, e)
        for out, part in zip(parts, stats):
            out[start:stop] = part
    return parts


def vocab_shard_grad(logits, targets, temperature, lse, entropy, g_logp, g_entropy=None, g_target=None,
                     inplace=False, out=None, log_l=None):
    """dL/dlogits of a [..., V] logits tensor (or shard) from the global lse and entropy.

    lse, entropy, g_logp, g_entropy, g_target: flat [N] in the compute dtype (g_entropy may be None;
    g_target defaults to g_logp). A row whose coefficients are all 0 gets an exact-zero gradient,
    whatever its logits hold. The gradient goes into ``out`` (any layout shaped as logits; ``logits``
    itself, or ``inplace``, overwrites them; the caller's autograd records that), else into a fresh
    buffer. With ``log_l`` [N], ``lse`` is the row max and the two are subtracted apart (``grad_rows``).
    Returns the gradient, shaped and typed as ``logits``.
    """
    vocab = logits.shape[-1]
    n = lse.numel()
    cdt = lse.dtype
    t = targets.reshape(-1)
    tau = tau_rows(temperature, logits.shape[:-1], lse)
    g_t = g_logp if g_target is None else g_target
    if out is None:
        out = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    rows = chunk_rows(logits)
    work = WorkBuffers(min(rows, n), vocab, cdt, logits.device) if n else None
    sl = lambda x, a, b: None if x is None else x[a:b]  # noqa: E731
    for chunk, dst, start in row_chunk_pairs(logits, out, rows):
        stop = start + chunk.shape[0]
        y, e = work.get(stop - start)
        grad_rows(chunk, t[start:stop], slice_tau(tau, start, stop), lse[start:stop], entropy[start:stop],
                  g_logp[start:stop], sl(g_entropy, start, stop), g_t[start:stop], y, e, dst,
                  sl(log_l, start, stop))
    return out


__all__ = ["active_rows", "chunk_rows", "vocab_shard_grad", "vocab_shard_partials"]
