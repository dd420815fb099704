"""policy_loss_from_hidden: the GRPO-family loss head from hidden states and the lm_head, two modes.

- ``fast`` (token-level ratios): 3 GEMMs, no logits recompute. Row chunks of the micro-batch are
  streamed: logits of the chunk by cuBLAS (GEMM 1), then two row kernels on the chunk buffer (log-prob,
  entropy and split lse; then, given the per-token loss coefficients, dL/dz written over the chunk),
  then dX = dz W (GEMM 2) and dW += dz^T h (GEMM 3, fp32 accumulator). The gradient is computed in
  forward for the declared upstream ``grad_scale``; backward only rescales (docs/design.md, Kernel designs). The chunk loop and
  the coefficients are ``torch_backend.fast_policy_loss_from_hidden``: only the row step is Triton here.
- ``lean``: no chunk-sized buffer: the op runs ``linear_token_logprobs`` (log-probs and entropy with
  the logits on chip; backward recomputes them tile by tile, CCE-style, 4 GEMMs, exact gradients) and
  the loss on those [B, T] values. Sequence-level ratios (GSPO) always take this path: a token's
  coefficient needs its whole sequence first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import torch as torch_backend
from ..torch import _common as torch_common
from ._common import bad_target_nan, row_partials, target_logit, write_row_grad, write_zero_row
from .linear_token_logprobs import check_dtype

# vocabulary lanes one program holds per step of a row sweep
ROW_BLOCK_V = 4096


@triton.jit
def _chunk_row_stats_kernel(
    # data pointers
    logits_ptr,  # [R, V] chunk of logits (contiguous)
    targets_ptr,  # [R] int64
    tau_ptr,  # [R] fp32 (only if PER_ROW_TAU)
    logp_ptr, entropy_ptr, m_ptr, log_l_ptr,  # [R] fp32 outputs
    # shapes
    V,
    # scalars
    tau,
    # switches
    PER_ROW_TAU: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * V
    inv_tau = 1.0 / (tl.load(tau_ptr + row) if PER_ROW_TAU else tau)
    target = tl.load(targets_ptr + row)
    # the shared online-softmax sweep: -inf lanes (a -inf bias, a banned token) add exactly 0, also
    # when a whole block starts with them (no -inf - (-inf), no 0 * -inf)
    m_i, l_i, s_i = row_partials(row_ptr, V, inv_tau, BLOCK_V)
    x_target = target_logit(row_ptr, target, V) * inv_tau  # NaN for a target outside [0, V)
    log_l = tl.log(l_i)
    tl.store(logp_ptr + row, (x_target - m_i) - log_l)
    tl.store(entropy_ptr + row, log_l - s_i / l_i)
    tl.store(m_ptr + row, m_i)
    tl.store(log_l_ptr + row, log_l)


@triton.jit
def _chunk_row_grad_kernel(
    # data pointers
    logits_ptr,  # [R, V] chunk of logits, overwritten with dL/dz in its own dtype
    targets_ptr,  # [R] int64
    tau_ptr,  # [R] fp32 (only if PER_ROW_TAU)
    m_ptr, log_l_ptr, entropy_ptr,  # [R] fp32 from the stats kernel
    g_logp_ptr, g_entropy_ptr,  # [R] fp32 dL/dl and dL/dH (grad_scale included), 0 on masked tokens
    # shapes
    V,
    # scalars
    tau,
    # switches
    PER_ROW_TAU: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * V
    g_logp = tl.load(g_logp_ptr + row)
    live = g_logp != 0.0
    g_entropy = 0.0
    if HAS_ENTROPY_GRAD:
        g_entropy = tl.load(g_entropy_ptr + row)
        live = live | (g_entropy != 0.0)
    target = tl.load(targets_ptr + row)
    live = live | (target < 0) | (target >= V)  # a kept bad target (masked ones are 0): a NaN row below
    if not live:  # a masked token: write zeros, read nothing
        write_zero_row(row_ptr, V, BLOCK_V)
    else:
        inv_tau = 1.0 / (tl.load(tau_ptr + row) if PER_ROW_TAU else tau)
        g_logp += bad_target_nan(target, V)  # a kept target outside [0, V): a NaN gradient row
        # the shared peeled sweep (in place: the gradient row is the logits row, so its phase is the
        # same and the body's loads and stores are 128-bit at any V)
        write_row_grad(row_ptr, row_ptr, V, target, tl.load(m_ptr + row), tl.load(log_l_ptr + row),
                       tl.load(entropy_ptr + row), g_logp, g_entropy, g_logp, inv_tau, HAS_ENTROPY_GRAD,
                       True, BLOCK_V)


def _tau_args(tau, rows: int, device):
    """(scalar tau, [rows] fp32 tau or None) from the torch backend's float or [rows, 1] chunk of temperatures."""
    if torch.is_tensor(tau):
        return 1.0, tau.reshape(rows).to(device, torch.float32).contiguous()
    return float(tau), None


def triton_chunk_step(z, targets, tau, coef_fn):
    """The fast mode's per-row step (the seam of ``torch_backend.fast_policy_loss_from_hidden``) on a chunk
    of logits z [r, V]: two row kernels around the torch coefficients; dL/dz overwrites z."""
    z = z.contiguous()
    rows, vocab = z.shape
    device = z.device
    stats = torch.empty((4, rows), dtype=torch.float32, device=device)
    logp, entropy, m_i, log_l = stats.unbind(0)
    tau_scalar, tau_rows = _tau_args(tau, rows, device)
    t = targets.contiguous()
    block_v = min(triton.next_power_of_2(vocab), ROW_BLOCK_V)
    warps = 8 if block_v >= 2048 else 4
    if rows:
        _chunk_row_stats_kernel[(rows,)](
            z, t, tau_rows if tau_rows is not None else logp, logp, entropy, m_i, log_l, vocab, tau_scalar,
            PER_ROW_TAU=tau_rows is not None, BLOCK_V=block_v, num_warps=warps)
    g_logp, g_entropy = coef_fn(logp, entropy)
    g_logp = g_logp.to(torch.float32).contiguous()
    g_entropy = None if g_entropy is None else g_entropy.to(torch.float32).contiguous()
    if rows:
        _chunk_row_grad_kernel[(rows,)](
            z, t, tau_rows if tau_rows is not None else logp, m_i, log_l, entropy, g_logp,
            g_entropy if g_entropy is not None else g_logp, vocab, tau_scalar,
            PER_ROW_TAU=tau_rows is not None, HAS_ENTROPY_GRAD=g_entropy is not None, BLOCK_V=block_v,
            num_warps=warps)
    return z, logp, entropy


def fast_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: ``torch_common.CHUNK_BYTES`` of logits in the weight dtype (the only chunk buffer:
    dz overwrites it), at least 128 rows so that the GEMMs stay efficient."""
    return max(128, torch_common.CHUNK_BYTES // max(1, vocab * torch.finfo(dtype).bits // 8))


def launch_fast_forward(hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, is_weights,
                        temperature, cfg, num_tokens, num_sequences, grad_scale, needs, chunk_rows=None):
    """The op's fast-mode launcher: ``torch_backend.fast_hidden_loss_forward`` with this backend's
    per-row step. ``chunk_rows`` overrides the rows per chunk (tests put chunk boundaries inside
    sequences)."""
    check_dtype(hidden, "hidden", "policy_loss_from_hidden")
    rows = chunk_rows or fast_chunk_rows(weight.shape[0], weight.dtype)
    return torch_backend.fast_hidden_loss_forward(
        hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, is_weights, temperature, cfg,
        num_tokens, num_sequences, grad_scale, needs, chunk_step=triton_chunk_step, rows=rows)
