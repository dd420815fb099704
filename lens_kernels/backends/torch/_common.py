"""Row math shared by the torch backend's ops: chunking, softmax statistics, the row gradient.

No more than one chunk of [rows, V] is ever live in the compute dtype (``CHUNK_BYTES`` bounds the
working set of a chunk, all buffers included). Strided row views (``logits[:, :-1]``) are walked
without a copy.

Special values (docs/inputs.md): a -inf logit has probability 0, adds 0 to the
entropy and gets a gradient of exactly 0; a kept row holding NaN or +inf gives NaN; a masked row
(or a row whose gradient coefficients are all 0) never reads its logits into a result, so NaN or
garbage there gives exact zeros. Shifted logits are floored at ``FLOOR`` after the target's value is
read: exp(FLOOR) is exactly 0 in fp32 and fp64, so the floor changes no probability, and a -inf
entry then contributes 0 * FLOOR = 0 to the entropy sums instead of 0 * -inf = NaN.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

# Upper bound on the bytes of [rows, V] work buffers live at once (fp32, all buffers of a chunk).
CHUNK_BYTES = int(os.environ.get("LENS_KERNELS_CHUNK_BYTES", str(256 << 20)))
# Chunks are not shrunk to fit a cache: on the 2-core CI machine, 16 / 64 / 256 MiB chunks of
# [4 x 256, 32000] fp32 took 3830 / 2588 / 1414 ms fwd+bwd (each op of a chunk is a parallel region
# whose fixed cost dominates small chunks when the cores are shared).

# exp(FLOOR) == 0 in fp32 and fp64 (the smallest fp64 subnormal is exp(-745)).
FLOOR = -1.0e4


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


def row_chunk_pairs(x: torch.Tensor, g: torch.Tensor, rows: int):
    """(chunk of x, the same rows of g, index of the first row): x and g have one shape, not
    necessarily one layout (the walk flattens only what both allow)."""
    for xv, gv, base in _pair_views(x, g):
        for start in range(0, xv.shape[0], rows):
            yield xv[start:start + rows], gv[start:start + rows], base + start


def _pair_views(x, g):
    """[(2-D rows of x, the same rows of g, index of the first row)], never copying."""
    vocab = x.shape[-1]
    try:
        return [(x.view(-1, vocab), g.view(-1, vocab), 0)]
    except RuntimeError:
        per = x[0].numel() // vocab if x.shape[0] else 0
        out = []
        for b in range(x.shape[0]):
            out.extend((xv, gv, b * per + base) for xv, gv, base in _pair_views(x[b], g[b]))
        return out


def row_slice_base(x: torch.Tensor):
    """The base of ``x`` when x = base[:, :T] (or base[:B, :T]) with the base's own strides, as
    ``logits[:, :-1]`` is, and the base takes a gradient; else None. Computing on the base lets an op
    return the base's gradient itself (the rows past T are zeros) instead of autograd zero-filling
    a base-sized tensor and copying the view's gradient into it: two passes fewer."""
    if x.dim() != 3 or not x._is_view():
        return None
    base = x._base
    if (base is None or base.dim() != 3 or not base.requires_grad or base.stride() != x.stride()
            or base.storage_offset() != x.storage_offset() or base.shape[2] != x.shape[2]
            or base.shape[0] < x.shape[0] or base.shape[1] < x.shape[1]):
        return None
    return base


def tau_rows(temperature, lead_shape, like: torch.Tensor):
    """Temperature as a float, or as a [N, 1] tensor in the compute dtype. A 1-D tensor of length B
    for [B, T] rows is one temperature per sequence (never broadcast along T)."""
    if not torch.is_tensor(temperature):
        return float(temperature)
    tau = temperature.to(like.device, like.dtype)
    if tau.dim() == 1 and len(lead_shape) == 2:
        tau = tau.unsqueeze(-1)
    return tau.expand(lead_shape).reshape(-1, 1)


def slice_tau(tau, start: int, stop: int):
    return tau if not torch.is_tensor(tau) else tau[start:stop]


def scaled(tau) -> bool:
    return torch.is_tensor(tau) or tau != 1.0


class WorkBuffers:
    """The two [rows, V] compute-dtype buffers of a chunk (shifted logits y and e = exp(y)),
    allocated once per call and reused by every chunk: a fresh buffer per chunk would page-fault
    through its whole size each time."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device):
        self.y = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.e = torch.empty(rows, vocab, dtype=dtype, device=device)

    def get(self, rows: int):
        return self.y[:rows], self.e[:rows]


def _zero_rows(y: torch.Tensor, active: Optional[torch.Tensor], bad: Optional[torch.Tensor] = None) -> None:
    """Zero the rows that are not active: their values (NaN, inf, garbage) must influence nothing.

    ``bad`` [r] bool (optional) flags the rows that hold a non-finite value that would spread (NaN,
    +inf, no finite entry). On CPU only inactive rows so flagged are touched: a finite inactive row
    is harmless, since every coefficient applied to it is exactly 0.
    """
    if active is None:
        return
    if y.device.type == "cpu":  # reading the flags is free on CPU: touch only the rows left out
        off = ~active if bad is None else ~active & bad
        idx = off.nonzero().squeeze(1)
        if idx.numel():
            y[idx] = 0.0  # index_put: ~100x faster than index_fill_ along dim 0 on CPU
        return
    y.masked_fill_(~active.unsqueeze(1), 0.0)


def shifted_logits(z: torch.Tensor, tau, y: torch.Tensor, shift: torch.Tensor) -> None:
    """y = z / tau - shift (shift [r] in the compute dtype), out of place from z into y (never a
    copy of z first when z is already in the compute dtype)."""
    if z.dtype != y.dtype:
        # one cast, then same-dtype arithmetic: a mixed-dtype op is ~2x slower than the two passes
        y.copy_(z)
        z = y
    if scaled(tau):
        torch.div(z, tau, out=y)
        y.sub_(shift.unsqueeze(1))
    else:
        torch.sub(z, shift.unsqueeze(1), out=y)


def chunk_stats(z: torch.Tensor, targets: torch.Tensor, tau, active: Optional[torch.Tensor], y: torch.Tensor,
                e: torch.Tensor):
    """Softmax statistics of each row of y = z / tau, z [r, V] a chunk in the input dtype.

    Leaves y = z / tau - m_i (rows that are not ``active`` zeroed) and e = exp(y) in the work
    buffers. Returns (m_i, l_i, y_t): the row max of z / tau, l_i = sum_v e_v and y_t = y[target]
    (exact: a -inf target logit stays -inf). ``active`` [r] bool (or None: all rows). The entropy
    sum comes from ``chunk_ey``.
    """
    cdt = y.dtype
    m = z.amax(dim=-1).to(cdt)
    if scaled(tau):
        m = m / (tau.squeeze(1) if torch.is_tensor(tau) else tau)
    # a row of -inf only: shift by a finite value so that y stays -inf (not -inf - -inf = NaN)
    m = m.clamp(min=torch.finfo(cdt).min)
    shifted_logits(z, tau, y, m)
    y_t = y.gather(1, targets.unsqueeze(1)).squeeze(1)
    _zero_rows(y, active)
    if y.device.type != "cpu":
        y.clamp_(min=FLOOR)  # see chunk_ey; on CPU only where a -inf entry is found
    torch.exp(y, out=e)
    return m, e.sum(dim=-1), y_t


def chunk_ey(z, tau, active, m, l_i, y, e, keep_y: bool):
    """ey_i = sum_v e_v y_v of the rows left by ``chunk_stats``, exact with -inf entries (0, not
    0 * -inf = NaN). ``keep_y``: y is still needed (the entropy gradient), so the sum is a dot;
    otherwise y is overwritten with e * y (one pass fewer than a dot product on CPU)."""
    ey = dot_rows(e, y) if keep_y else y.mul_(e).sum(dim=-1)
    if y.device.type == "cpu" and bool((torch.isnan(ey) & ~torch.isnan(l_i)).any()):
        # a -inf entry (the row is otherwise finite): floor y and sum again; rare, so only here
        if not keep_y:
            shifted_logits(z, tau, y, m)
            _zero_rows(y, active)
        y.clamp_(min=FLOOR)
        ey = dot_rows(e, y) if keep_y else y.mul_(e).sum(dim=-1)
    return ey


def chunk_partials(z, targets, tau, active, y, e):
    """(m_i, l_i, ey_i, y_t) of a chunk (see ``vocab_shard_partials``); the buffers are consumed."""
    m, l_i, y_t = chunk_stats(z, targets, tau, active, y, e)
    # y may be z's own buffer (a GEMM output on the hidden path): then z cannot be read again
    return m, l_i, chunk_ey(z, tau, active, m, l_i, y, e, keep_y=z.data_ptr() == y.data_ptr()), y_t


def dot_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v b_v of each row, without a third [r, V] buffer."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def chunk_log_softmax(z: torch.Tensor, targets: torch.Tensor, tau, active: Optional[torch.Tensor], a: torch.Tensor,
                      b: torch.Tensor) -> torch.Tensor:
    """a = log_softmax(z / tau) and b = exp(a) of each row of a chunk, up to one offset per row; rows
    that are not ``active`` hold a = 0. Returns (a[target], l_i) with l_i = sum_v b_v: log p = a - log l_i
    and p = b / l_i exactly (a -inf target logit gives -inf).

    torch's log_softmax kernel walks a row while it is in cache (max, sum of exp, write), so this is
    one read of z and one write of a, against four passes for max, subtract, exp and sum apart; the
    fused loss path needs no softmax partials, only log p and p.
    """
    src = z
    if z.dtype != a.dtype:
        b.copy_(z)  # bf16 / fp16: one cast (log_softmax cannot upcast on CPU)
        src = b
    if scaled(tau):
        if not torch.is_tensor(tau) and src.dtype != a.dtype:
            tau = torch.full((1, 1), tau, dtype=a.dtype, device=a.device)
        torch.div(src, tau, out=b)
        src = b
    torch.ops.aten._log_softmax.out(src, -1, False, out=a)
    logp_t = a.gather(1, targets.unsqueeze(1)).squeeze(1)
    # a NaN, a +inf or no finite entry makes the whole row of log p NaN, its target's included
    _zero_rows(a, active, torch.isnan(logp_t))
    torch.exp(a, out=b)
    # torch's CPU log_softmax sums exp(z - max) lane by lane in fp32: at V ~ 1.5e5 its row offset is off
    # by up to ~1e-4 (measured 7e-5 at V = 151936 against float64; logsumexp's cascade sum: 2e-6). One
    # cascade sum of b measures that offset; callers fold l_i into log p, H and the gradient as scalars.
    return logp_t, b.sum(dim=-1)


def chunk_entropy(logp_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, keep_a: bool) -> torch.Tensor:
    """H = -sum_v p_v log p_v of the rows of ``chunk_log_softmax`` (a = log p, b = p), exact with -inf
    entries (0 log 0 = 0). ``keep_a``: a is still needed (the entropy gradient), so the sum is a dot;
    otherwise a is overwritten with p log p."""
    if a.device.type != "cpu":
        a.clamp_(min=FLOOR)  # a host check would sync; exp(FLOOR) = 0, so no probability changes
    s = dot_rows(b, a) if keep_a else a.mul_(b).sum(dim=-1)
    # NaN from 0 * -inf in a row whose target log-prob is not NaN (a NaN or +inf logit makes the whole
    # row NaN, target included): a -inf entry. Rare, so the exact sum is redone only then, on CPU.
    if a.device.type == "cpu" and bool((torch.isnan(s) & ~torch.isnan(logp_t)).any()):
        if keep_a:
            a.clamp_(min=FLOOR)
            s = dot_rows(b, a)
        else:  # a was consumed: sum p log p from p (xlogy(0, 0) = 0)
            s = torch.special.xlogy(b, b, out=a).sum(dim=-1)
    return -s


def finish_partials(m_i, l_i, ey, target_shifted):
    """(logp, lse, entropy) from the partials of whole rows: log p_t, logsumexp(z / tau), -sum p log p."""
    log_l = torch.log(l_i)
    return target_shifted - log_l, m_i + log_l, log_l - ey / l_i


def write_grad(y: torch.Tensor, e: torch.Tensor, targets: torch.Tensor, tau, l_i, log_l, entropy, g_l, g_h, g_t,
               out: torch.Tensor) -> None:
    """out = dL/dz = (1/tau) [g_t onehot - p (g_l + g_h (log p + H))] for rows with y = z / tau - s,
    e = exp(y), p = e / l_i and log p = y - log_l (the buffers of ``chunk_stats``; y is overwritten).

    One pass without an entropy gradient (g_h None), three with; the gradient is formed in the
    compute dtype and written once into ``out`` (a chunk of the gradient, or of the logits in place).
    """
    inv_l = torch.reciprocal(l_i)
    if g_h is None:
        a = -g_l * inv_l
        b = None
    else:
        a = -(g_l + g_h * (entropy - log_l)) * inv_l
        b = -g_h * inv_l
    if scaled(tau):
        inv_tau = torch.reciprocal(tau.squeeze(1)) if torch.is_tensor(tau) else 1.0 / tau
        a, g_t = a * inv_tau, g_t * inv_tau
        b = None if b is None else b * inv_tau
    dst = out if out.dtype == e.dtype else e
    if b is None:
        torch.mul(e, a.unsqueeze(1), out=dst)
    else:
        y.mul_(b.unsqueeze(1)).add_(a.unsqueeze(1))
        torch.mul(y, e, out=dst)
    dst.scatter_add_(1, targets.unsqueeze(1), g_t.unsqueeze(1))
    if dst is not out:
        out.copy_(dst)


def active_rows(g_l, g_h, g_t):
    """Rows whose gradient can be nonzero; the others are written as exact zeros whatever they hold."""
    act = g_l != 0
    if g_h is not None:
        act = act | (g_h != 0)
    if g_t is not None:
        act = act | (g_t != 0)
    return act


def grad_rows(z, targets, tau, lse, entropy, g_l, g_h, g_t, y, e, out, log_l=None) -> None:
    """dL/dz of a chunk from the global lse (of z / tau) and entropy of its rows: log p = z / tau - lse.
    With ``log_l``, ``lse`` is the row max m and log p = (z / tau - m) - log_l: two roundings where
    m + log_l would lose log_l (|z| near the fp32 maximum, where its ulp is 2e31)."""
    shifted_logits(z, tau, y, lse)
    if log_l is not None:
        y.sub_(log_l.unsqueeze(1))
    _zero_rows(y, active_rows(g_l, g_h, g_t))
    if g_h is not None:
        y.clamp_(min=FLOOR)  # p (log p + H) at a -inf entry: 0 * FLOOR, not 0 * -inf
    torch.exp(y, out=e)
    one = torch.ones_like(lse)
    write_grad(y, e, targets, tau, one, torch.zeros_like(lse), entropy, g_l, g_h, g_t, out)


def flat_keep(targets: torch.Tensor, mask: Optional[torch.Tensor], vocab: Optional[int] = None):
    """(safe targets [N] int64, keep [N] bool or None[, bad [N] bool]). Masked targets become 0. With
    ``vocab``, a kept target outside [0, V) also becomes 0 (never an out-of-bounds read) and is
    flagged in ``bad``: its log-prob and gradient row are NaN."""
    t = targets.reshape(-1).long()
    keep = None if mask is None else mask.reshape(-1) != 0
    if vocab is None:
        return (t, None) if keep is None else (torch.where(keep, t, torch.zeros_like(t)), keep)
    in_range = (t >= 0) & (t < vocab)
    bad = ~in_range if keep is None else keep & ~in_range
    ok = in_range if keep is None else keep & in_range
    return torch.where(ok, t, torch.zeros_like(t)), keep, bad


def mark_bad(x: torch.Tensor, bad: Optional[torch.Tensor]) -> torch.Tensor:
    if bad is None:
        return x
    return torch.where(bad, torch.full((), float("nan"), dtype=x.dtype, device=x.device), x)


def grad_coefficients(lse, g_logp, g_entropy, keep, bad=None):
    """g_l and g_H as flat [N] vectors in the compute dtype; masked tokens get exact zeros (whatever
    the upstream gradient holds there), a kept out-of-range target gets NaN."""
    cdt = lse.dtype
    n = lse.numel()
    zero = torch.zeros((), dtype=cdt, device=lse.device)
    g_l = torch.zeros(n, dtype=cdt, device=lse.device) if g_logp is None else g_logp.reshape(-1).to(cdt)
    g_h = None if g_entropy is None else g_entropy.reshape(-1).to(cdt)
    if keep is not None:
        g_l = torch.where(keep, g_l, zero)
        g_h = None if g_h is None else torch.where(keep, g_h, zero)
    return mark_bad(g_l, bad), g_h


def new_partials(n: int, cdt: torch.dtype, device):
    return tuple(torch.empty(n, dtype=cdt, device=device) for _ in range(4))


def per_token(x, shape, dtype):
    """A [B] or [B, T] per-sequence / per-token value as a flat [B * T] tensor of ``dtype``."""
    x = x.to(dtype)
    return (x.unsqueeze(-1).expand(shape) if x.dim() == 1 else x).reshape(-1)


def check_inplace_target(logits: torch.Tensor) -> None:
    """A buffer that cannot take the gradient in place (expanded, self-overlapping) is refused."""
    expanded = any(st == 0 and sz > 1 for st, sz in zip(logits.stride(), logits.shape))
    if expanded or torch._debug_has_internal_overlap(logits) == 1:
        raise ValueError(f"logits cannot be written in place: it is an expanded or self-overlapping view "
                         f"(strides {tuple(logits.stride())}); pass a materialized tensor, or inplace=False")


# ---------------------------------------------------------------------------------------------
# The forward that no gradient will follow (rollout log-probs, evaluation): no lse is kept for a
# backward, so kept rows are gathered first and only they are computed, in the fewest passes.
# ---------------------------------------------------------------------------------------------
def flat_rows(x: torch.Tensor):
    """(rows [R, V], step) with row i of ``x`` in flattened order at ``rows[(i // T) * step + i % T]``
    (T = x.shape[-2]): a 2-D view over the same memory, never a copy, for x [N, V] with any row stride
    or x [B, T, V] whose rows lie on one grid (a ``logits[:, :-1]`` slice); None for any other layout."""
    vocab = x.shape[-1]
    if x.dim() == 2 or x.stride(-1) != 1:
        return (x, None) if x.dim() == 2 and x.stride(-1) == 1 else None
    try:
        return x.view(-1, vocab), None
    except RuntimeError:
        pass
    b, t = x.shape[0], x.shape[1]
    s0, s1 = x.stride(0), x.stride(1)
    if b == 0 or t == 0 or s1 < vocab or s0 % s1 or s0 < t * s1:
        return None
    step = s0 // s1
    return x.as_strided(((b - 1) * step + t, vocab), (s1, 1)), step


def _shift_rows(z: torch.Tensor, tau, m: torch.Tensor, y: torch.Tensor) -> None:
    """y = z / tau - m / tau in one pass for a float tau (z * (1 / tau): within an ulp of z / tau);
    z [..., V] any layout, m [r] the row max of z, y [r, V] the compute-dtype buffer."""
    yv = y.view(z.shape)
    mv = m.view(z.shape[:-1]).unsqueeze(-1)
    if torch.is_tensor(tau):
        tv = tau.view(z.shape[:-1]).unsqueeze(-1)
        torch.div(z, tv, out=yv)
        yv.sub_(mv / tv)
    elif tau != 1.0:
        torch.add(mv * (-1.0 / tau), z, alpha=1.0 / tau, out=yv)
    else:
        torch.sub(z, mv, out=yv)


def logprob_entropy_rows(source, targets: torch.Tensor, tau, want_entropy: bool, y: torch.Tensor,
                         e: torch.Tensor):
    """(log p[target], entropy or None) of r rows, for a forward that no gradient follows.

    ``source(y)`` returns the rows' logits z [..., V] (r rows in flattened order, any layout; it may
    write them into the buffer y [r, V] and return y). ``e`` is a second [r, V] buffer, needed only
    with ``want_entropy``. It is called again in the rare case of a -inf
    entry, so it must be repeatable. ``tau`` is a float or an [r, 1] tensor. Passes over the rows: the
    row max (a read), y = z / tau - max (one write), e = exp(y) and its row sum, and with
    ``want_entropy`` the row sum of e * y. Special values as in ``chunk_stats``: -inf entries are exact
    (probability 0, entropy term 0); a row with a NaN, a +inf or no finite entry gives NaN.
    """
    cdt = y.dtype

    def rows():
        z = source(y)
        if z.dtype != cdt:  # bf16 / fp16: one cast, then same-dtype arithmetic
            y.view(z.shape).copy_(z)
            z = y
        return z

    z = rows()
    m = z.amax(dim=-1).reshape(-1).to(cdt)
    # a row of -inf only: shift by a finite value so that y stays -inf (not -inf - -inf = NaN)
    m = m.clamp(min=torch.finfo(cdt).min)
    _shift_rows(z, tau, m, y)
    y_t = y.gather(1, targets.unsqueeze(1)).squeeze(1)
    if y.device.type != "cpu":
        y.clamp_(min=FLOOR)  # a host check would sync; exp(FLOOR) = 0, so no probability changes
    if not want_entropy:  # y is not read again: exp in place, and no second buffer (e may be None)
        return y_t - torch.log(y.exp_().sum(dim=-1)), None
    torch.exp(y, out=e)
    l_i = e.sum(dim=-1)
    log_l = torch.log(l_i)
    ey = y.mul_(e).sum(dim=-1)
    if y.device.type == "cpu" and bool((torch.isnan(ey) & ~torch.isnan(l_i)).any()):
        # 0 * -inf at a -inf entry of an otherwise finite row: rare, so y is rebuilt and floored only here
        _shift_rows(rows(), tau, m, y)
        ey = y.clamp_(min=FLOOR).mul_(e).sum(dim=-1)
    return y_t - log_l, log_l - ey / l_i


# The forward without gradient makes several passes over a chunk (max, shift, exp, sums): at 2 MiB of
# work buffers a chunk stays in a core's L2 cache between them. Its per-chunk cost is a few small ops, so
# even one row of a 151936 vocabulary per chunk is cheap (measured on one core: 5.3 ms at 2 MiB, 5.6 ms
# at 32 MiB for 2x32x151936 fp32, against 41 ms for TRL-style eager code).
NO_GRAD_CHUNK_BYTES = 2 << 20


def no_grad_rows(vocab: int, cdt: torch.dtype) -> int:
    """Rows per chunk of the forward without gradient: two [rows, V] compute-dtype buffers."""
    return max(1, min(NO_GRAD_CHUNK_BYTES, CHUNK_BYTES) // max(1, vocab * 2 * torch.finfo(cdt).bits // 8))


def kept_rows_index(keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The indices of the kept rows when computing only them pays (CPU, some row masked); else None:
    every row is computed (a masked row's values stay in its own row and are replaced by 0)."""
    if keep is None or keep.device.type != "cpu" or bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)
