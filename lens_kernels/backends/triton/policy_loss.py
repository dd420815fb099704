"""The fused policy loss from logits: loss, metrics and dL/dlogits in forward (docs/design.md, Kernel designs).

Token-level ratios (every ``LossConfig`` with ``ratio_level="token"``): the per-token coefficients
dL/dl_t and dL/dH_t depend only on that token's values, so one kernel reads a row, finishes its
softmax statistics, evaluates the loss and the coefficients (the formulas of
``torch_backend.token_coefficients`` / ``kl_and_grad``), and writes dL/dz for the row. The aggregation
weights depend only on the mask and the caller's normalizers, so they are computed before the launch.
Two variants, chosen in one place (``choose_variant``):

- ``row``: one program per row sweeps it twice (statistics, then gradient). Runs everywhere,
  including the Triton interpreter. On a GPU the second sweep mostly misses L2 (~3 passes of HBM).
- ``split``: each row is cut into ``cdiv(V, BLOCK_V)`` blocks, one program per block. A program loads
  its block once and keeps it in registers, publishes its (m_i, l_i, s_i) partials, waits on a per-row
  arrival counter until every block of the row has published, merges the partials and writes its
  block's gradient: 1 read + 1 write of HBM. Everything a program reads from the logits (its block and
  the target logit) is read before it publishes, so ``inplace`` cannot read a gradient as a logit.
  The wait is a spin on global memory, so it needs all blocks of a row resident at once: a program
  takes its logical id from a ticket counter (never from program_id, whose dispatch order is not
  guaranteed), and the launcher falls back to ``row`` unless the blocks of a row fit in half the
  device's resident capacity (registers and SM count, ``split_fits``). The interpreter runs programs
  one after the other and would deadlock: the variant is GPU-only.

Sequence-level ratios (GSPO, ``ratio_level`` "sequence" / "sequence_token") need the whole sequence
before any coefficient is known: they take the 3-pass path (the forward log-prob kernel, the per-token
loss in torch, then the backward kernel).

The grad-scale contract (the gradient assumes an upstream ``grad_scale``; backward rescales) is
the op's, in ``lens_kernels.loss``; ``rescale_grad_`` is this backend's kernel for it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import torch as torch_backend
from ._common import (
    INTERPRETING,
    VEC_BYTES,
    bad_target_nan,
    block_v,
    check_element_aligned,
    check_kernel_dtype,
    finish_stats,
    flat_rows,
    keep_rows,
    logit_grad_block,
    merge_stats,
    num_warps_for,
    row_layout,
    row_peel,
    row_offset,
    row_stats,
    same_row_phase,
    softmax_stats_update,
    target_logit,
    temperature_args,
    write_row_grad,
    write_zero_row,
)

_POLICY_LOSS_IDS = {"ppo": 0, "cispo": 1, "sapo": 2}
_KL_IDS = {"k1": 1, "k2": 2, "k3": 3}

# Blocks per row of the split variant: one program holds SPLIT_BLOCK_V values of its row in registers.
SPLIT_BLOCK_V = 8192
SPLIT_MAX_BLOCKS = 64


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _token_loss_terms(
    row, logp, entropy,
    # per-token inputs, [N] fp32
    adv_ptr, old_logp_ptr, ref_logp_ptr, is_weight_ptr, weight_ptr, entropy_weight_ptr,
    # loss options
    clip_low, clip_high, delta, dual_clip, cispo_cap, sapo_temp_pos, sapo_temp_neg, log_ratio_clamp,
    beta, kl_clamp, entropy_coef,
    POLICY_LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    HAS_LOG_RATIO_CLAMP: tl.constexpr, HAS_OLD: tl.constexpr, HAS_IS: tl.constexpr, HAS_KL: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr, HAS_KL_CLAMP: tl.constexpr, HAS_ENTROPY_BONUS: tl.constexpr,
):
    """(dL/dl, dL/dH, weighted loss, weighted policy term, KL, rho) of one kept token.

    A port of torch_backend.token_coefficients / kl_and_grad / PolicyLossFunction for token-level
    ratios: ties of min split the gradient half/half, clamps pass it at their bounds (inclusive).
    rho overflows to +inf above ~88.7 nats: every gate selects (tl.where), so a clipped, capped or
    saturated token gets exactly 0, never 0 * inf = NaN.
    """
    adv = tl.load(adv_ptr + row)
    weight = tl.load(weight_ptr + row)
    # zeros typed like logp, never 0 * logp: a -inf target log-prob would make them NaN
    zero = tl.zeros_like(logp)
    log_ratio = zero  # on-policy: rho = 1 with the gradient of rho
    if HAS_OLD:
        log_ratio = logp - tl.load(old_logp_ptr + row)
    if HAS_LOG_RATIO_CLAMP:
        ratio_inside = (log_ratio >= -log_ratio_clamp) & (log_ratio <= log_ratio_clamp)
        log_ratio = tl.minimum(tl.maximum(log_ratio, -log_ratio_clamp), log_ratio_clamp)
    rho = tl.exp(log_ratio)
    direct = zero  # dL/dl not through rho (CISPO)
    if POLICY_LOSS == 0:  # PPO clip
        if HAS_DELTA:
            unclipped = tl.minimum(rho, delta) * adv
            d_unclipped = tl.where(rho <= delta, adv, 0.0)
        else:
            unclipped = tl.where(adv == 0.0, 0.0, rho * adv)
            d_unclipped = adv
        clipped = tl.minimum(tl.maximum(rho, clip_low), clip_high) * adv
        d_clipped = tl.where((rho >= clip_low) & (rho <= clip_high), adv, 0.0)
        f = -tl.minimum(unclipped, clipped)
        df = -tl.where(unclipped < clipped, d_unclipped,
                       tl.where(clipped < unclipped, d_clipped, 0.5 * (d_unclipped + d_clipped)))
        if HAS_DUAL_CLIP:
            bound = -dual_clip * adv
            neg = adv < 0
            df = tl.where(neg & (f > bound), 0.0, tl.where(neg & (f == bound), 0.5 * df, df))
            f = tl.where(neg, tl.minimum(f, bound), f)
    elif POLICY_LOSS == 1:  # CISPO
        capped = tl.minimum(rho, cispo_cap)
        f = -capped * adv * logp
        df = zero
        direct = -capped * adv
    else:  # SAPO
        temp = tl.where(adv > 0, sapo_temp_pos, sapo_temp_neg)
        gate = 1.0 / (1.0 + tl.exp(-temp * (rho - 1.0)))
        f = -(4.0 / temp) * gate * adv
        df = -4.0 * gate * (1.0 - gate) * adv
    if HAS_IS:
        is_weight = tl.load(is_weight_ptr + row)
        f = tl.where(is_weight == 0.0, 0.0, f * is_weight)
        df = df * is_weight
        direct = direct * is_weight
    policy = weight * f
    loss = policy
    g_ratio = tl.where(df == 0.0, 0.0, weight * df * rho)
    if HAS_LOG_RATIO_CLAMP:
        g_ratio = tl.where(ratio_inside, g_ratio, 0.0)
    g_logp = weight * direct + g_ratio
    kl = zero
    if HAS_KL:
        d = tl.load(ref_logp_ptr + row) - logp
        if KL_ESTIMATOR == 1:
            kl = -d
            d_kl = zero + 1.0
        elif KL_ESTIMATOR == 2:
            kl = 0.5 * d * d
            d_kl = -d
        else:
            # at an infinite difference: the limit +inf with derivative 0 (IEEE: inf - inf = NaN)
            infinite = (d == float("inf")) | (d == -float("inf"))
            d = tl.where(infinite, 0.0, d)
            exp_d = tl.exp(d)
            kl = tl.where(infinite, float("inf"), exp_d - d - 1.0)
            d_kl = tl.where(infinite, 0.0, 1.0 - exp_d)
        if HAS_KL_CLAMP:
            d_kl = tl.where((kl >= -kl_clamp) & (kl <= kl_clamp), d_kl, 0.0)
            kl = tl.minimum(tl.maximum(kl, -kl_clamp), kl_clamp)
        loss = loss + beta * weight * kl
        g_logp = g_logp + beta * weight * d_kl
    g_entropy = zero
    if HAS_ENTROPY_BONUS:
        entropy_weight = tl.load(entropy_weight_ptr + row)
        loss = loss - entropy_coef * entropy_weight * entropy
        g_entropy = -entropy_coef * entropy_weight
    return g_logp, g_entropy, loss, policy, kl, rho


@triton.jit
def _store_row_outputs(row, loss_part_ptr, policy_part_ptr, kl_ptr, rho_ptr, entropy_ptr, logp_ptr,
                       loss, policy, kl, rho, entropy, logp):
    tl.store(loss_part_ptr + row, loss)
    tl.store(policy_part_ptr + row, policy)
    tl.store(kl_ptr + row, kl)
    tl.store(rho_ptr + row, rho)
    tl.store(entropy_ptr + row, entropy)
    tl.store(logp_ptr + row, logp)


@triton.jit
def _policy_loss_row_kernel(
    # data pointers: logits and per-token inputs ([N] unless noted)
    logits_ptr,  # [B, T, V] strided rows, fp32/bf16/fp16
    targets_ptr,  # int32
    keep_ptr,  # int8, 1 = keep
    tau_ptr,  # fp32, when PER_ROW_TAU
    adv_ptr, old_logp_ptr, ref_logp_ptr, is_weight_ptr,  # fp32
    weight_ptr, entropy_weight_ptr,  # fp32 aggregation weights of the loss and of the entropy bonus
    # data pointers: outputs
    grad_ptr,  # [B, T, V] strided rows, logits dtype; may alias logits_ptr (inplace)
    loss_part_ptr, policy_part_ptr, kl_ptr, rho_ptr, entropy_ptr, logp_ptr,  # [N] fp32
    # shapes
    rows_per_batch, V,
    # strides (elements)
    stride_b, stride_t, grad_stride_b, grad_stride_t,
    # scalars
    tau, grad_scale,
    clip_low, clip_high, delta, dual_clip, cispo_cap, sapo_temp_pos, sapo_temp_neg, log_ratio_clamp,
    beta, kl_clamp, entropy_coef,
    # switches
    POLICY_LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    HAS_LOG_RATIO_CLAMP: tl.constexpr, HAS_OLD: tl.constexpr, HAS_IS: tl.constexpr, HAS_KL: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr, HAS_KL_CLAMP: tl.constexpr, HAS_ENTROPY_BONUS: tl.constexpr,
    PER_ROW_TAU: tl.constexpr, WRITE_GRAD: tl.constexpr,
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
        m_i, log_l, entropy, logp = row_stats(row_ptr, target, V, inv_tau, BLOCK_V)
        g_logp, g_entropy, loss, policy, kl, rho = _token_loss_terms(
            row, logp, entropy, adv_ptr, old_logp_ptr, ref_logp_ptr, is_weight_ptr, weight_ptr,
            entropy_weight_ptr, clip_low, clip_high, delta, dual_clip, cispo_cap, sapo_temp_pos, sapo_temp_neg,
            log_ratio_clamp, beta, kl_clamp, entropy_coef, POLICY_LOSS, HAS_DELTA, HAS_DUAL_CLIP,
            HAS_LOG_RATIO_CLAMP, HAS_OLD, HAS_IS, HAS_KL, KL_ESTIMATOR, HAS_KL_CLAMP, HAS_ENTROPY_BONUS)
        # clamps (tl.minimum/maximum) may drop the NaN of a bad target: poison loss and gradient explicitly
        bad = bad_target_nan(target, V)
        loss += bad
        policy += bad
        g_logp += bad
        if WRITE_GRAD:
            g_logp = g_logp * grad_scale
            g_entropy = g_entropy * grad_scale
            # second sweep: on a GPU this re-read mostly misses L2 (see the split variant)
            write_row_grad(row_ptr, grad_row_ptr, V, target, m_i, log_l, entropy, g_logp, g_entropy, g_logp,
                           inv_tau, HAS_ENTROPY_BONUS, GRAD_ALIGNED, BLOCK_V)
        _store_row_outputs(row, loss_part_ptr, policy_part_ptr, kl_ptr, rho_ptr, entropy_ptr, logp_ptr,
                           loss, policy, kl, rho, entropy, logp)
    else:
        if WRITE_GRAD:
            write_zero_row(grad_row_ptr, V, BLOCK_V)
        _store_row_outputs(row, loss_part_ptr, policy_part_ptr, kl_ptr, rho_ptr, entropy_ptr, logp_ptr,
                           0.0, 0.0, 0.0, 1.0, 0.0, 0.0)


@triton.jit
def _policy_loss_split_kernel(
    # data pointers: logits and per-token inputs ([N] unless noted)
    logits_ptr, targets_ptr, keep_ptr, tau_ptr,
    adv_ptr, old_logp_ptr, ref_logp_ptr, is_weight_ptr, weight_ptr, entropy_weight_ptr,
    # data pointers: outputs
    grad_ptr, loss_part_ptr, policy_part_ptr, kl_ptr, rho_ptr, entropy_ptr, logp_ptr,
    # data pointers: workspace
    partials_ptr,  # [N, NUM_BLOCKS, 3] fp32: (m_i, l_i, s_i) of each block of each row
    arrivals_ptr,  # [N] int32, zero-initialised: blocks of the row that have published
    ticket_ptr,  # [1] int32, zero-initialised: the next logical program id to hand out
    # shapes
    rows_per_batch, V, NUM_BLOCKS,
    # strides (elements)
    stride_b, stride_t, grad_stride_b, grad_stride_t,
    # scalars
    tau, grad_scale,
    clip_low, clip_high, delta, dual_clip, cispo_cap, sapo_temp_pos, sapo_temp_neg, log_ratio_clamp,
    beta, kl_clamp, entropy_coef,
    # switches
    POLICY_LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    HAS_LOG_RATIO_CLAMP: tl.constexpr, HAS_OLD: tl.constexpr, HAS_IS: tl.constexpr, HAS_KL: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr, HAS_KL_CLAMP: tl.constexpr, HAS_ENTROPY_BONUS: tl.constexpr,
    PER_ROW_TAU: tl.constexpr, WRITE_GRAD: tl.constexpr,
    GRAD_ALIGNED: tl.constexpr,  # gradient rows share the logits rows' 16-byte phase (same_row_phase)
    BLOCK_V: tl.constexpr,
    BLOCKS_POW2: tl.constexpr,  # next power of 2 of NUM_BLOCKS, to load all partials at once
):
    # The logical id comes from a ticket counter, not from program_id: a program holding ticket k is
    # running, so every ticket below k has been handed to a program that started. With at least
    # NUM_BLOCKS programs resident (checked by the launcher), the row of the lowest unfinished ticket
    # has all its blocks started and completes, whatever order the hardware dispatches programs in.
    pid = tl.atomic_add(ticket_ptr, 1, sem="relaxed").to(tl.int64)
    row = pid // NUM_BLOCKS
    block = (pid % NUM_BLOCKS).to(tl.int32)  # int32 offsets within the row: fewer registers per value
    keep = tl.load(keep_ptr + row) != 0
    # The row is peeled (see _common): block b holds [b * BLOCK_V, (b + 1) * BLOCK_V) of the aligned body,
    # which starts at the row's first 16-byte boundary; block 0 also holds the edge tile (head and tail).
    # The body is at most V long, so cdiv(V, BLOCK_V) blocks cover it (the last one may be empty).
    VEC: tl.constexpr = VEC_BYTES * 8 // logits_ptr.dtype.element_ty.primitive_bitwidth
    row_ptr = logits_ptr + row_offset(row, rows_per_batch, stride_b, stride_t)
    grad_row_ptr = grad_ptr + row_offset(row, rows_per_batch, grad_stride_b, grad_stride_t)
    head, body_len, edge, edge_mask = row_peel(row_ptr, V, 2 * VEC)
    edge_mask = tl.where(block == 0, edge_mask, False)
    offs = block * BLOCK_V + tl.arange(0, BLOCK_V)  # from the body's start
    in_range = offs < body_len
    body_ptr = row_ptr + head
    grad_body_ptr = grad_row_ptr + head
    if GRAD_ALIGNED:  # both sides or neither (see _common.write_row_grad)
        body_ptr = tl.multiple_of(body_ptr, VEC_BYTES)
        grad_body_ptr = tl.multiple_of(grad_body_ptr, VEC_BYTES)
    if keep:
        if PER_ROW_TAU:
            tau = tl.load(tau_ptr + row)
        inv_tau = 1.0 / tau
        # the only HBM read of this block: x stays in registers until its gradient is written
        x = tl.load(body_ptr + offs, mask=in_range, other=-float("inf")).to(tl.float32) * inv_tau
        x_edge = tl.load(row_ptr + edge, mask=edge_mask, other=-float("inf")).to(tl.float32) * inv_tau
        # Everything read from the logits is read before the arrival is published: with inplace the
        # block that owns the target may write its gradient over it as soon as the row is complete.
        target = tl.load(targets_ptr + row)
        x_target = target_logit(row_ptr, target, V) * inv_tau
        m_b, l_b, s_b = softmax_stats_update(x_edge, -float("inf"), 0.0, 0.0, 0)
        m_b, l_b, s_b = softmax_stats_update(x, m_b, l_b, s_b, 0)
        part_ptr = partials_ptr + (row * NUM_BLOCKS + block) * 3
        tl.store(part_ptr, m_b)
        tl.store(part_ptr + 1, l_b)
        tl.store(part_ptr + 2, s_b)
        # the CTA barrier orders every thread's partial stores before the one thread's release, so
        # whoever sees the new count also sees the partials (PTX release is cumulative)
        tl.debug_barrier()
        tl.atomic_add(arrivals_ptr + row, 1, sem="release", scope="gpu")
        arrived = tl.atomic_add(arrivals_ptr + row, 0, sem="acquire", scope="gpu")
        while arrived < NUM_BLOCKS:
            arrived = tl.atomic_add(arrivals_ptr + row, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()  # every thread's partial loads below come after the acquire
        # merge every block's partials in a fixed order: all blocks of a row get bitwise equal stats
        blocks = tl.arange(0, BLOCKS_POW2)
        present = blocks < NUM_BLOCKS
        all_ptr = partials_ptr + (row * NUM_BLOCKS + blocks) * 3
        m_p = tl.load(all_ptr, mask=present, other=-float("inf"), cache_modifier=".cg")
        l_p = tl.load(all_ptr + 1, mask=present, other=0.0, cache_modifier=".cg")
        s_p = tl.load(all_ptr + 2, mask=present, other=0.0, cache_modifier=".cg")
        m_i, l_i, s_i = merge_stats(m_p, l_p, s_p, 0)
        log_l, entropy = finish_stats(l_i, s_i)
        logp = (x_target - m_i) - log_l
        g_logp, g_entropy, loss, policy, kl, rho = _token_loss_terms(
            row, logp, entropy, adv_ptr, old_logp_ptr, ref_logp_ptr, is_weight_ptr, weight_ptr,
            entropy_weight_ptr, clip_low, clip_high, delta, dual_clip, cispo_cap, sapo_temp_pos, sapo_temp_neg,
            log_ratio_clamp, beta, kl_clamp, entropy_coef, POLICY_LOSS, HAS_DELTA, HAS_DUAL_CLIP,
            HAS_LOG_RATIO_CLAMP, HAS_OLD, HAS_IS, HAS_KL, KL_ESTIMATOR, HAS_KL_CLAMP, HAS_ENTROPY_BONUS)
        bad = bad_target_nan(target, V)
        loss += bad
        policy += bad
        g_logp += bad
        if WRITE_GRAD:
            g_logp = g_logp * grad_scale
            g_entropy = g_entropy * grad_scale
            dz = logit_grad_block(x, head + offs, target, m_i, log_l, entropy, g_logp, g_entropy, g_logp, inv_tau,
                                  HAS_ENTROPY_BONUS)
            tl.store(grad_body_ptr + offs, dz.to(grad_ptr.dtype.element_ty), mask=in_range)
            dz_edge = logit_grad_block(x_edge, edge, target, m_i, log_l, entropy, g_logp, g_entropy, g_logp,
                                       inv_tau, HAS_ENTROPY_BONUS)
            tl.store(grad_row_ptr + edge, dz_edge.to(grad_ptr.dtype.element_ty), mask=edge_mask)
        if block == 0:
            _store_row_outputs(row, loss_part_ptr, policy_part_ptr, kl_ptr, rho_ptr, entropy_ptr, logp_ptr,
                               loss, policy, kl, rho, entropy, logp)
    else:
        if WRITE_GRAD:
            tl.store(grad_body_ptr + offs, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=in_range)
            tl.store(grad_row_ptr + edge, tl.zeros([2 * VEC], dtype=grad_ptr.dtype.element_ty), mask=edge_mask)
        if block == 0:
            _store_row_outputs(row, loss_part_ptr, policy_part_ptr, kl_ptr, rho_ptr, entropy_ptr, logp_ptr,
                               0.0, 0.0, 0.0, 1.0, 0.0, 0.0)


@triton.jit
def _rescale_grad_kernel(
    # data pointers
    grad_ptr,  # [B, T, V] strided rows, scaled in place
    ratio_ptr,  # [1] fp32: grad_output / grad_scale
    # shapes
    rows_per_batch, V,
    # strides (elements)
    grad_stride_b, grad_stride_t,
    BLOCK_V: tl.constexpr,
):
    # every program reads the ratio on the device and leaves at once when it is exactly 1: the
    # common case costs one scalar load per row and no host sync
    ratio = tl.load(ratio_ptr)
    if ratio != 1.0:
        row = tl.program_id(0).to(tl.int64)
        grad_row_ptr = grad_ptr + row_offset(row, rows_per_batch, grad_stride_b, grad_stride_t)
        # peeled on the gradient row (see _common)
        VEC: tl.constexpr = VEC_BYTES * 8 // grad_ptr.dtype.element_ty.primitive_bitwidth
        head, body_len, edge, edge_mask = row_peel(grad_row_ptr, V, 2 * VEC)
        g_edge = tl.load(grad_row_ptr + edge, mask=edge_mask, other=0.0).to(tl.float32)
        tl.store(grad_row_ptr + edge, (g_edge * ratio).to(grad_ptr.dtype.element_ty), mask=edge_mask)
        body_ptr = tl.multiple_of(grad_row_ptr + head, VEC_BYTES)
        for start in range(0, body_len, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_body = offs < body_len
            g = tl.load(body_ptr + offs, mask=in_body, other=0.0).to(tl.float32)
            tl.store(body_ptr + offs, (g * ratio).to(grad_ptr.dtype.element_ty), mask=in_body)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# Registers per thread the split kernel is compiled within (passed to ptxas as .maxnreg, and held to by the
# static compile check, tests/test_triton_compile.py, ptxas -v at sm_90 and sm_80 under each Triton
# version it knows); the capacity check uses it until a launch reports the real count. Rows are peeled
# (128-bit accesses whatever V and the row stride): bf16/fp16 ~80 registers, held to 128 (2 programs per
# SM); fp32 ~140-160, held to 255 (1 program per SM). Without the cap, the ptxas of Triton 3.6 kept the
# fp32 kernel at 128 registers and spilled 8-16 B.
SPLIT_NUM_WARPS = 8


def split_reg_budget(dtype: torch.dtype) -> int:
    return 128 if dtype in (torch.bfloat16, torch.float16) else 255


# Only this fraction of the resident capacity may be needed by one row: the rest is headroom for other
# streams' kernels and for SM limits the device properties do not report (green contexts).
SPLIT_CAPACITY_FRACTION = 0.5
_SPLIT_REGS = {}  # (device index, logits dtype) -> most registers per thread a compiled split kernel reported


def resident_programs(device: torch.device, regs_per_thread: int, num_warps: int) -> int:
    """How many programs of ``num_warps`` warps using ``regs_per_thread`` registers fit on the device at
    once: SM count (scaled by CUDA_MPS_ACTIVE_THREAD_PERCENTAGE when set) x programs per SM (register
    file, rounded to the 256-register warp allocation unit, and thread limit)."""
    props = torch.cuda.get_device_properties(device)
    sms = props.multi_processor_count
    mps = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    if mps:
        try:
            sms = max(1, int(sms * float(mps) / 100.0))
        except ValueError:
            pass
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    threads_per_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    regs_per_warp = -(-max(1, regs_per_thread) * 32 // 256) * 256
    per_sm = min(regs_per_sm // (regs_per_warp * num_warps), threads_per_sm // (32 * num_warps))
    return sms * per_sm


def split_fits(vocab: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether every block of a row can be resident at once (the split variant's progress condition)."""
    blocks = triton.cdiv(vocab, SPLIT_BLOCK_V)
    index = device.index if device.index is not None else torch.cuda.current_device()
    regs = _SPLIT_REGS.get((index, dtype), split_reg_budget(dtype))
    return blocks <= SPLIT_CAPACITY_FRACTION * resident_programs(device, regs, SPLIT_NUM_WARPS)


def choose_variant(n_rows: int, vocab: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The one place that picks the fused kernel's variant: "split" or "row" (see the module doc).

    "split" is opt-in (``LENS_KERNELS_TRITON_VARIANT=split``) until it has been measured on a GPU.
    It is taken only where it can apply (CUDA, 2..64 vocab blocks, a grid under 2^31) and where every
    block of a row fits on the device at once (``split_fits``); everything else runs "row".
    """
    if os.environ.get("LENS_KERNELS_TRITON_VARIANT", "") != "split":
        return "row"
    blocks = triton.cdiv(vocab, SPLIT_BLOCK_V)
    split_ok = (device.type == "cuda" and not INTERPRETING and 2 <= blocks <= SPLIT_MAX_BLOCKS
                and n_rows * blocks < 2 ** 31)
    return "split" if (split_ok and split_fits(vocab, device, dtype)) else "row"


def _loss_switches(cfg, has_old, has_is, has_entropy_bonus):
    return dict(
        POLICY_LOSS=_POLICY_LOSS_IDS[cfg.policy_loss],
        HAS_DELTA=cfg.delta is not None,
        HAS_DUAL_CLIP=cfg.dual_clip is not None,
        HAS_LOG_RATIO_CLAMP=cfg.log_ratio_clamp is not None,
        HAS_OLD=has_old,
        HAS_IS=has_is,
        HAS_KL=cfg.beta != 0.0,
        KL_ESTIMATOR=_KL_IDS[cfg.kl_estimator],
        HAS_KL_CLAMP=cfg.kl_clamp is not None,
        HAS_ENTROPY_BONUS=has_entropy_bonus,
    )


def _loss_scalars(cfg):
    return (
        1.0 - cfg.epsilon_low, 1.0 + cfg.eps_high,
        float(cfg.delta or 0.0), float(cfg.dual_clip or 0.0), float(cfg.cispo_ratio_cap),
        float(cfg.sapo_temperature_pos), float(cfg.sapo_temperature_neg), float(cfg.log_ratio_clamp or 0.0),
        float(cfg.beta), float(cfg.kl_clamp or 0.0), float(cfg.entropy_coef),
    )


def fused_policy_loss_forward(logits, grad, targets, mask, advantages, old_logps, ref_logps, is_weights,
                              temperature, cfg, num_tokens, num_sequences, grad_scale, variant=None):
    """Launches the fused kernel. Writes dL/dz (for upstream gradient ``grad_scale``) into ``grad``
    unless it is None; returns [N] fp32 per-row outputs (loss, policy, kl, rho, entropy, logp)."""
    B, T, vocab = logits.shape
    n = B * T
    device = logits.device
    lead = (B, T)
    check_element_aligned(logits, "logits")
    if grad is not None:
        check_element_aligned(grad, "grad")
    mask_f = (mask != 0).to(torch.float32)  # kept = mask != 0: never a weight (README)
    agg = dict(num_tokens=num_tokens, num_sequences=num_sequences, norm_length=cfg.loss_norm_length,
               dp_size=cfg.dp_size)
    weight = torch_backend.aggregation_weights(mask_f, cfg.loss_agg_mode, **agg).reshape(n).contiguous()
    has_entropy_bonus = cfg.entropy_coef != 0.0
    entropy_weight = weight
    if has_entropy_bonus and cfg.entropy_agg_mode not in (None, cfg.loss_agg_mode):
        entropy_weight = torch_backend.aggregation_weights(mask_f, cfg.entropy_agg_mode, **agg).reshape(n).contiguous()
    adv = flat_rows(advantages, n, lead, device)
    old = weight if old_logps is None else flat_rows(old_logps, n, lead, device)
    ref = weight if cfg.beta == 0.0 else flat_rows(ref_logps, n, lead, device)
    is_w = weight if is_weights is None else flat_rows(is_weights, n, lead, device)
    t = targets.reshape(n).to(torch.int32).contiguous()
    keep = keep_rows(mask, n, device)
    tau, tau_rows = temperature_args(temperature, n, lead, device)
    outputs = torch.full((6, n), float("nan"), dtype=torch.float32, device=device)
    rows_per_batch, stride_b, stride_t = row_layout(logits)
    write_grad = grad is not None
    grad_arg = grad if write_grad else logits
    _, grad_stride_b, grad_stride_t = row_layout(grad_arg)
    switches = _loss_switches(cfg, old_logps is not None, is_weights is not None, has_entropy_bonus)
    switches.update(PER_ROW_TAU=tau_rows is not None, WRITE_GRAD=write_grad,
                    GRAD_ALIGNED=same_row_phase(logits, grad_arg))  # grad_arg is logits when no gradient
    head = (logits, t, keep, weight if tau_rows is None else tau_rows, adv, old, ref, is_w, weight, entropy_weight,
            grad_arg, *outputs.unbind(0))
    scalars = (tau, float(grad_scale)) + _loss_scalars(cfg)
    if n == 0:
        return outputs
    variant = variant or choose_variant(n, vocab, device, logits.dtype)
    if variant == "split":
        blocks = triton.cdiv(vocab, SPLIT_BLOCK_V)
        partials = torch.empty((n, blocks, 3), dtype=torch.float32, device=device)
        counters = torch.zeros(n + 1, dtype=torch.int32, device=device)  # arrivals per row, then the ticket
        compiled = _policy_loss_split_kernel[(n * blocks,)](
            *head, partials, counters, counters[n:], rows_per_batch, vocab, blocks,
            stride_b, stride_t, grad_stride_b, grad_stride_t, *scalars, **switches,
            BLOCK_V=SPLIT_BLOCK_V, BLOCKS_POW2=triton.next_power_of_2(blocks), num_warps=SPLIT_NUM_WARPS,
            maxnreg=split_reg_budget(logits.dtype),
        )
        regs = getattr(compiled, "n_regs", None)
        if isinstance(regs, int) and regs > 0 and device.type == "cuda":
            # the most any loss configuration's compile reported: the residency check must hold for all
            key = (device.index if device.index is not None else torch.cuda.current_device(), logits.dtype)
            _SPLIT_REGS[key] = max(regs, _SPLIT_REGS.get(key, 0))
    else:
        block = block_v(vocab)
        _policy_loss_row_kernel[(n,)](
            *head, rows_per_batch, vocab, stride_b, stride_t, grad_stride_b, grad_stride_t, *scalars, **switches,
            BLOCK_V=block, num_warps=num_warps_for(block),
        )
    return outputs


def launch_fused_forward(logits, out, targets, mask, advantages, old_logps, ref_logps, is_weights, temperature,
                         cfg, num_tokens, num_sequences, grad_scale):
    """The op's forward launcher (token-level ratios): writes dL/dz for the upstream gradient
    ``grad_scale`` into ``out`` (``logits`` itself for in place) and returns (logp [N], entropy [N], out)."""
    check_kernel_dtype(logits, "policy_loss_from_logits")
    outputs = fused_policy_loss_forward(logits, out, targets, mask, advantages, old_logps, ref_logps, is_weights,
                                        temperature, cfg, num_tokens, num_sequences, grad_scale)
    return outputs[5], outputs[4], out


def rescale_grad_(grad, ratio) -> None:
    """grad *= ratio ([1] fp32 on the device), row by row; rows leave at once when the ratio is exactly
    1, so the usual case costs a scalar load per row and no host sync."""
    rows_per_batch, grad_stride_b, grad_stride_t = row_layout(grad)
    n = grad.numel() // grad.shape[-1] if grad.shape[-1] else 0
    block = block_v(grad.shape[-1])
    if n:
        _rescale_grad_kernel[(n,)](grad, ratio, rows_per_batch, grad.shape[-1], grad_stride_b, grad_stride_t,
                                   BLOCK_V=block, num_warps=num_warps_for(block))
