"""Pieces shared by the logits ops: row addressing, the online-softmax update with entropy, the
closed-form dL/dz of one block of a row, and the host-side launch heuristics.

Every kernel walks flattened rows r in [0, N) of a [B, T, V] (or [N, V]) logits tensor that may be a
strided view (``logits[:, :-1]``): row r sits at ``(r // T) * stride_b + (r % T) * stride_t``, computed
in int64 because ``row * stride`` overflows int32 beyond 2^31 elements. The vocabulary stride is 1
(checked at the public boundary).

Row sweeps are peeled. A row of V = 50257 bf16 values starts at any 2-byte offset, so a
plain ``row_ptr + arange`` sweep compiles to scalar loads and stores. Each sweep splits the row into
a head (the < VEC elements before the row's first 16-byte boundary, VEC = 16 bytes / element size), a
body of whole 16-byte vectors that starts on that boundary (``tl.multiple_of`` on its pointer: 128-bit
predicated accesses) and a tail of < VEC elements. Head and tail go together through one small masked
"edge" tile. The head is computed in the kernel from the row's address, so any base pointer and any
row stride are handled; the host only decides what the kernel cannot know per row: whether a gradient
buffer's rows share the logits rows' 16-byte phase (``same_row_phase``), so that the body's stores
are aligned too.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

# Read once at import, like triton's own @jit: the kernels of this package are interpreted (CPU
# tensors) exactly when this is set before they are decorated.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest vocabulary block one program holds at a time. 4096 fp32 values are 16 registers per thread
# at 8 warps; the interpreter also runs faster with fewer, larger blocks.
MAX_BLOCK_V = 4096

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

VECTOR_BYTES = 16  # the widest global access (ld/st.global.v4.b32)
VEC_BYTES = tl.constexpr(VECTOR_BYTES)  # the same, readable inside @triton.jit code


@constexpr_function  # also read at compile time, by the tile shape below
def num_warps_for(block: int) -> int:
    return 8 if block >= 2048 else 4


# How the statistics sweep sees a body tile of BLOCK_V values: [ROWS, LANES, TILE_VEC] in memory order,
# one thread per lane holding one TILE_VEC-wide (16-byte) vector in each tile row, regrouped as
# [LANES, ROWS * TILE_VEC] (a permutation of the registers a thread already holds), so that the
# reduction over axis 1 stays inside the thread and the running (m, l, s) are [LANES] vectors, one
# value per thread. LANES = the launch's threads (the rule of ``num_warps_for``). Blocks below
# 2 VEC^2 values (V < 128 in 16-bit) use TILE_VEC = 1, so that LANES >= 2 VEC - 2 or LANES >= V: the
# edge tile (head and tail, see ``row_peel``) then fits in the lanes and seeds them.
@constexpr_function
def tile_vec(block, elem_bits):
    vec = 128 // elem_bits  # one 16-byte vector
    return vec if block >= 2 * vec * vec else 1


@constexpr_function
def tile_lanes(block, elem_bits):
    return min(32 * num_warps_for(block), block // tile_vec(block, elem_bits))


@constexpr_function
def tile_rows(block, elem_bits):
    return block // (tile_lanes(block, elem_bits) * tile_vec(block, elem_bits))


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def row_offset(row, rows_per_batch, stride_b, stride_t):
    """Element offset of flattened row ``row`` (int64) in a [B, T, V] view with strides (b, t, 1)."""
    return (row // rows_per_batch) * stride_b + (row % rows_per_batch) * stride_t


@triton.jit
def softmax_stats_update(x, m_i, l_i, s_i, AXIS: tl.constexpr):
    """Folds scaled logits x into running (max, sum, entropy) states, reducing over AXIS: a 1-D block
    into a row's scalar state (AXIS = 0), or a [R, W] tile into [R] states (AXIS = 1: the lanes of a
    peeled sweep, ``row_partials``, or the token rows of the lean hidden forward).

    m_i: running max; l_i = sum exp(x - m_i); s_i = sum exp(x - m_i) (x - m_i). Keeping s_i relative
    to the running max (instead of sum p x) avoids the cancellation of lse - E[x] when |x| ~ 1e4.
    Entries holding -inf (out of range, or a banned token) contribute nothing; a NaN makes l NaN.
    With one lane per thread (AXIS = 1 in ``row_partials``) every reduction stays in registers: no
    shuffle and no barrier in the sweep; ``merge_stats`` joins the lanes once, after it.
    """
    m_new = tl.maximum(m_i, tl.max(x, AXIS))
    # A prefix of -inf entries leaves m at -inf: shift by 0 then, so that no inf - inf appears.
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    prev_shift = tl.where(l_i > 0, m_i - m_safe, 0.0)  # no -inf * 0 on the first block
    shifted = x - tl.expand_dims(m_safe, AXIS)
    e = tl.exp(shifted)
    shifted = tl.where(e > 0, shifted, 0.0)  # e == 0 adds 0, not 0 * -inf
    # finite logits of both signs near the fp32 maximum overflow m_i - m_safe to -inf: alpha = 0 then
    # drops the old state, which must not become 0 * -inf
    s_i = tl.where(alpha > 0, alpha * (s_i + prev_shift * l_i), 0.0) + tl.sum(e * shifted, AXIS)
    l_i = alpha * l_i + tl.sum(e, AXIS)
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
def merge_stats(m_p, l_p, s_p, AXIS: tl.constexpr):
    """(m_i, l_i, s_i) from partial states, reducing over AXIS: the blocks of a row in ``split``, the
    lanes of a peeled sweep (AXIS = 0), or the vocabulary slices of [rows, slices] partials in the
    lean hidden forward (AXIS = 1).

    Partials with l == 0 (only -inf seen) add nothing; a NaN partial makes the row NaN (the test is
    l == 0, not l > 0, which would drop it).
    """
    m_i = tl.max(m_p, AXIS)
    m_safe = tl.where(m_i == -float("inf"), 0.0, m_i)
    empty = l_p == 0
    # an empty partial's m is -inf: keep it out of the products
    shift = tl.where(empty, 0.0, m_p - tl.expand_dims(m_safe, AXIS))
    scale = tl.where(empty, 0.0, tl.exp(shift))
    l_i = tl.sum(l_p * scale, AXIS)
    # scale == 0 also where the shift overflowed to -inf (finite partial maxima of both signs near the
    # fp32 maximum): such a partial adds 0, never 0 * -inf
    s_i = tl.sum(tl.where(scale > 0, scale * (s_p + shift * l_p), 0.0), AXIS)
    return m_i, l_i, s_i


@triton.jit
def row_peel(row_ptr, V, EDGE: tl.constexpr):
    """(head, body_len, edge offsets, edge mask) of a row: the peeled sweep's three parts.

    head: the elements before the row's first 16-byte boundary (at most V); the address must be a
    multiple of the element size (``check_element_aligned``). body_len: whole 16-byte vectors from
    there, a multiple of VEC the compiler sees, so the body's mask is constant over each vector.
    The edge tile of EDGE >= 2 VEC - 2 lanes packs the head [0, head) and the tail
    [head + body_len, V): lane j reads j, or j + body_len once past the head. Nothing is read twice
    and nothing is skipped.
    """
    ELEM_BYTES: tl.constexpr = row_ptr.dtype.element_ty.primitive_bitwidth // 8
    VEC: tl.constexpr = VEC_BYTES // ELEM_BYTES
    misalign = (row_ptr.to(tl.int64) % VEC_BYTES).to(tl.int32)
    head = tl.minimum(((VEC_BYTES - misalign) % VEC_BYTES) // ELEM_BYTES, V)
    body_len = (V - head) // VEC * VEC
    lane = tl.arange(0, EDGE)
    edge = tl.where(lane < head, lane, lane + body_len)
    return head, body_len, edge, edge < V


@triton.jit
def row_partials(row_ptr, V, inv_tau, BLOCK_V: tl.constexpr):
    """One sweep over a row (or a vocabulary shard of it): the online-softmax state (m_i, l_i, s_i)
    of z / tau, see ``softmax_stats_update``.

    Peeled (module doc): the edge tile seeds the lanes, one element per lane (m = x, l = 1 unless
    x = -inf, s = 0; a NaN or +inf element makes the row NaN in the merge, as the block-wide update
    does); the aligned body is folded per lane (``softmax_stats_update`` over axis 1); the lanes merge once. The
    edge needs LANES >= 2 VEC - 2 lanes, or LANES >= V: ``tile_vec`` sees to it.
    """
    ELEM_BITS: tl.constexpr = row_ptr.dtype.element_ty.primitive_bitwidth
    ROWS: tl.constexpr = tile_rows(BLOCK_V, ELEM_BITS)
    LANES: tl.constexpr = tile_lanes(BLOCK_V, ELEM_BITS)
    TILE_VEC: tl.constexpr = tile_vec(BLOCK_V, ELEM_BITS)
    head, body_len, edge, edge_mask = row_peel(row_ptr, V, LANES)
    m_i = tl.load(row_ptr + edge, mask=edge_mask, other=-float("inf")).to(tl.float32) * inv_tau
    l_i = tl.where(m_i == -float("inf"), 0.0, 1.0)
    s_i = tl.zeros([LANES], dtype=tl.float32)
    body_ptr = tl.multiple_of(row_ptr + head, VEC_BYTES)
    for start in range(0, body_len, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(body_ptr + offs, mask=offs < body_len, other=-float("inf")).to(tl.float32) * inv_tau
        x = tl.reshape(tl.permute(tl.reshape(x, [ROWS, LANES, TILE_VEC]), (1, 0, 2)), [LANES, ROWS * TILE_VEC])
        m_i, l_i, s_i = softmax_stats_update(x, m_i, l_i, s_i, 1)
    return merge_stats(m_i, l_i, s_i, 0)


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
                   HAS_ENTROPY_GRAD: tl.constexpr, GRAD_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr):
    """One sweep: reads the row again and writes its dL/dz (``grad_row_ptr`` may be ``row_ptr``).

    Peeled on the logits row. GRAD_ALIGNED: the gradient row has the same 16-byte phase (the host's
    ``same_row_phase``), so the body's loads and stores are both 128-bit; otherwise both are scalar.
    Each element is read before it is written, and by the same program, so in place is safe.
    """
    VEC: tl.constexpr = VEC_BYTES * 8 // row_ptr.dtype.element_ty.primitive_bitwidth
    head, body_len, edge, edge_mask = row_peel(row_ptr, V, 2 * VEC)
    x_edge = tl.load(row_ptr + edge, mask=edge_mask, other=-float("inf")).to(tl.float32) * inv_tau
    dz_edge = logit_grad_block(x_edge, edge, target, m_i, log_l, entropy, g_logp, g_entropy, g_target, inv_tau,
                               HAS_ENTROPY_GRAD)
    tl.store(grad_row_ptr + edge, dz_edge.to(grad_row_ptr.dtype.element_ty), mask=edge_mask)
    body_ptr = row_ptr + head
    grad_body_ptr = grad_row_ptr + head
    if GRAD_ALIGNED:
        # both sides or neither: a 128-bit load feeding scalar stores is regrouped through shared memory
        body_ptr = tl.multiple_of(body_ptr, VEC_BYTES)
        grad_body_ptr = tl.multiple_of(grad_body_ptr, VEC_BYTES)
    for start in range(0, body_len, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_body = offs < body_len
        x = tl.load(body_ptr + offs, mask=in_body, other=-float("inf")).to(tl.float32) * inv_tau
        # vocabulary ids head + offs (comparing offs with target - head instead costs ~15 registers)
        dz = logit_grad_block(x, head + offs, target, m_i, log_l, entropy, g_logp, g_entropy, g_target, inv_tau,
                              HAS_ENTROPY_GRAD)
        tl.store(grad_body_ptr + offs, dz.to(grad_row_ptr.dtype.element_ty), mask=in_body)


@triton.jit
def write_zero_row(grad_row_ptr, V, BLOCK_V: tl.constexpr):
    """The exact-zero gradient of a masked row, written without reading the logits (peeled on the
    gradient row itself)."""
    VEC: tl.constexpr = VEC_BYTES * 8 // grad_row_ptr.dtype.element_ty.primitive_bitwidth
    head, body_len, edge, edge_mask = row_peel(grad_row_ptr, V, 2 * VEC)
    tl.store(grad_row_ptr + edge, tl.zeros([2 * VEC], dtype=grad_row_ptr.dtype.element_ty), mask=edge_mask)
    body_ptr = tl.multiple_of(grad_row_ptr + head, VEC_BYTES)
    for start in range(0, body_len, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(body_ptr + offs, tl.zeros([BLOCK_V], dtype=grad_row_ptr.dtype.element_ty), mask=offs < body_len)


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


def check_element_aligned(x: torch.Tensor, name: str) -> None:
    """The peeled sweeps find a row's head from its address: it must be a multiple of the element
    size (torch allocations always are; a foreign pointer may not be, and would fault on a GPU)."""
    if x.numel() and x.data_ptr() % x.element_size():
        raise ValueError(f"{name}: data pointer {x.data_ptr():#x} is not a multiple of its element size "
                         f"({x.element_size()} bytes); copy it (.clone()) first")


def same_row_phase(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether every row of y starts at the same offset modulo 16 bytes as the same row of x (same
    dtype, rows as in ``row_layout``): then one peel aligns the body of both."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if (y.data_ptr() - x.data_ptr()) % VECTOR_BYTES:
        return False
    es = x.element_size()
    return all((sx - sy) * es % VECTOR_BYTES == 0
               for size, sx, sy in zip(x.shape[:-1], x.stride()[:-1], y.stride()[:-1]) if size > 1)


def empty_grad_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped and typed as ``x`` whose rows have the 16-byte phase of x's rows
    (``same_row_phase``), so that a sweep reading x and writing it is aligned on both sides.

    Contiguous (as ``torch.empty``) when x is; otherwise each leading stride is the least one not below
    the dense stride with x's stride's residue, which pads a row by fewer than 16 bytes.
    """
    es = x.element_size()
    vec = VECTOR_BYTES // es
    strides = [1]
    for dim in range(x.dim() - 2, -1, -1):
        dense = x.shape[dim + 1] * strides[0]
        strides.insert(0, dense + (x.stride(dim) - dense) % vec)
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, strides)) if x.numel() else 0
    flat = torch.empty(span + vec, dtype=x.dtype, device=x.device)
    offset = (x.data_ptr() // es - flat.data_ptr() // es) % vec
    return flat.as_strided(tuple(x.shape), tuple(strides), flat.storage_offset() + offset)


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
