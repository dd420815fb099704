"""Element offsets past 2^31 in every Triton kernel family, cheaply, under the interpreter.

A strided view over one large, mostly untouched storage puts rows (or lm_head rows) more than 2^31
elements apart while the tensors stay tiny: only the touched pages are ever allocated. Each result is
compared bitwise with the same op on a compact copy (same kernel, same values: any wrapped offset
reads other memory, or crashes). The logits sweeps are peeled at each row's first 16-byte boundary,
so the order of their sums depends on where a row starts modulo 16 bytes: the compact copy of the
logits keeps every row's phase (``empty_grad_like``), which keeps the comparison bitwise.

First, the premise: the interpreter wraps int32 arithmetic as the GPU does, so an int32 offset
product that overflows on a GPU also overflows here, and these tests catch it on CPU.
"""
from triton_interp import DEVICE  # noqa: I001  (sets TRITON_INTERPRET first)

import importlib

import pytest
import torch
import triton
import triton.language as tl
import backend_calls as calls  # noqa: E402

pl = importlib.import_module("lens_kernels.backends.triton.policy_loss")
tlp = importlib.import_module("lens_kernels.backends.triton.token_logprobs")
common = importlib.import_module("lens_kernels.backends.triton._common")
lin = importlib.import_module("lens_kernels.backends.triton.linear_token_logprobs")

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the GPU variant is tests/gpu/test_triton_gpu.py")

# the first offset that an int32 product gets wrong
TWO_31 = 2 ** 31


@triton.jit
def _i32_product_kernel(out_ptr, a, b):
    offs = tl.arange(0, 4) + a  # int32 (a < 2^31)
    tl.store(out_ptr + tl.arange(0, 4), offs * b)


def test_interpreter_wraps_int32_like_the_gpu():
    out = torch.zeros(4, dtype=torch.int64)
    _i32_product_kernel[(1,)](out, 2 ** 20, 2 ** 12)
    # 2^20 * 2^12 = 2^32 wraps to 0 in int32, as in PTX mul.lo.s32
    assert out.tolist() == [0, 4096, 8192, 12288]


def _sparse_rows(rows, width, row_stride, dtype, seed):
    """A [rows, width] view whose rows sit ``row_stride`` elements apart in one large lazy storage."""
    assert (rows - 1) * row_stride + width > TWO_31
    storage = torch.empty((rows - 1) * row_stride + width, dtype=dtype)
    view = storage.as_strided((rows, width), (row_stride, 1))
    g = torch.Generator().manual_seed(seed)
    view.copy_(torch.randn(rows, width, generator=g) * 2.0)
    return view


def test_logits_rows_past_2_31_elements():
    """token_logprobs forward and backward, and the fused policy loss, with rows 2^28 apart: the
    row offset (row * stride_t, stride_t an int32 argument) passes 2^31 from row 8 on."""
    T, V = 10, 70
    view = _sparse_rows(T, V, 2 ** 28, torch.bfloat16, seed=31)
    logits = view.unsqueeze(0)  # [1, T, V], stride_t = 2^28
    # rows 72 apart with the same 16-byte phases (.clone() of a strided tensor would not keep them)
    def dense_copy():
        return common.empty_grad_like(logits).copy_(logits)

    dense = dense_copy()
    assert dense.stride(1) < 2 ** 20 and common.same_row_phase(logits, dense)
    g = torch.Generator().manual_seed(32)
    targets = torch.randint(0, V, (1, T), generator=g)
    mask = torch.ones(1, T, dtype=torch.bool)
    mask[0, 3] = False

    got = [x.requires_grad_(True) for x in (logits.detach(), dense_copy())]
    outs = [calls.token_logprobs("triton", x, targets, mask, 1.0, True) for x in got]
    for (lp, ent), x in zip(outs, got):
        (lp.sum() + 0.1 * ent.sum()).backward()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(got[0].grad, got[1].grad)

    adv = torch.randn(1, generator=g)
    zs = [logits.detach().requires_grad_(True), dense_copy().requires_grad_(True)]
    losses = [calls.policy_loss_from_logits("triton", z, targets, mask, adv)[0] for z in zs]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(zs[0].grad, zs[1].grad)


def test_lm_head_rows_past_2_31_elements():
    """The hidden path's lm_head rows 2^26 apart (48 rows: offsets up to 3.2e9): offs_v * stride_wv in
    the logits tile must be int64 (it was int32, wrapping once V * H >= 2^31)."""
    N, V, H = 6, 48, 16
    # fp16: the interpreter's bf16 tl.dot is broken (see test_triton_hidden.py)
    weight = _sparse_rows(V, H, 2 ** 26, torch.float16, seed=33)
    dense = weight.contiguous()
    g = torch.Generator().manual_seed(34)
    hidden = (torch.randn(N, H, generator=g)).to(torch.float16)
    targets = torch.randint(0, V, (N,), generator=g)
    results = []
    for w in (weight.detach().requires_grad_(True), dense.detach().clone().requires_grad_(True)):
        h = hidden.clone().requires_grad_(True)
        lp, ent = calls.linear_token_logprobs("triton", h, w, targets, return_entropy=True)
        (lp.sum() + 0.1 * ent.sum()).backward()
        results.append((lp.detach(), ent.detach(), h.grad, w.grad))
    for a, b, name in zip(results[0], results[1], ("logp", "entropy", "dX", "dW")):
        assert torch.equal(a, b), f"{name} differs between the strided lm_head and its contiguous copy"
    # and the values are right (not two equally wrong results)
    logp_ref = torch.log_softmax(hidden.double() @ dense.double().T, -1).gather(-1, targets[:, None])[:, 0]
    assert (results[0][0].double() - logp_ref).abs().max() < 1e-3 * logp_ref.abs().max()
