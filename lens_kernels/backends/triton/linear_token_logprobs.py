"""linear_token_logprobs: token log-probs and entropy from hidden states [N, H] and an lm_head [V, H],
with the logits computed tile by tile on chip (``tl.dot``) and never written to memory.

Forward: a 2-D grid of (block of BLOCK_N rows, vocabulary slice) programs; each sweeps its slice in
BLOCK_V tiles, each tile of logits a K-loop of ``tl.dot`` over H folded at once into an online
softmax (``m_i``, ``l_i`` and the entropy accumulator ``s_i``) and the target gather. With one slice
(the row blocks fill the GPU) a program writes the fp32 [N] outputs (log-prob, entropy, and the
split lse (m_i, log l_i) that backward needs) itself; with several, it writes its slice's partials to
a small fp32 workspace and a one-pass merge kernel combines them.
Memory is O(N x slices) beyond the inputs.

Backward (CCE-style, exact: no gradient filtering): (row block, vocabulary tile) programs, in a
grouped order that keeps a group's dX rows in L2, recompute their logits tile, form dL/dz on chip,
and add dz W into an fp32 dX and dz^T h into an fp32 dW slab with relaxed atomics. The vocabulary is
walked in slabs so that the fp32 dW buffer is one slab, not [V, H]. Row blocks whose tokens are all
masked are skipped: they cost no FLOPs.

fp32 operands follow torch's fp32 matmul setting (TF32 tensor cores or exact CUDA-core products),
decided on the host per call and kept from forward to backward.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import torch as torch_backend
from ._common import merge_stats, softmax_stats_update

# fp32 rows of dW accumulated at once in backward: 16384 x H=4096 x 4 B = 256 MiB
DW_SLAB_ROWS = 16384
# L2 bytes one group of the backward's tile order keeps resident (dX fp32 + hidden rows); H200 L2: 60 MiB
BWD_GROUP_BYTES = 16 << 20


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, row_in, v_in, H, stride_hn, stride_wv,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """[BLOCK_N, BLOCK_V] fp32 tile of h W^T (+ b): a K-loop of tensor-core dots over H.

    Row offsets are int64: ``offs_v * stride_wv`` passes 2^31 once V * H does (H >= 14,135 at
    V = 151936), and an int32 product wraps (on the GPU and in the interpreter alike).
    """
    offs_n = offs_n.to(tl.int64)
    offs_v = offs_v.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        k_in = offs_k < H
        a = tl.load(hidden_ptr + offs_n[:, None] * stride_hn + offs_k[None, :],
                    mask=row_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(weight_ptr + offs_v[:, None] * stride_wv + offs_k[None, :],
                    mask=v_in[:, None] & k_in[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=v_in, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _finish_rows(offs_n, row_in, keep, target, m_i, l_i, s_i, x_target, V,
                 logp_ptr, entropy_ptr, m_ptr, log_l_ptr):
    """Writes a block of rows from their merged state: masked rows get exact zeros (whatever garbage
    their hidden states held), a kept target outside [0, V) (e.g. -100) a NaN log-prob (README)."""
    log_l = tl.log(l_i)
    x_target = tl.where((target >= 0) & (target < V), x_target, float("nan"))
    logp = tl.where(keep, (x_target - m_i) - log_l, 0.0)
    tl.store(logp_ptr + offs_n, logp, mask=row_in)
    tl.store(entropy_ptr + offs_n, tl.where(keep, log_l - s_i / l_i, 0.0), mask=row_in)
    tl.store(m_ptr + offs_n, tl.where(keep, m_i, 0.0), mask=row_in)
    tl.store(log_l_ptr + offs_n, tl.where(keep, log_l, 0.0), mask=row_in)


@triton.jit
def _linear_logprobs_fwd_kernel(
    # data pointers
    hidden_ptr,  # [N, H] hidden states, stride 1 along H
    weight_ptr,  # [V, H] lm_head weight, stride 1 along H
    bias_ptr,  # [V] (read only if HAS_BIAS)
    targets_ptr,  # [N] int64 target ids (0 under the mask)
    keep_ptr,  # [N] int8, 1 = token in the loss
    tau_ptr,  # [N] fp32 per-row temperature (read only if PER_ROW_TAU)
    logp_ptr, entropy_ptr, m_ptr, log_l_ptr,  # [N] fp32 outputs; lse = m + log_l (only if not SPLIT)
    partial_ptr,  # [4, splits, N] fp32: (m, l, s, x_target) of each vocabulary slice (only if SPLIT)
    # shapes: program (i, j) covers rows [i BLOCK_N, (i + 1) BLOCK_N) and vocabulary [j slice_v, (j + 1) slice_v)
    N, V, H, slice_v,
    # strides (elements)
    stride_hn, stride_wv,
    # scalars
    tau,
    # switches
    HAS_BIAS: tl.constexpr, PER_ROW_TAU: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = offs_n < N
    keep = (tl.load(keep_ptr + offs_n, mask=row_in, other=0) != 0) & row_in
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    if tl.max(keep.to(tl.int32), 0) == 0:  # every token of the block masked: no FLOPs
        if not SPLIT:  # (split: the merge writes the zeros without reading this block's partials)
            tl.store(logp_ptr + offs_n, zero, mask=row_in)
            tl.store(entropy_ptr + offs_n, zero, mask=row_in)
            tl.store(m_ptr + offs_n, zero, mask=row_in)
            tl.store(log_l_ptr + offs_n, zero, mask=row_in)
    else:
        if PER_ROW_TAU:
            inv_tau = 1.0 / tl.load(tau_ptr + offs_n, mask=row_in, other=1.0)
        else:
            inv_tau = zero + 1.0 / tau
        target = tl.load(targets_ptr + offs_n, mask=row_in, other=0)
        v_begin = tl.program_id(1).to(tl.int64) * slice_v
        v_end = tl.minimum(v_begin + slice_v, V)  # the last slices may be partial or empty
        m_i = zero - float("inf")
        l_i = zero
        s_i = zero  # sum_v exp(x_v - m_i) (x_v - m_i): the entropy without the lse - E[x] cancellation
        x_target = zero
        for v0 in range(v_begin, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_in = offs_v < v_end
            x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, row_in, v_in, H, stride_hn,
                             stride_wv, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION) * inv_tau[:, None]
            x = tl.where(v_in[None, :], x, -float("inf"))
            x_target += tl.sum(tl.where(offs_v[None, :] == target[:, None], x, 0.0), 1)
            # a -inf bias (banned tokens) can make a whole tile of a row -inf: the shared update shifts
            # by 0 then (no -inf - (-inf)) and lets e == 0 add 0, not 0 * -inf, to s_i
            m_i, l_i, s_i = softmax_stats_update(x, m_i, l_i, s_i, 1)
        if SPLIT:
            # an empty slice, or one whose logits are all -inf, publishes (-inf, 0, 0, 0 or -inf): the
            # merge drops it by l == 0; a target outside the slice adds its x_target of 0
            slot = partial_ptr + tl.program_id(1).to(tl.int64) * N + offs_n
            plane = tl.num_programs(1).to(tl.int64) * N
            tl.store(slot, m_i, mask=row_in)
            tl.store(slot + plane, l_i, mask=row_in)
            tl.store(slot + 2 * plane, s_i, mask=row_in)
            tl.store(slot + 3 * plane, x_target, mask=row_in)
        else:
            _finish_rows(offs_n, row_in, keep, target, m_i, l_i, s_i, x_target, V,
                         logp_ptr, entropy_ptr, m_ptr, log_l_ptr)


# V only bounds the target check here: one compile for every V
@triton.jit(do_not_specialize=["V"])
def _linear_logprobs_merge_kernel(
    # data pointers
    partial_ptr,  # [4, splits, N] fp32 written by the split forward (rows of blocks with no kept token: unwritten)
    targets_ptr, keep_ptr,  # [N] as in forward
    logp_ptr, entropy_ptr, m_ptr, log_l_ptr,  # [N] fp32 outputs
    # shapes
    N, V, splits,
    # switches
    BLOCK_R: tl.constexpr, SPLITS_CHUNK: tl.constexpr,
):
    """One pass over the partials: each program walks the [BLOCK_R, splits] partials of its rows in
    chunks of SPLITS_CHUNK slices, each read once and folded into the rows' running state with the
    shared ``_common.merge_stats`` (over the chunk, then the chunk's state with the running one). The
    chunk bounds the registers whatever the split count (all 148 slices at once spilled). Partials
    with l == 0 (an empty slice, or only -inf logits) add nothing, a NaN partial makes its row NaN."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = offs_n < N
    keep = (tl.load(keep_ptr + offs_n, mask=row_in, other=0) != 0) & row_in
    target = tl.load(targets_ptr + offs_n, mask=row_in, other=0)
    plane = splits.to(tl.int64) * N
    m_i = tl.zeros([BLOCK_R], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    s_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    x_target = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s0 in range(0, splits, SPLITS_CHUNK):
        offs_s = s0 + tl.arange(0, SPLITS_CHUNK).to(tl.int64)
        live = keep[:, None] & (offs_s < splits)[None, :]  # masked rows are never read: they may be unwritten
        slot = partial_ptr + offs_s[None, :] * N + offs_n[:, None]
        m_c, l_c, s_c = merge_stats(tl.load(slot, mask=live, other=-float("inf")),
                                    tl.load(slot + plane, mask=live, other=0.0),
                                    tl.load(slot + 2 * plane, mask=live, other=0.0), 1)
        x_target += tl.sum(tl.load(slot + 3 * plane, mask=live, other=0.0), 1)
        # the running state starts empty (l == 0): the first chunk's state passes through unchanged
        m_i, l_i, s_i = merge_stats(tl.join(m_i, m_c), tl.join(l_i, l_c), tl.join(s_i, s_c), 1)
    _finish_rows(offs_n, row_in, keep, target, m_i, l_i, s_i, x_target, V,
                 logp_ptr, entropy_ptr, m_ptr, log_l_ptr)


@triton.jit(do_not_specialize=["V_TOTAL", "group_n"])  # one compile for every V and H
def _linear_logprobs_bwd_kernel(
    # data pointers
    hidden_ptr, weight_ptr, bias_ptr,  # as in forward
    targets_ptr,  # [N] int64
    tau_ptr,  # [N] fp32 (only if PER_ROW_TAU)
    m_ptr, log_l_ptr, entropy_ptr,  # [N] fp32 saved by forward
    g_logp_ptr, g_entropy_ptr,  # [N] fp32 upstream gradients, 0 on masked tokens
    d_hidden_ptr,  # [N, H] fp32, zeroed, atomically accumulated (only if WANT_DX)
    d_weight_ptr,  # [v_stop - v_start, H] fp32 slab, zeroed (only if WANT_DW)
    d_bias_ptr,  # [V] fp32, zeroed (only if WANT_DB)
    # shapes: this launch covers vocabulary rows [v_start, v_stop) of V_TOTAL
    N, H, v_start, v_stop, V_TOTAL,
    group_n,  # row blocks per group of the tile order (a runtime int: one compile for every H)
    # strides (elements)
    stride_hn, stride_wv,
    # scalars
    tau,
    # switches
    HAS_BIAS: tl.constexpr, PER_ROW_TAU: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grouped tile order: group_n consecutive programs take group_n row blocks of the same vocabulary
    # tile, and the group walks the vocabulary before the next group starts. One W tile is then read
    # from HBM once per group (not once per row block), and the group's hidden rows and, above all,
    # its fp32 dX rows (the target of the dX atomics) stay in L2 for the whole sweep instead of all of
    # dX (N H 4 B, 128 MiB at the headline, larger than L2) being re-streamed once per vocabulary tile.
    pid = tl.program_id(0).to(tl.int64)  # int64 from here: no int32 product of the shape arguments
    tiles_v = tl.cdiv(v_stop - v_start, BLOCK_V)
    first_n = (pid // tiles_v) // group_n * group_n  # the group's first row block
    group_rows = tl.minimum(tl.cdiv(N, BLOCK_N) - first_n, group_n)  # the last group may be short
    in_group = pid - first_n * tiles_v  # in [0, group_rows * tiles_v)
    pid_n = first_n + in_group % group_rows
    pid_v = in_group // group_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_in = offs_n < N
    v_in = offs_v < v_stop
    g_logp = tl.load(g_logp_ptr + offs_n, mask=row_in, other=0.0)
    if HAS_ENTROPY_GRAD:
        g_entropy = tl.load(g_entropy_ptr + offs_n, mask=row_in, other=0.0)
        live = (g_logp != 0.0) | (g_entropy != 0.0)
    else:
        g_entropy = g_logp * 0.0
        live = g_logp != 0.0
    target = tl.load(targets_ptr + offs_n, mask=row_in, other=0)
    bad_target = (target < 0) | (target >= V_TOTAL)  # kept (masked targets are 0): a NaN row, see below
    live = (live | bad_target) & row_in
    if tl.max(live.to(tl.int32), 0) != 0:  # a block of masked tokens has dz = 0: skip its 3 dots
        if PER_ROW_TAU:
            inv_tau = 1.0 / tl.load(tau_ptr + offs_n, mask=row_in, other=1.0)
        else:
            inv_tau = g_logp * 0.0 + 1.0 / tau
        x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, row_in, v_in, H, stride_hn, stride_wv,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION) * inv_tau[:, None]
        m_i = tl.load(m_ptr + offs_n, mask=row_in, other=0.0)
        log_l = tl.load(log_l_ptr + offs_n, mask=row_in, other=0.0)
        # a kept target outside [0, V) makes its whole row NaN (README); dead rows stay exactly 0 below
        g_logp = g_logp + tl.where(bad_target, float("nan"), 0.0)
        log_p = (x - m_i[:, None]) - log_l[:, None]
        p = tl.where(v_in[None, :], tl.exp(log_p), 0.0)
        coef = -g_logp[:, None] + tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        if HAS_ENTROPY_GRAD:
            entropy = tl.load(entropy_ptr + offs_n, mask=row_in, other=0.0)
            coef = coef - g_entropy[:, None] * tl.where(p > 0, log_p + entropy[:, None], 0.0)
        dz = (p * coef + tl.where(offs_v[None, :] == target[:, None], g_logp[:, None], 0.0)) * inv_tau[:, None]
        # rows that are not live (masked tokens: NaN or garbage hidden states, NaN statistics) give
        # exactly 0, and their hidden rows are never read into dW
        dz = tl.where(live[:, None] & v_in[None, :], dz, 0.0)
        if WANT_DB:
            tl.atomic_add(d_bias_ptr + offs_v, tl.sum(dz, 0), mask=v_in, sem="relaxed")
        dz_in = dz.to(hidden_ptr.dtype.element_ty)  # tensor-core operands in the input dtype
        # The atomics below are relaxed: the sums are read only after the kernel ends, so they need no
        # ordering with other memory operations (Triton's default acq_rel adds a fence to every one).
        for k0 in range(0, H, BLOCK_H):
            offs_k = k0 + tl.arange(0, BLOCK_H)
            k_in = offs_k < H
            if WANT_DX:
                w = tl.load(weight_ptr + offs_v[:, None] * stride_wv + offs_k[None, :],
                            mask=v_in[:, None] & k_in[None, :], other=0.0)
                dx = tl.dot(dz_in, w, input_precision=DOT_PRECISION)
                tl.atomic_add(d_hidden_ptr + offs_n[:, None] * H + offs_k[None, :], dx,
                              mask=row_in[:, None] & k_in[None, :], sem="relaxed")
            if WANT_DW:
                h = tl.load(hidden_ptr + offs_n[:, None] * stride_hn + offs_k[None, :],
                            mask=live[:, None] & k_in[None, :], other=0.0)
                dw = tl.dot(tl.trans(dz_in), h, input_precision=DOT_PRECISION)
                tl.atomic_add(d_weight_ptr + (offs_v - v_start)[:, None] * H + offs_k[None, :], dw,
                              mask=v_in[:, None] & k_in[None, :], sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The split forward aims at FWD_WAVES waves of programs, with slices of at least MIN_TILES_PER_SLICE
# vocabulary tiles so that a program's fixed costs (the row loads, the partials) stay small next to its
# dots. How many programs of the forward fit on an SM at once depends on the registers ptxas gave the
# compiled kernel, which differ by Triton version (bf16 at sm_90: 127-128 under 3.9, 152-160 under 3.6)
# and by variant (a bias adds some): the first launch on a device reports them
# (``note_fwd_launch``) and the heuristic uses that count from then on. Before any launch it assumes
# FWD_PROGRAMS_PER_SM programs per SM (2 waves of 2 programs: <= 128 registers x 256 threads and
# 72 KiB of shared memory at sm_90). Unmeasured: a GPU run should tune both.
FWD_WAVES = 2
FWD_PROGRAMS_PER_SM = 4
MIN_TILES_PER_SLICE = 8
_FWD_RESIDENT = {}  # (device index, BLOCK_N, BLOCK_V) -> fewest forward programs per SM any launch reported
# registers per thread the exact fp32 ("ieee") forward is compiled within (ptxas .maxnreg): 4 programs of
# 4 warps per SM. Without it, the ptxas of Triton 3.6 picked 96 registers and spilled at sm_80.
IEEE_FWD_MAX_REGS = 128
MAX_VOCAB_SPLITS = 256
# the merge reads [MERGE_BLOCK_R, <= MERGE_SPLITS_CHUNK] partials per step (registers bounded at any split count)
MERGE_BLOCK_R = 32
MERGE_SPLITS_CHUNK = 8


def fp32_dot_precision() -> str:
    """"tf32" when torch's own fp32 matmuls may use TF32, else "ieee": the lean kernels follow the
    caller's choice (``torch.backends.cuda.matmul.fp32_precision`` or the legacy ``allow_tf32`` /
    ``torch.set_float32_matmul_precision``), read on the host per call (a flag, no sync)."""
    matmul = torch.backends.cuda.matmul
    chosen = getattr(matmul, "fp32_precision", "none")  # torch >= 2.9; "none": follow the legacy flag
    if chosen in ("tf32", "ieee"):
        return chosen
    try:
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:  # torch refuses to read a flag set through both APIs: stay exact
        return "ieee"


def dot_precision(dtype: torch.dtype) -> str:
    """fp16/bf16 operands take the tensor cores as they are ("tf32" is ignored for them)."""
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"


def tile_config(device: torch.device, dtype: torch.dtype, precision: str):
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) of the forward: one fixed config per device kind
    and operand path. The interpreter cannot autotune over several, and its dots are slow, so it gets
    the smallest tiles tl.dot accepts. On a GPU, fp32 operands with exact ("ieee") products run on
    CUDA-core FMAs, whose operand fragments live in registers: a 32 x 64 tile, K steps of 16 and one
    stage keep ptxas from spilling (the 64 x 128 x 64, 3-stage config used 255 registers and spilled
    56 B at sm_90, 2.5 KB at sm_80). tests/test_triton_compile.py holds every variant to no spill."""
    if device.type != "cuda":
        return 16, 32, 16, 4, 1
    if dtype == torch.float32:
        return (32, 64, 16, 4, 1) if precision == "ieee" else (64, 128, 32, 8, 3)
    return 64, 128, 64, 8, 3


def backward_tile_config(device: torch.device, dtype: torch.dtype, precision: str):
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) of the backward. Its cost is the fp32 atomics:
    one per element of each program's dX [BLOCK_N, H] and dW [BLOCK_V, H] contributions, so
    N V H (1 / BLOCK_V + 1 / BLOCK_N) in all. A 128 x 128 tile sums twice as many rows into each dW
    atomic as the forward's 64 x 128 (K steps of 32 keep it within 255 registers without a spill);
    at the headline shape (N = 16384, V = 151936, H = 2048; N V H = 5.10e12) that is 7.97e10 fp32
    atomics instead of 1.19e11 (-33%), a model, unmeasured. fp32 keeps the forward's tiles (the
    128-row tile spills at sm_80 or fills its shared memory)."""
    if device.type != "cuda" or dtype == torch.float32:
        return tile_config(device, dtype, precision)
    return 128, 128, 32, 8, 3


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_per_sm(device: torch.device, regs_per_thread: int, shared_bytes: int, num_warps: int) -> int:
    """Programs of ``num_warps`` warps with these registers per thread and this shared memory that one SM
    of ``device`` holds at once (register file in 256-register warp units, shared memory, threads)."""
    props = torch.cuda.get_device_properties(device)
    regs_per_warp = -(-max(1, regs_per_thread) * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * num_warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0)
    by_smem = smem // shared_bytes if smem and shared_bytes else by_threads
    return max(1, min(by_regs, by_threads, by_smem))


def note_fwd_launch(compiled, device: torch.device, block_n: int, block_v: int, num_warps: int) -> None:
    """Keeps, per device and tile shape, the fewest programs per SM a compiled forward allows (the
    handle a GPU launch returns: registers from ptxas, shared memory from the compiler)."""
    regs = getattr(compiled, "n_regs", None)
    shared = getattr(getattr(compiled, "metadata", None), "shared", 0)
    if device.type != "cuda" or not isinstance(regs, int) or regs <= 0:
        return
    key = (device.index if device.index is not None else torch.cuda.current_device(), block_n, block_v)
    fits = programs_per_sm(device, regs, shared if isinstance(shared, int) else 0, num_warps)
    _FWD_RESIDENT[key] = min(fits, _FWD_RESIDENT.get(key, fits))


def vocab_splits_for(n_rows: int, vocab: int, device: torch.device, block_n: int, block_v: int) -> int:
    """Vocabulary slices per row block of the forward: 1 when the row blocks alone fill FWD_WAVES waves of
    the GPU (and on CPU tensors, which have no SMs to fill), else enough to about fill them; a wave is
    SMs x the programs per SM the compiled forward allows (``note_fwd_launch``; FWD_PROGRAMS_PER_SM / 2
    before any launch reported it). From shapes and the device's properties only (no sync)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    resident = _FWD_RESIDENT.get((index, block_n, block_v))
    per_sm = FWD_PROGRAMS_PER_SM if resident is None else FWD_WAVES * resident
    row_blocks = triton.cdiv(n_rows, block_n)
    wanted = per_sm * _sm_count(index)
    if row_blocks >= wanted:
        return 1
    return max(1, min(triton.cdiv(wanted, row_blocks), triton.cdiv(vocab, block_v) // MIN_TILES_PER_SLICE,
                      MAX_VOCAB_SPLITS))


def fwd_max_regs(precision: str):
    """The forward's register cap passed to ptxas (None: ptxas chooses)."""
    return IEEE_FWD_MAX_REGS if precision == "ieee" else None


def check_dtype(t: torch.Tensor, name: str, op: str) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the triton backend's {op} takes fp32/bf16/fp16 {name}, got "
                        f"{str(t.dtype).replace('torch.', '')}; use backend='torch' (or 'auto') for float64")


def row_inputs(hidden, weight, bias, targets, mask, temperature):
    """Contiguous rows [N, H], weight and bias with stride 1 along H, flat int64 targets (0 under the
    mask), int8 keep, and (scalar tau, [N] fp32 tau or None)."""
    width = weight.shape[1]
    h = hidden.reshape(-1, width)
    if h.stride(-1) != 1:
        h = h.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    n = h.shape[0]
    t, keep = torch_backend.flat_keep(targets, mask)
    keep8 = (torch.ones(n, dtype=torch.int8, device=h.device) if keep is None else keep.to(torch.int8)).contiguous()
    if torch.is_tensor(temperature):
        tau_rows = temperature.to(h.device, torch.float32).expand(targets.shape).reshape(n).contiguous()
        return h, weight, bias, t.contiguous(), keep8, 1.0, tau_rows
    return h, weight, bias, t.contiguous(), keep8, float(temperature), None


def check_vocab_splits(vocab_splits) -> int:
    if isinstance(vocab_splits, bool) or not isinstance(vocab_splits, int) or \
            not 1 <= vocab_splits <= MAX_VOCAB_SPLITS:
        raise ValueError(f"vocab_splits must be an int in [1, {MAX_VOCAB_SPLITS}] (or None for the heuristic), "
                         f"got {vocab_splits!r}")
    return vocab_splits


def linear_logprobs_forward(h, weight, bias, t, keep8, tau, tau_rows, vocab_splits=None, precision=None):
    """Launches the forward (and, with more than one vocabulary slice, the merge); returns fp32 [N]
    (logp, entropy, m, log_l).

    ``vocab_splits`` overrides ``vocab_splits_for`` (tests force several slices, also ones that leave
    the last slice partial or empty); ``precision`` overrides ``dot_precision`` (backward passes the
    forward's)."""
    n, width = h.shape
    vocab = weight.shape[0]
    out = torch.empty((4, n), dtype=torch.float32, device=h.device)
    logp, entropy, m_i, log_l = out.unbind(0)
    precision = precision or dot_precision(h.dtype)
    block_n, block_v, block_h, warps, stages = tile_config(h.device, h.dtype, precision)
    splits = vocab_splits_for(n, vocab, h.device, block_n, block_v) if vocab_splits is None else \
        check_vocab_splits(vocab_splits)
    if n == 0:
        return logp, entropy, m_i, log_l
    slice_v = triton.cdiv(triton.cdiv(vocab, block_v), splits) * block_v  # whole tiles per slice
    partials = torch.empty((4, splits, n), dtype=torch.float32, device=h.device) if splits > 1 else None
    compiled = _linear_logprobs_fwd_kernel[(triton.cdiv(n, block_n), splits)](
        h, weight, bias if bias is not None else h, t, keep8, tau_rows if tau_rows is not None else logp,
        logp, entropy, m_i, log_l, partials if partials is not None else logp,
        n, vocab, width, slice_v,
        h.stride(0), weight.stride(0),
        tau,
        HAS_BIAS=bias is not None, PER_ROW_TAU=tau_rows is not None, SPLIT=splits > 1,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, DOT_PRECISION=precision,
        num_warps=warps, num_stages=stages, maxnreg=fwd_max_regs(precision),
    )
    note_fwd_launch(compiled, h.device, block_n, block_v, warps)
    if splits > 1:
        _linear_logprobs_merge_kernel[(triton.cdiv(n, MERGE_BLOCK_R),)](
            partials, t, keep8, logp, entropy, m_i, log_l, n, vocab, splits, BLOCK_R=MERGE_BLOCK_R,
            SPLITS_CHUNK=min(triton.next_power_of_2(splits), MERGE_SPLITS_CHUNK),
            num_warps=4,
        )
    return logp, entropy, m_i, log_l


def group_rows_for(width: int, dtype: torch.dtype, block_n: int) -> int:
    """Row blocks per group of the backward's tile order: the largest power of two whose fp32 dX rows and
    hidden rows fit in BWD_GROUP_BYTES of L2 (8 at H = 2048 and 4 at H = 4096 for bf16 128-row blocks).

    L2 traffic model at the headline shape (bf16, N = 16384, V = 151936, H = 2048; unmeasured): the old
    order (row block fastest over all N) swept all of dX (128 MiB fp32) through the atomics once per
    vocabulary tile, ~1187 x 2 x 128 MiB = 3.2e11 B; grouped by 8 row blocks, dX stays in L2 and the
    fp32 dW slab is swept once per group instead, 16 groups x 2 x 1.24 GB = 4.0e10 B, plus W read
    once per group (16 x 0.62 GB = 1.0e10 B)."""
    per_block = block_n * width * (4 + dtype.itemsize)
    return max(1, min(64, 1 << max(0, (BWD_GROUP_BYTES // per_block).bit_length() - 1)))


def linear_logprobs_backward(h, weight, bias, t, tau, tau_rows, m_i, log_l, entropy, g_logp, g_entropy,
                             need_h, need_w, need_b, precision=None):
    """(dX in h's dtype, dW in weight's dtype, dbias) of the recompute backward, each None if not wanted."""
    n, width = h.shape
    vocab = weight.shape[0]
    precision = precision or dot_precision(h.dtype)
    block_n, block_v, block_h, warps, stages = backward_tile_config(h.device, h.dtype, precision)
    group_n = group_rows_for(width, h.dtype, block_n)
    need_b = need_b and bias is not None
    d_hidden = torch.zeros((n, width), dtype=torch.float32, device=h.device) if need_h else None
    d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=h.device) if need_w else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=h.device) if need_b else None
    slab = min(vocab, DW_SLAB_ROWS) if need_w else vocab
    dw_slab = torch.empty((slab, width), dtype=torch.float32, device=h.device) if need_w else None
    for v_start in range(0, vocab, slab):
        v_stop = min(vocab, v_start + slab)
        if need_w:
            dw_slab.zero_()
        if n:
            _linear_logprobs_bwd_kernel[(triton.cdiv(n, block_n) * triton.cdiv(v_stop - v_start, block_v),)](
                h, weight, bias if bias is not None else h, t, tau_rows if tau_rows is not None else m_i,
                m_i, log_l, entropy, g_logp, g_entropy if g_entropy is not None else g_logp,
                d_hidden if need_h else m_i, dw_slab if need_w else m_i, d_bias if need_b else m_i,
                n, width, v_start, v_stop, vocab, group_n,
                h.stride(0), weight.stride(0),
                tau,
                HAS_BIAS=bias is not None, PER_ROW_TAU=tau_rows is not None, HAS_ENTROPY_GRAD=g_entropy is not None,
                WANT_DX=need_h, WANT_DW=need_w, WANT_DB=need_b,
                BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, DOT_PRECISION=precision,
                num_warps=warps, num_stages=stages,
            )
        if need_w:
            d_weight[v_start:v_stop].copy_(dw_slab[: v_stop - v_start])
    return (None if d_hidden is None else d_hidden.to(h.dtype), d_weight,
            None if d_bias is None else d_bias.to(bias.dtype))


# ---------------------------------------------------------------------------------------------
# The op's launchers
# ---------------------------------------------------------------------------------------------
def launch_variant(hidden) -> str:
    """The dot precision, decided on the host when forward runs and kept for backward, which
    recomputes the logits as forward computed them."""
    return dot_precision(hidden.dtype)


def launch_forward(hidden, weight, bias, targets, mask, temperature, variant, vocab_splits=None):
    """(logp [N] fp32, entropy [N] fp32, stats [2, N] fp32: m_i and log l_i for backward)."""
    check_dtype(hidden, "hidden", "linear_token_logprobs")
    if vocab_splits is not None:
        check_vocab_splits(vocab_splits)
    h, w, b, t, keep8, tau, tau_rows = row_inputs(hidden, weight, bias, targets, mask, temperature)
    logp, entropy, m_i, log_l = linear_logprobs_forward(h, w, b, t, keep8, tau, tau_rows,
                                                        vocab_splits=vocab_splits, precision=variant or None)
    return logp, entropy, torch.stack((m_i, log_l))


def launch_backward(hidden, weight, bias, targets, mask, temperature, stats, entropy, g_logp, g_entropy, needs,
                    variant):
    """(d_hidden, d_weight, d_bias), each None if not in ``needs``, for flat upstream gradients."""
    h, w, b, t, keep8, tau, tau_rows = row_inputs(hidden, weight, bias, targets, mask, temperature)
    keep = keep8 != 0
    zero = torch.zeros((), dtype=torch.float32, device=keep.device)
    # where, not * keep: a NaN upstream gradient at a masked token must not become NaN * 0
    g_l = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device) if g_logp is None else \
        torch.where(keep, g_logp.reshape(-1).float(), zero)
    g_h = None if g_entropy is None else torch.where(keep, g_entropy.reshape(-1).float(), zero).contiguous()
    m_i, log_l = stats.unbind(0)
    need_h, need_w, need_b = needs
    d_hidden, d_weight, d_bias = linear_logprobs_backward(
        h, w, b, t, tau, tau_rows, m_i, log_l, entropy, g_l.contiguous(), g_h, need_h, need_w, need_b,
        variant or None)
    return (None if d_hidden is None else d_hidden.view(hidden.shape)), d_weight, d_bias

