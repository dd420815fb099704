"""The local ops of vocabulary parallelism: softmax partials of a logits shard (one read) and its
gradient from the global lse and entropy (one read, one write).

Each rank holds columns [v0, v0 + V_s) of the logits. ``vocab_shard_partials`` writes, per row, the
online-softmax state of the shard, which ``lens_kernels.distributed`` combines over the ranks into the
log-prob and entropy of the whole row; ``vocab_shard_grad`` then writes dL/dz of the shard. Same
signatures and semantics as ``backends.torch``; no autograd here (the distributed Function owns it).
One program per flattened row; rows whose gradient coefficients are all zero (masked tokens) never
read the logits and get an exact-zero gradient row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    block_v,
    check_element_aligned,
    check_kernel_dtype,
    empty_grad_like,
    flat_rows,
    num_warps_for,
    row_layout,
    row_offset,
    row_partials,
    same_row_phase,
    temperature_args,
    write_row_grad,
    write_zero_row,
)


@triton.jit
def _vocab_shard_partials_kernel(
    # data pointers
    logits_ptr,  # [B, T, V_s] (strided rows), fp32/bf16/fp16
    targets_ptr,  # [N] int32 shard-local ids
    tau_ptr,  # [N] fp32 temperature, read when PER_ROW_TAU
    partials_ptr,  # [4, N] fp32 out: m_i, l_i, ey_i, target_shifted of y = z / tau
    # shapes
    rows_per_batch,  # T
    V,  # V_s, the shard's width
    # strides (elements) of the logits rows
    stride_b,
    stride_t,
    # scalars
    tau,  # temperature when not PER_ROW_TAU
    # switches
    PER_ROW_TAU: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = tl.num_programs(0).to(tl.int64)  # the grid is one program per row; 3 * n may pass 2^31
    if PER_ROW_TAU:
        tau = tl.load(tau_ptr + row)
    inv_tau = 1.0 / tau
    row_ptr = logits_ptr + row_offset(row, rows_per_batch, stride_b, stride_t)
    # s_i of the sweep is sum exp(y - m_i)(y - m_i): ey_i of the contract, as is
    m_i, l_i, ey_i = row_partials(row_ptr, V, inv_tau, BLOCK_V)
    target = tl.load(targets_ptr + row)
    # the contract asks for an id in range on every row; a stray one reads NaN, not foreign memory
    in_shard = (target >= 0) & (target < V)
    target_shifted = tl.load(row_ptr + target, mask=in_shard, other=float("nan")).to(tl.float32) * inv_tau - m_i
    tl.store(partials_ptr + row, m_i)
    tl.store(partials_ptr + n + row, l_i)
    tl.store(partials_ptr + 2 * n + row, ey_i)
    tl.store(partials_ptr + 3 * n + row, target_shifted)


@triton.jit
def _vocab_shard_grad_kernel(
    # data pointers
    logits_ptr,  # [B, T, V_s] (strided rows), read
    grad_ptr,  # [B, T, V_s] (strided rows) out; may alias logits_ptr (in place)
    targets_ptr,  # [N] int32 shard-local ids
    tau_ptr,  # [N] fp32, when PER_ROW_TAU
    lse_ptr,  # [N] fp32 log-sum-exp of z / tau over the whole vocabulary
    entropy_ptr,  # [N] fp32 entropy of the whole row
    g_logp_ptr,  # [N] fp32 dL/dl
    g_entropy_ptr,  # [N] fp32 dL/dH, when HAS_ENTROPY_GRAD
    g_target_ptr,  # [N] fp32 coefficient of the one-hot (0 where another shard holds the target)
    # shapes
    rows_per_batch,
    V,
    # strides (elements)
    stride_b,
    stride_t,
    grad_stride_b,
    grad_stride_t,
    # scalars
    tau,
    # switches
    PER_ROW_TAU: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    GRAD_ALIGNED: tl.constexpr,  # gradient rows share the logits rows' 16-byte phase (same_row_phase)
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    grad_row_ptr = grad_ptr + row_offset(row, rows_per_batch, grad_stride_b, grad_stride_t)
    g_logp = tl.load(g_logp_ptr + row)
    g_target = tl.load(g_target_ptr + row)
    g_entropy = 0.0
    if HAS_ENTROPY_GRAD:
        g_entropy = tl.load(g_entropy_ptr + row)
    if (g_logp != 0.0) | (g_target != 0.0) | (g_entropy != 0.0):
        if PER_ROW_TAU:
            tau = tl.load(tau_ptr + row)
        inv_tau = 1.0 / tau
        row_ptr = logits_ptr + row_offset(row, rows_per_batch, stride_b, stride_t)
        # the global lse stands in for m_i (log_l = 0): log p = y - lse, as the torch backend computes it
        write_row_grad(row_ptr, grad_row_ptr, V, tl.load(targets_ptr + row), tl.load(lse_ptr + row), 0.0,
                       tl.load(entropy_ptr + row), g_logp, g_entropy, g_target, inv_tau, HAS_ENTROPY_GRAD,
                       GRAD_ALIGNED, BLOCK_V)
    else:
        write_zero_row(grad_row_ptr, V, BLOCK_V)


def _shard_rows(logits, targets, temperature):
    """(N, flat int32 targets, scalar tau, [N] tau or None) of a shard."""
    n = targets.numel()
    t = targets.reshape(n).to(torch.int32).contiguous()
    tau, tau_rows = temperature_args(temperature, n, tuple(logits.shape[:-1]), logits.device)
    return n, t, tau, tau_rows


def vocab_shard_partials(logits, targets, temperature=1.0):
    """Same contract as ``backends.torch.vocab_shard_partials``: (m_i, l_i, ey_i, target_shifted),
    four flat [N] fp32 tensors, from one read of ``logits`` [..., V_s] (strided rows allowed)."""
    check_kernel_dtype(logits, "vocab_shard_partials")
    check_element_aligned(logits, "logits")
    n, t, tau, tau_rows = _shard_rows(logits, targets, temperature)
    vocab = logits.shape[-1]
    partials = torch.full((4, n), float("nan"), dtype=torch.float32, device=logits.device)
    rows_per_batch, stride_b, stride_t = row_layout(logits)
    block = block_v(vocab)
    if n:
        _vocab_shard_partials_kernel[(n,)](
            logits, t, partials if tau_rows is None else tau_rows, partials,
            rows_per_batch, vocab, stride_b, stride_t, tau,
            PER_ROW_TAU=tau_rows is not None, BLOCK_V=block, num_warps=num_warps_for(block),
        )
    return tuple(partials.unbind(0))


def vocab_shard_grad(logits, targets, temperature, lse, entropy, g_logp, g_entropy=None, g_target=None,
                     inplace=False):
    """Same contract as ``backends.torch.vocab_shard_grad``: dL/dlogits of the shard, shaped and
    typed as ``logits`` (written into it when ``inplace``), from one read and one write."""
    check_kernel_dtype(logits, "vocab_shard_grad")
    check_element_aligned(logits, "logits")
    n, t, tau, tau_rows = _shard_rows(logits, targets, temperature)
    lead = (n,)
    lse, entropy, g_logp = (flat_rows(x, n, lead, logits.device) for x in (lse, entropy, g_logp))
    g_target = g_logp if g_target is None else flat_rows(g_target, n, lead, logits.device)
    g_entropy = None if g_entropy is None else flat_rows(g_entropy, n, lead, logits.device)
    vocab = logits.shape[-1]
    grad = logits if inplace else empty_grad_like(logits)  # in place: the caller's autograd records it
    rows_per_batch, stride_b, stride_t = row_layout(logits)
    _, grad_stride_b, grad_stride_t = row_layout(grad)
    block = block_v(vocab)
    if n:
        _vocab_shard_grad_kernel[(n,)](
            logits, grad, t, lse if tau_rows is None else tau_rows, lse, entropy, g_logp,
            g_logp if g_entropy is None else g_entropy, g_target,
            rows_per_batch, vocab, stride_b, stride_t, grad_stride_b, grad_stride_t, tau,
            PER_ROW_TAU=tau_rows is not None, HAS_ENTROPY_GRAD=g_entropy is not None,
            GRAD_ALIGNED=same_row_phase(logits, grad), BLOCK_V=block, num_warps=num_warps_for(block),
        )
    return grad
