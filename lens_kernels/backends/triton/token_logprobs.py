"""Token log-probs and entropy from logits: one read of the logits forward, one read and one write
backward (given dL/dl and dL/dH).

Forward writes fp32 log-probs, entropy and the row max and log-sum (kept for backward). One program
per flattened row; masked rows never touch the logits and get an exact-zero gradient row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    bad_target_nan,
    block_v,
    check_element_aligned,
    check_kernel_dtype,
    keep_rows,
    num_warps_for,
    row_layout,
    row_offset,
    row_stats,
    same_row_phase,
    temperature_args,
    write_row_grad,
    write_zero_row,
)


@triton.jit
def _token_logprobs_fwd_kernel(
    # data pointers
    logits_ptr,  # [B, T, V] (strided rows), fp32/bf16/fp16
    targets_ptr,  # [N] int32
    keep_ptr,  # [N] int8, 1 = keep
    tau_ptr,  # [N] fp32 temperature, read when PER_ROW_TAU
    logp_ptr,  # [N] fp32 out
    entropy_ptr,  # [N] fp32 out
    stats_ptr,  # [2, N] fp32 out: row max m_i and log_l of z / tau (lse = m_i + log_l), for backward
    # shapes
    rows_per_batch,  # T
    V,
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
    keep = tl.load(keep_ptr + row) != 0
    logp = 0.0
    entropy = 0.0
    m_i = 0.0
    log_l = 0.0
    if keep:
        if PER_ROW_TAU:
            tau = tl.load(tau_ptr + row)
        inv_tau = 1.0 / tau
        row_ptr = logits_ptr + row_offset(row, rows_per_batch, stride_b, stride_t)
        m_i, log_l, entropy, logp = row_stats(row_ptr, tl.load(targets_ptr + row), V, inv_tau, BLOCK_V)
    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(stats_ptr + row, m_i)
    tl.store(stats_ptr + tl.num_programs(0) + row, log_l)  # the grid is one program per row: N


@triton.jit
def _token_logprobs_bwd_kernel(
    # data pointers
    logits_ptr,  # [B, T, V] (strided rows), read
    grad_ptr,  # [B, T, V] (strided rows) out; may alias logits_ptr (in place)
    targets_ptr,  # [N] int32
    keep_ptr,  # [N] int8
    tau_ptr,  # [N] fp32, when PER_ROW_TAU
    stats_ptr,  # [2, N] fp32 from forward: m_i, log_l
    entropy_ptr,  # [N] fp32 from forward
    g_logp_ptr,  # [N] fp32 dL/dl
    g_entropy_ptr,  # [N] fp32 dL/dH, when HAS_ENTROPY_GRAD
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
    keep = tl.load(keep_ptr + row) != 0
    grad_row_ptr = grad_ptr + row_offset(row, rows_per_batch, grad_stride_b, grad_stride_t)
    if keep:
        if PER_ROW_TAU:
            tau = tl.load(tau_ptr + row)
        inv_tau = 1.0 / tau
        row_ptr = logits_ptr + row_offset(row, rows_per_batch, stride_b, stride_t)
        target = tl.load(targets_ptr + row)
        m_i = tl.load(stats_ptr + row)
        log_l = tl.load(stats_ptr + tl.num_programs(0) + row)
        entropy = tl.load(entropy_ptr + row)
        # a kept target outside [0, V) gets a NaN gradient row even for a finite upstream gradient
        g_logp = tl.load(g_logp_ptr + row) + bad_target_nan(target, V)
        g_entropy = 0.0
        if HAS_ENTROPY_GRAD:
            g_entropy = tl.load(g_entropy_ptr + row)
        write_row_grad(row_ptr, grad_row_ptr, V, target, m_i, log_l, entropy, g_logp, g_entropy, g_logp,
                       inv_tau, HAS_ENTROPY_GRAD, GRAD_ALIGNED, BLOCK_V)
    else:
        write_zero_row(grad_row_ptr, V, BLOCK_V)


def token_logprobs_forward(logits, targets, mask, temperature):
    """Launches the forward kernel. Returns [N] fp32 logp and entropy, [2, N] row stats, the flat row inputs
    (targets, keep, tau tensor, tau scalar) for backward."""
    check_kernel_dtype(logits, "token_logprobs")
    check_element_aligned(logits, "logits")
    lead = tuple(logits.shape[:-1])
    vocab = logits.shape[-1]
    n = targets.numel()
    device = logits.device
    t = targets.reshape(n).to(torch.int32).contiguous()
    keep = keep_rows(mask, n, device)
    tau, tau_rows = temperature_args(temperature, n, lead, device)
    logp = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    entropy = torch.full_like(logp, float("nan"))
    stats = torch.full((2, n), float("nan"), dtype=torch.float32, device=device)
    rows_per_batch, stride_b, stride_t = row_layout(logits)
    block = block_v(vocab)
    if n:
        _token_logprobs_fwd_kernel[(n,)](
            logits, t, keep, logp if tau_rows is None else tau_rows, logp, entropy, stats,
            rows_per_batch, vocab, stride_b, stride_t, tau,
            PER_ROW_TAU=tau_rows is not None, BLOCK_V=block,
            num_warps=num_warps_for(block),
        )
    return logp, entropy, stats, (t, keep, tau_rows, tau)


def token_logprobs_backward(logits, grad, row_inputs, stats, entropy, g_logp, g_entropy):
    """Writes dL/dz into ``grad`` (which may be ``logits`` itself; ``empty_grad_like`` gives a buffer
    whose stores are aligned as the loads are): one read, one write."""
    check_element_aligned(grad, "grad")
    t, keep, tau_rows, tau = row_inputs
    n = t.numel()
    vocab = logits.shape[-1]
    rows_per_batch, stride_b, stride_t = row_layout(logits)
    _, grad_stride_b, grad_stride_t = row_layout(grad)
    block = block_v(vocab)
    if n:
        _token_logprobs_bwd_kernel[(n,)](
            logits, grad, t, keep, entropy if tau_rows is None else tau_rows, stats, entropy, g_logp,
            g_logp if g_entropy is None else g_entropy,
            rows_per_batch, vocab, stride_b, stride_t, grad_stride_b, grad_stride_t, tau,
            PER_ROW_TAU=tau_rows is not None, HAS_ENTROPY_GRAD=g_entropy is not None,
            GRAD_ALIGNED=same_row_phase(logits, grad), BLOCK_V=block, num_warps=num_warps_for(block),
        )
    return grad


def launch_forward(logits, targets, mask, temperature):
    """The op's forward launcher: (logp [N] fp32, entropy [N] fp32, stats [2, N] fp32 for backward)."""
    check_kernel_dtype(logits, "token_logprobs")
    logp, entropy, stats, _ = token_logprobs_forward(logits, targets, mask, temperature)
    return logp, entropy, stats


def launch_backward(logits, targets, mask, temperature, stats, entropy, g_logp, g_entropy, out):
    """The op's backward launcher: dL/dz into ``out`` (``logits`` itself for in place) for the flat
    upstream gradients g_logp, g_entropy (either may be None; masked rows are never read)."""
    n = entropy.numel()
    device = entropy.device
    t = targets.reshape(n).to(torch.int32).contiguous()
    keep = keep_rows(mask, n, device)
    tau, tau_rows = temperature_args(temperature, n, tuple(logits.shape[:-1]), device)
    g_l = torch.zeros(n, dtype=torch.float32, device=device) if g_logp is None else \
        g_logp.reshape(n).float().contiguous()
    g_h = None if g_entropy is None else g_entropy.reshape(n).float().contiguous()
    return token_logprobs_backward(logits, out, (t, keep, tau_rows, tau), stats, entropy, g_l, g_h)

