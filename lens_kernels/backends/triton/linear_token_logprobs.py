"""linear_token_logprobs: token log-probs and entropy from hidden states [N, H] and an lm_head [V, H],
with the logits computed tile by tile on chip (``tl.dot``) and never written to memory.

Forward: one program per block of BLOCK_N rows sweeps the vocabulary in BLOCK_V tiles; each tile
of logits is a K-loop of ``tl.dot`` over H, folded at once into an online softmax (``m_i``, ``l_i``
and the entropy accumulator ``s_i``) and the target gather. Outputs are fp32 [N] (log-prob,
entropy, and the split lse (m_i, log l_i) that backward needs), plus optional per-sequence sums.
Memory is O(N) beyond the inputs.

Backward (CCE-style, exact: no gradient filtering): a 2-D grid of (row block, vocab tile) programs
recomputes its logits tile, forms dL/dz on chip, and adds dz W into an fp32 dX and dz^T h into an
fp32 dW slab with atomics. The vocabulary is walked in slabs so that the fp32 dW buffer is one slab,
not [V, H]. Row blocks whose tokens are all masked are skipped: they cost no FLOPs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import torch as torch_backend

# fp32 rows of dW accumulated at once in backward: 16384 x H=4096 x 4 B = 256 MiB
DW_SLAB_ROWS = 16384


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
def _linear_logprobs_fwd_kernel(
    # data pointers
    hidden_ptr,  # [N, H] hidden states, stride 1 along H
    weight_ptr,  # [V, H] lm_head weight, stride 1 along H
    bias_ptr,  # [V] (read only if HAS_BIAS)
    targets_ptr,  # [N] int64 target ids (0 under the mask)
    keep_ptr,  # [N] int8, 1 = token in the loss
    tau_ptr,  # [N] fp32 per-row temperature (read only if PER_ROW_TAU)
    logp_ptr, entropy_ptr, m_ptr, log_l_ptr,  # [N] fp32 outputs; lse = m + log_l
    seq_sum_ptr,  # [N // rows_per_seq] fp32, zeroed, sums of kept log-probs (only if SEQ_SUM)
    # shapes
    N, V, H, rows_per_seq,
    # strides (elements)
    stride_hn, stride_wv,
    # scalars
    tau,
    # switches
    HAS_BIAS: tl.constexpr, PER_ROW_TAU: tl.constexpr, SEQ_SUM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = offs_n < N
    keep = (tl.load(keep_ptr + offs_n, mask=row_in, other=0) != 0) & row_in
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    if tl.max(keep.to(tl.int32), 0) == 0:  # every token of the block masked: no FLOPs
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
        m_i = zero - float("inf")
        l_i = zero
        s_i = zero  # sum_v exp(x_v - m_i) (x_v - m_i): the entropy without the lse - E[x] cancellation
        x_target = zero
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_in = offs_v < V
            x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, row_in, v_in, H, stride_hn,
                             stride_wv, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION) * inv_tau[:, None]
            x = tl.where(v_in[None, :], x, -float("inf"))
            x_target += tl.sum(tl.where(offs_v[None, :] == target[:, None], x, 0.0), 1)
            # a -inf bias (banned tokens) can make a whole tile of a row -inf: shift by 0 then, so that
            # no -inf - (-inf) appears, and let lanes with e == 0 add 0, not 0 * -inf, to s_i
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            shift = tl.where(l_i > 0, m_i - m_safe, 0.0)  # no -inf * 0 on the first tile
            e = tl.exp(x - m_safe[:, None])
            s_i = alpha * (s_i + shift * l_i) + tl.sum(tl.where(e > 0, e * (x - m_safe[:, None]), 0.0), 1)
            l_i = alpha * l_i + tl.sum(e, 1)
            m_i = m_new
        log_l = tl.log(l_i)
        # a kept target outside [0, V) (e.g. -100) matched no lane: its log-prob is NaN (README)
        x_target = tl.where((target >= 0) & (target < V), x_target, float("nan"))
        logp = tl.where(keep, (x_target - m_i) - log_l, 0.0)
        entropy = tl.where(keep, log_l - s_i / l_i, 0.0)
        tl.store(logp_ptr + offs_n, logp, mask=row_in)
        tl.store(entropy_ptr + offs_n, entropy, mask=row_in)
        tl.store(m_ptr + offs_n, m_i, mask=row_in)
        tl.store(log_l_ptr + offs_n, log_l, mask=row_in)
        if SEQ_SUM:
            tl.atomic_add(seq_sum_ptr + offs_n // rows_per_seq, logp, mask=keep, sem="relaxed")


@triton.jit
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
    # strides (elements)
    stride_hn, stride_wv,
    # scalars
    tau,
    # switches
    HAS_BIAS: tl.constexpr, PER_ROW_TAU: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = v_start + tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
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


def tile_config(device: torch.device, dtype: torch.dtype):
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages, dot precision). One fixed config per device
    kind: the interpreter cannot autotune over several, and its dots are slow, so it gets the
    smallest tiles tl.dot accepts."""
    precision = "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact products, not TF32
    if device.type != "cuda":
        return 16, 32, 16, 4, 1, precision
    return 64, 128, 64, 8, 3, precision


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


def linear_logprobs_forward(h, weight, bias, t, keep8, tau, tau_rows, rows_per_seq=None):
    """Launches the forward kernel; returns fp32 [N] (logp, entropy, m, log_l) and the [N / rows_per_seq]
    sums of kept log-probs (or None)."""
    n, width = h.shape
    vocab = weight.shape[0]
    out = torch.empty((4, n), dtype=torch.float32, device=h.device)
    logp, entropy, m_i, log_l = out.unbind(0)
    seq_sums = None if rows_per_seq is None else torch.zeros(n // rows_per_seq, dtype=torch.float32,
                                                             device=h.device)
    if n == 0:
        return logp, entropy, m_i, log_l, seq_sums
    block_n, block_v, block_h, warps, stages, precision = tile_config(h.device, h.dtype)
    _linear_logprobs_fwd_kernel[(triton.cdiv(n, block_n),)](
        h, weight, bias if bias is not None else h, t, keep8, tau_rows if tau_rows is not None else logp,
        logp, entropy, m_i, log_l, seq_sums if seq_sums is not None else logp,
        n, vocab, width, rows_per_seq or 1,
        h.stride(0), weight.stride(0),
        tau,
        HAS_BIAS=bias is not None, PER_ROW_TAU=tau_rows is not None, SEQ_SUM=seq_sums is not None,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, DOT_PRECISION=precision,
        num_warps=warps, num_stages=stages,
    )
    return logp, entropy, m_i, log_l, seq_sums


def linear_logprobs_backward(h, weight, bias, t, tau, tau_rows, m_i, log_l, entropy, g_logp, g_entropy,
                             need_h, need_w, need_b):
    """(dX in h's dtype, dW in weight's dtype, dbias) of the recompute backward, each None if not wanted."""
    n, width = h.shape
    vocab = weight.shape[0]
    block_n, block_v, block_h, warps, stages, precision = tile_config(h.device, h.dtype)
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
            _linear_logprobs_bwd_kernel[(triton.cdiv(n, block_n), triton.cdiv(v_stop - v_start, block_v))](
                h, weight, bias if bias is not None else h, t, tau_rows if tau_rows is not None else m_i,
                m_i, log_l, entropy, g_logp, g_entropy if g_entropy is not None else g_logp,
                d_hidden if need_h else m_i, dw_slab if need_w else m_i, d_bias if need_b else m_i,
                n, width, v_start, v_stop, vocab,
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
# autograd
# ---------------------------------------------------------------------------------------------
class TritonLinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, temperature):
        h, w, b, t, keep8, tau, tau_rows = row_inputs(hidden, weight, bias, targets, mask, temperature)
        logp, entropy, m_i, log_l, _ = linear_logprobs_forward(h, w, b, t, keep8, tau, tau_rows)
        ctx.save_for_backward(h, w, b, t, keep8, tau_rows, m_i, log_l, entropy)
        ctx.tau = tau
        ctx.hidden_shape = hidden.shape
        ctx.set_materialize_grads(False)
        lead = targets.shape
        return logp.view(lead), entropy.view(lead)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        h, w, b, t, keep8, tau_rows, m_i, log_l, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (g_logp is None and g_entropy is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None
        keep = keep8 != 0
        zero = torch.zeros((), dtype=torch.float32, device=keep.device)
        # where, not * keep: a NaN upstream gradient at a masked token must not become NaN * 0
        g_l = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device) if g_logp is None else \
            torch.where(keep, g_logp.reshape(-1).float(), zero)
        g_h = None if g_entropy is None else torch.where(keep, g_entropy.reshape(-1).float(), zero).contiguous()
        d_hidden, d_weight, d_bias = linear_logprobs_backward(
            h, w, b, t, ctx.tau, tau_rows, m_i, log_l, entropy, g_l.contiguous(), g_h, need_h, need_w, need_b)
        d_hidden = None if d_hidden is None else d_hidden.view(ctx.hidden_shape)
        return d_hidden, d_weight, d_bias, None, None, None


def linear_token_logprobs(hidden, weight, targets, bias=None, mask=None, temperature=1.0, return_entropy=False):
    """log p(target) [B, T] (or [N]) fp32 and the entropy from hidden states and the lm_head, never
    writing [N, V]; differentiable w.r.t. hidden, weight and bias (same signature as the torch backend)."""
    check_dtype(hidden, "hidden", "linear_token_logprobs")
    logp, entropy = TritonLinearTokenLogprobsFunction.apply(hidden, weight, bias, targets, mask, temperature)
    return logp, (entropy if return_entropy else None)


def linear_token_logprobs_with_sequence_sums(hidden, weight, targets, bias=None, mask=None, temperature=1.0):
    """Forward only (old/ref log-probs, LENS confidence): (logp [B, T], entropy [B, T], sums [B]) fp32,
    the sums of the kept log-probs of each sequence accumulated in the same launch."""
    check_dtype(hidden, "hidden", "linear_token_logprobs")
    if targets.dim() != 2:
        raise ValueError(f"targets must be [B, T] for per-sequence sums, got shape {list(targets.shape)}")
    with torch.no_grad():
        h, w, b, t, keep8, tau, tau_rows = row_inputs(hidden, weight, bias, targets, mask, temperature)
        logp, entropy, _, _, sums = linear_logprobs_forward(h, w, b, t, keep8, tau, tau_rows,
                                                            rows_per_seq=targets.shape[1])
    return logp.view(targets.shape), entropy.view(targets.shape), sums
