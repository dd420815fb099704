"""Softmax partials and the logits gradient of a [..., V] logits tensor or of a vocabulary shard of it,
a row chunk at a time. ``token_logprobs`` runs on these for whole rows; ``lens_kernels.distributed``
combines the partials of shards across ranks."""
from __future__ import annotations

import torch

from ._common import compute_dtype, new_partials, row_chunks, rows_backward, rows_partials, rows_per_chunk, slice_tau, tau_rows


def vocab_shard_partials(logits, targets, temperature=1.0):
    """Softmax partials of each row of a [..., V] logits tensor or of a vocabulary shard of it.

    Args:
        logits: [..., V] (a strided row view is walked without a copy).
        targets: [...] int64 ids in [0, V); for rows whose target lies in another shard any id in
            range (the combine ignores their target logit).
        temperature: a float or a tensor broadcastable to ``targets``.

    Returns:
        (m_i, l_i, ey_i, target_shifted), four flat [N] tensors in the compute dtype (see
        ``rows_partials``).
    """
    n = targets.numel()
    cdt = compute_dtype(logits.dtype)
    t = targets.reshape(-1)
    parts = new_partials(n, cdt, logits.device)
    tau = tau_rows(temperature, logits.shape[:-1], parts[0])
    rows = rows_per_chunk(logits.shape[-1], 2 * torch.finfo(cdt).bits // 8)
    for chunk, start in row_chunks(logits, rows):
        stop = start + chunk.shape[0]
        y = chunk.to(cdt, copy=True)
        for out, part in zip(parts, rows_partials(y, t[start:stop], slice_tau(tau, start, stop))):
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
    tau = tau_rows(temperature, logits.shape[:-1], lse)
    grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    rows = rows_per_chunk(vocab, 2 * torch.finfo(cdt).bits // 8)
    for chunk, start in row_chunks(logits, rows):
        stop = start + chunk.shape[0]
        y = chunk.to(cdt, copy=True)
        dy = rows_backward(y, t[start:stop], slice_tau(tau, start, stop), lse[start:stop], entropy[start:stop],
                            g_logp[start:stop], None if g_entropy is None else g_entropy[start:stop],
                            None if g_target is None else g_target[start:stop])
        if inplace:
            chunk.copy_(dy)
        else:
            grad.view(-1, vocab)[start:stop].copy_(dy)
        del y, dy  # free this chunk's buffer before the next one is allocated
    return grad
