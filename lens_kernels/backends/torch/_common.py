"""Row math shared by the torch backend's ops: chunking, softmax partials, the row gradient.

No more than one chunk of [rows, V] is ever live in the compute dtype (``CHUNK_BYTES`` bounds the
working set of a chunk, all buffers included). Strided row views (``logits[:, :-1]``) are walked
without a copy.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

# Upper bound on the bytes of [rows, V] work buffers live at once (fp32, all buffers of a chunk).
CHUNK_BYTES = int(os.environ.get("LENS_KERNELS_CHUNK_BYTES", str(256 << 20)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_chunk(vocab: int, bytes_per_row_elem: int) -> int:
    return max(1, CHUNK_BYTES // max(1, vocab * bytes_per_row_elem))


def row_views(x: torch.Tensor, base: int = 0):
    """[(2-D view of rows, index of its first row in flattened order)], never copying ``x``."""
    vocab = x.shape[-1]
    try:
        return [(x.view(-1, vocab), base)]
    except RuntimeError:  # leading dims that do not flatten (a logits[:, :-1] slice): walk dim 0
        per = x[0].numel() // vocab if x.shape[0] else 0
        views = []
        for b in range(x.shape[0]):
            views.extend(row_views(x[b], base + b * per))
        return views


def row_chunks(x: torch.Tensor, rows: int):
    for view, base in row_views(x):
        for start in range(0, view.shape[0], rows):
            yield view[start:start + rows], base + start


def tau_rows(temperature, lead_shape, like: torch.Tensor):
    """Temperature as a float, or as a [N, 1] tensor in the compute dtype (broadcast over the rows)."""
    if not torch.is_tensor(temperature):
        return float(temperature)
    return temperature.to(like.device, like.dtype).expand(lead_shape).reshape(-1, 1)


def slice_tau(tau, start: int, stop: int):
    return tau if not torch.is_tensor(tau) else tau[start:stop]


# ---------------------------------------------------------------------------------------------
# Row math shared by the logits and the hidden paths. ``y`` is an owned [r, V] buffer in the
# compute dtype holding the raw logits; it is overwritten.
# ---------------------------------------------------------------------------------------------
def rows_partials(y: torch.Tensor, targets: torch.Tensor, tau):
    """Softmax partials of each row of y = z / tau (y is overwritten with y - m_i).

    Returns (m_i, l_i, ey_i, target_shifted): the row max, l_i = sum_v exp(y - m_i),
    ey_i = sum_v exp(y - m_i) (y - m_i) and y[target] - m_i. Partials of vocabulary shards combine
    across ranks (``lens_kernels.distributed``); ``rows_forward`` combines those of a whole row.
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


def rows_forward(y: torch.Tensor, targets: torch.Tensor, tau):
    """Returns (logp, lse, entropy) of each row."""
    return finish_partials(*rows_partials(y, targets, tau))


def rows_stats(y: torch.Tensor, targets: torch.Tensor, tau):
    """Leaves y = z / tau - m_i (row max m_i) and returns (logp, m_i, log_l, entropy) of each row,
    with log_l = log sum exp(z / tau - m_i), so that log p = y - log_l without recomputing y."""
    m_i, l_i, ey, target_shifted = rows_partials(y, targets, tau)
    log_l = torch.log(l_i)
    return target_shifted - log_l, m_i, log_l, log_l - ey / l_i


def rows_backward(y: torch.Tensor, targets, tau, lse, entropy, g_logp, g_entropy, g_target=None):
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


def flat_keep(targets: torch.Tensor, mask: Optional[torch.Tensor]):
    t = targets.reshape(-1).long()
    if mask is None:
        return t, None
    keep = mask.reshape(-1).to(torch.bool)
    return torch.where(keep, t, torch.zeros_like(t)), keep


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


def new_partials(n: int, cdt: torch.dtype, device):
    return tuple(torch.empty(n, dtype=cdt, device=device) for _ in range(4))


def per_token(x, shape, dtype):
    """A [B] or [B, T] per-sequence / per-token value as a flat [B * T] tensor of ``dtype``."""
    x = x.to(dtype)
    return (x.unsqueeze(-1).expand(shape) if x.dim() == 1 else x).reshape(-1)
