"""Pieces shared by the logits ops: row addressing, the online-softmax update with entropy, the
closed-form dL/dz of one block of a row, and the host-side launch heuristics.

Every kernel walks flattened rows r in [0, N) of a [B, T, V] (or [N, V]) logits tensor that may be a
strided view (``logits[:, :-1]``): row r sits at ``(r // T) * stride_b + (r % T) * stride_t``, computed
in int64 because ``row * stride`` overflows int32 beyond 2^31 elements. The vocabulary stride is 1
(checked at the public boundary).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once at import, like triton's own @jit: the kernels of this package are interpreted (CPU
# tensors) exactly when this is set before they are decorated.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest vocabulary block one program holds at a time. 4096 fp32 values are 16 registers per thread
# at 8 warps; the interpreter also runs faster with fewer, larger blocks.
MAX_BLOCK_V = 4096

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def row_offset(row, rows_per_batch, stride_b, stride_t):
    """Element offset of flattened row ``row`` (int64) in a [B, T, V] view with strides (b, t, 1)."""
    return (row // rows_per_batch) * stride_b + (row % rows_per_batch) * stride_t


@triton.jit
def softmax_stats_update(x, m_i, l_i, s_i):
    """Folds one block of scaled logits x into the running (max, sum, entropy) state of a row.

    m_i: running max; l_i = sum exp(x - m_i); s_i = sum exp(x - m_i) (x - m_i). Keeping s_i relative
    to the running max (instead of sum p x) avoids the cancellation of lse - E[x] when |x| ~ 1e4.
    Lanes holding -inf (out of range, or a banned token) contribute nothing.
    """
    m_new = tl.maximum(m_i, tl.max(x, 0))
    # A prefix of -inf lanes leaves m at -inf: shift by 0 then, so that no inf - inf appears.
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    prev_shift = tl.where(l_i > 0, m_i - m_safe, 0.0)
    e = tl.exp(x - m_safe)
    shifted = tl.where(e > 0, x - m_safe, 0.0)
    s_i = alpha * (s_i + prev_shift * l_i) + tl.sum(e * shifted, 0)
    l_i = alpha * l_i + tl.sum(e, 0)
    return m_new, l_i, s_i


@triton.jit
def finish_stats(l_i, s_i):
    """(log sum exp(x - m_i), entropy) of a row from its final online-softmax state.

    The lse is kept split as m_i + log_l: with |x| ~ 1e4, rounding m_i + log_l to fp32 alone would cost
    1e-3 absolute in every log p; (x - m_i) - log_l is exact to fp32 rounding of small numbers.
    """
    log_l = tl.log(l_i)
    return log_l, log_l - s_i / l_i


@triton.jit
def logit_grad_block(x, offs, target, m_i, log_l, entropy, g_logp, g_entropy, g_target, inv_tau,
                     HAS_ENTROPY_GRAD: tl.constexpr):
    """dL/dz of one block: inv_tau * [g_t onehot - g_l p - g_H p (log p + H)], x the scaled logits.

    g_t is g_l for a whole row; a vocabulary shard passes 0 where another shard holds the target.
    """
    log_p = (x - m_i) - log_l
    p = tl.exp(log_p)
    coef = -g_logp
    if HAS_ENTROPY_GRAD:
        # p == 0 (a -inf logit, or an out-of-range lane) must give 0, not 0 * inf
        coef = coef - g_entropy * tl.where(p > 0, log_p + entropy, 0.0)
    dz = p * coef + tl.where(offs == target, g_target, 0.0)
    return dz * inv_tau


@triton.jit
def merge_stats(m_p, l_p, s_p):
    """(m_i, l_i, s_i) of a row from partial states (vectors: the blocks of a row in ``split``).

    Partials with l == 0 (only -inf seen) add nothing; a NaN partial makes the row NaN (the test is
    l == 0, not l > 0, which would drop it).
    """
    m_i = tl.max(m_p, 0)
    m_safe = tl.where(m_i == -float("inf"), 0.0, m_i)
    empty = l_p == 0
    shift = tl.where(empty, 0.0, m_p - m_safe)  # an empty partial's m is -inf: keep it out of the products
    scale = tl.where(empty, 0.0, tl.exp(shift))
    l_i = tl.sum(l_p * scale, 0)
    s_i = tl.sum(scale * (s_p + shift * l_p), 0)
    return m_i, l_i, s_i


@triton.jit
def row_partials(row_ptr, V, inv_tau, BLOCK_V: tl.constexpr):
    """One sweep over a row (or a vocabulary shard of it): the online-softmax state (m_i, l_i, s_i)
    of z / tau, see ``softmax_stats_update``.

    The block-wide state costs 3 reductions per block. A per-lane state merged once after the loop
    (no reduction in the loop) was tried for issue 14: ptxas then used 80-93 registers and spilled
    4-8 bytes in the fused row kernel at sm_90 (40 registers, no spill, this way), so it waits for a
    GPU measurement (benchmarks/NOTES.md).
    """
    m_i = -float("inf")
    l_i = 0.0
    s_i = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * inv_tau
        m_i, l_i, s_i = softmax_stats_update(x, m_i, l_i, s_i)
    return m_i, l_i, s_i


@triton.jit
def row_stats(row_ptr, target, V, inv_tau, BLOCK_V: tl.constexpr):
    """One sweep over a row: (m_i, log_l, entropy, logp of the target) of softmax(z / tau)."""
    m_i, l_i, s_i = row_partials(row_ptr, V, inv_tau, BLOCK_V)
    log_l, entropy = finish_stats(l_i, s_i)
    logp = (target_logit(row_ptr, target, V) * inv_tau - m_i) - log_l
    return m_i, log_l, entropy, logp


@triton.jit
def target_logit(row_ptr, target, V):
    """z[target] in fp32, or NaN for a target outside [0, V) (e.g. a kept -100): never a read out of
    bounds, and the NaN carries into the log-prob, the loss and the gradient row (README)."""
    in_vocab = (target >= 0) & (target < V)
    return tl.load(row_ptr + target, mask=in_vocab, other=float("nan")).to(tl.float32)


@triton.jit
def bad_target_nan(target, V):
    """0 for a target in [0, V), NaN otherwise: added to a row's dL/dl so that a kept out-of-range
    target gives a NaN gradient row even when the upstream gradient is finite."""
    return tl.where((target >= 0) & (target < V), 0.0, float("nan"))


@triton.jit
def write_row_grad(row_ptr, grad_row_ptr, V, target, m_i, log_l, entropy, g_logp, g_entropy, g_target, inv_tau,
                   HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One sweep: reads the row again and writes its dL/dz (``grad_row_ptr`` may be ``row_ptr``)."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_range = offs < V
        x = tl.load(row_ptr + offs, mask=in_range, other=-float("inf")).to(tl.float32) * inv_tau
        dz = logit_grad_block(x, offs, target, m_i, log_l, entropy, g_logp, g_entropy, g_target, inv_tau,
                              HAS_ENTROPY_GRAD)
        tl.store(grad_row_ptr + offs, dz.to(grad_row_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def write_zero_row(grad_row_ptr, V, BLOCK_V: tl.constexpr):
    """The exact-zero gradient of a masked row, written without reading the logits."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(grad_row_ptr + offs, tl.zeros([BLOCK_V], dtype=grad_row_ptr.dtype.element_ty), mask=offs < V)


# ---------------------------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------------------------
def check_kernel_dtype(logits: torch.Tensor, op: str) -> None:
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"the triton backend's {op} takes fp32/bf16/fp16 logits, got {str(logits.dtype).replace('torch.', '')}; "
            f"use backend='torch' (or 'auto') for float64"
        )


def row_layout(x: torch.Tensor):
    """(rows_per_batch, stride_b, stride_t) of a [B, T, V] or [N, V] tensor, for ``row_offset``."""
    if x.dim() == 2:
        return max(1, x.shape[0]), 0, x.stride(0)
    return max(1, x.shape[1]), x.stride(0), x.stride(1)


def block_v(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), MAX_BLOCK_V)


def num_warps_for(block: int) -> int:
    return 8 if block >= 2048 else 4


def flat_rows(x, n: int, lead, device, dtype=torch.float32) -> torch.Tensor:
    """A per-token value ([B], [B, T], a 0-d tensor or a float) as a contiguous [N] tensor."""
    if not torch.is_tensor(x):
        return torch.full((n,), float(x), dtype=dtype, device=device)
    x = x.to(device=device, dtype=dtype)
    if x.dim() == 1 and len(lead) == 2 and x.shape[0] == lead[0]:
        x = x.unsqueeze(-1)
    return x.expand(lead).reshape(n).contiguous()


def temperature_args(temperature, n: int, lead, device):
    """(scalar tau, [N] tau tensor or None): a float stays a kernel scalar; a tensor goes per row."""
    if torch.is_tensor(temperature):
        return 1.0, flat_rows(temperature, n, lead, device)
    return float(temperature), None


def keep_rows(mask, n: int, device) -> torch.Tensor:
    """The mask as a contiguous [N] int8 (1 = keep); all ones without a mask."""
    if mask is None:
        return torch.ones(n, dtype=torch.int8, device=device)
    return mask.reshape(n).to(torch.bool).to(torch.int8).contiguous()
