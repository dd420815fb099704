"""The triton backend's token_logprobs (forward log-probs + entropy, and its backward) against the
float64 reference, under the Triton interpreter on CPU (or natively on a GPU)."""
from triton_interp import DEVICE, assert_close_scaled  # noqa: I001  (sets TRITON_INTERPRET first)

import importlib

import pytest
import torch

import lens_kernels as lk
from lens_kernels import reference
from lens_kernels.backends.triton import _common
import backend_calls as calls  # noqa: E402

# the package re-exports the function under the module's name: fetch the module itself
tlp = importlib.import_module("lens_kernels.backends.triton.token_logprobs")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# dL/dz is stored in the logits dtype: its rounding sets the tolerance of the gradient
GRAD_REL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
VALUE_ATOL = 2e-5  # logp / entropy are fp32 from the same input values as the reference


def _inputs(B, T, V, dtype, seed, scale=3.0, pad=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(B, T + pad, V, generator=g) * scale).to(dtype).to(DEVICE)
    targets = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(DEVICE)
    mask[0] = False  # a fully masked sequence
    targets = torch.where(mask, targets, torch.full_like(targets, -100))  # padding ids under the mask
    return base, targets, mask


def _reference_with_grad(logits, targets, mask, temperature, g_logp, g_entropy):
    z = logits.detach().double().requires_grad_(True)
    tau = temperature.double() if torch.is_tensor(temperature) else temperature
    logp, entropy = reference.token_logprobs(z, targets, tau, mask)
    loss = (logp * g_logp.double()).sum() + (0 if g_entropy is None else (entropy * g_entropy.double()).sum())
    loss.backward()
    return logp, entropy, z.grad


CASES = [  # (temperature kind, entropy gradient, mask)
    ("one", True, True),
    ("scalar", False, True),
    ("per_row", True, True),
    ("per_seq", True, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [37, 1000, 4099])
@pytest.mark.parametrize("temp_kind,entropy_grad,use_mask", CASES)
def test_forward_and_backward_match_reference(dtype, V, temp_kind, entropy_grad, use_mask):
    B, T = 3, 4
    logits, targets, mask = _inputs(B, T, V, dtype, seed=V + len(temp_kind))
    if not use_mask:
        targets = targets.clamp(min=0)
    mask = mask if use_mask else None
    temperature = {"one": 1.0, "scalar": 0.7,
                   "per_row": (torch.rand(B, T) + 0.5).to(DEVICE),
                   "per_seq": (torch.rand(B, 1) + 0.5).to(DEVICE)}[temp_kind]
    g_logp = torch.randn(B, T).to(DEVICE)
    g_entropy = torch.randn(B, T).to(DEVICE) if entropy_grad else None

    z = logits.clone().requires_grad_(True)
    logp, entropy = lk.token_logprobs(z, targets, temperature=temperature, mask=mask, return_entropy=True,
                                      backend="triton")
    assert logp.dtype == entropy.dtype == torch.float32
    assert (logp <= 0).all()
    loss = (logp * g_logp).sum() + (0 if g_entropy is None else (entropy * g_entropy).sum())
    loss.backward()

    ref_logp, ref_entropy, ref_grad = _reference_with_grad(logits, targets, mask, temperature, g_logp, g_entropy)
    assert_close_scaled(logp, ref_logp, VALUE_ATOL / 10, "logp")
    assert_close_scaled(entropy, ref_entropy, VALUE_ATOL, "entropy")
    assert_close_scaled(z.grad, ref_grad, GRAD_REL[dtype], "dL/dz")
    if mask is not None:
        assert (z.grad[~mask] == 0).all(), "masked rows must get an exact-zero gradient"
        assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_view_inplace_backward(dtype):
    """logits[:, :-1] is read without a copy; inplace writes dL/dz into exactly that view."""
    B, T, V = 2, 5, 1001
    base, targets, mask = _inputs(B, T, V, dtype, seed=7, pad=1)
    last_column = base[:, -1].clone()
    ref_logits = base[:, :-1].clone()
    base.requires_grad_(True)
    view = base[:, :-1]
    assert not view.is_contiguous()
    logp, entropy = lk.token_logprobs(view, targets, mask=mask, return_entropy=True, inplace=True,
                                      backend="triton")
    g_logp, g_entropy = torch.randn(B, T).to(DEVICE), torch.randn(B, T).to(DEVICE)
    ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
    _, _, ref_grad = _reference_with_grad(ref_logits, targets, mask, 1.0, g_logp, g_entropy)
    assert_close_scaled(base.detach()[:, :-1], ref_grad, GRAD_REL[dtype], "in-place dL/dz")
    assert_close_scaled(base.grad[:, :-1], ref_grad, GRAD_REL[dtype], "returned dL/dz")
    assert (base.grad[:, -1] == 0).all()
    assert torch.equal(base.detach()[:, -1], last_column), "inplace must not touch memory outside the view"


def test_backward_overwrites_poisoned_buffer():
    """The backward kernel writes every element of the gradient, zeros for masked rows."""
    B, T, V = 2, 3, 517
    logits, targets, mask = _inputs(B, T, V, torch.float32, seed=3)
    logp, entropy, lse, row_inputs = tlp.token_logprobs_forward(logits, targets, mask, 1.0)
    grad = torch.full_like(logits, float("nan"))
    g = torch.randn(B * T).to(DEVICE)
    tlp.token_logprobs_backward(logits, grad, row_inputs, lse, entropy, g, g.clone())
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()


def test_small_blocks_cross_many_block_boundaries(monkeypatch):
    """Force BLOCK_V = 64 so a row of 1000 spans 16 blocks with a ragged tail."""
    monkeypatch.setattr(_common, "MAX_BLOCK_V", 64)
    logits, targets, mask = _inputs(2, 3, 1000, torch.float32, seed=11)
    z = logits.clone().requires_grad_(True)
    logp, entropy = lk.token_logprobs(z, targets, mask=mask, return_entropy=True, backend="triton")
    (logp.sum() + entropy.sum()).backward()
    ones = torch.ones(2, 3).to(DEVICE)
    ref_logp, ref_entropy, ref_grad = _reference_with_grad(logits, targets, mask, 1.0, ones, ones)
    assert_close_scaled(logp, ref_logp, 2e-6, "logp")
    assert_close_scaled(entropy, ref_entropy, 2e-5, "entropy")
    assert_close_scaled(z.grad, ref_grad, 2e-5, "dL/dz")


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_huge_logits_stay_finite_and_exact(scale):
    g = torch.Generator().manual_seed(5)
    logits = (torch.rand(2, 3, 301, generator=g) * scale).to(DEVICE)
    targets = torch.randint(0, 301, (2, 3), generator=g).to(DEVICE)
    z = logits.clone().requires_grad_(True)
    logp, entropy = lk.token_logprobs(z, targets, return_entropy=True, backend="triton")
    (logp.sum() + entropy.sum()).backward()
    ones = torch.ones(2, 3).to(DEVICE)
    ref_logp, ref_entropy, ref_grad = _reference_with_grad(logits, targets, None, 1.0, ones, ones)
    assert (logp <= 0).all()
    assert_close_scaled(logp, ref_logp, 1e-6, "logp")
    assert torch.isfinite(entropy).all() and (entropy - ref_entropy).abs().max() < 1e-3
    assert_close_scaled(z.grad, ref_grad, 1e-4, "dL/dz")


def test_bad_inputs_raise_clear_errors():
    logits, targets, mask = _inputs(2, 3, 50, torch.float32, seed=1)
    with pytest.raises(ValueError, match="stride 1 along the vocabulary"):
        lk.token_logprobs(logits.transpose(1, 2).contiguous().transpose(1, 2), targets, mask=mask, backend="triton")
    with pytest.raises(RuntimeError, match="float64"):
        lk.token_logprobs(logits.double(), targets, mask=mask, backend="triton")
    with pytest.raises(TypeError, match="fp32/bf16/fp16"):
        calls.token_logprobs("triton", logits.double(), targets, mask)
    with pytest.raises(ValueError, match="targets must have shape"):
        lk.token_logprobs(logits, targets[:, :2], mask=mask, backend="triton")


def test_auto_dispatch_serves_fp64_with_torch():
    logits, targets, mask = _inputs(2, 3, 50, torch.float64, seed=1)
    assert lk.backend_for("token_logprobs", logits) == "torch"  # triton serves no fp64, on any device
    assert lk.backend_for("token_logprobs", logits.float()) == ("torch" if DEVICE == "cpu" else "triton")
    logp, _ = lk.token_logprobs(logits, targets, mask=mask)  # auto: works for fp64
    assert logp.dtype == torch.float64
