"""token_logprobs and linear_token_logprobs (torch backend) against the float64 reference."""
import pytest
import torch

from tolerances import assert_grad_close

import lens_kernels as lk
from lens_kernels import reference as ref
from lens_kernels.backends.torch import _common as torch_common

# max |error| of log-probs and entropy per logits dtype (fp32 math on rounded inputs; the
# reference sees the same rounded inputs, so only the fp32 accumulation error remains)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
# dL/dlogits comes back in the logits dtype: one rounding (tests/tolerances.py) on top of the fp32 error


def _inputs(B, T, V, dtype, seed, scale=3.0, strided=False):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * scale
    logits = full.to(dtype)
    logits = logits[:, :-1] if strided else logits[:, :-1].contiguous()
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0] = False  # a fully masked row
    targets[~mask] = -100  # padding ids under the mask are fine
    return logits, targets, mask


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many row chunks (and chunk boundaries inside sequences)."""
    monkeypatch.setattr(torch_common, "CHUNK_BYTES", 4096)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 37, 1000, 4099])
@pytest.mark.parametrize("strided", [False, True])
def test_token_logprobs_matches_reference(dtype, V, strided, small_chunks):
    logits, targets, mask = _inputs(3, 7, V, dtype, seed=V, strided=strided)
    logps, entropy = lk.token_logprobs(logits, targets, mask=mask, return_entropy=True, backend="torch")
    exp_l, exp_h = ref.token_logprobs(logits, targets, mask=mask)
    assert logps.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (logps <= 0).all() and torch.isfinite(logps).all()
    torch.testing.assert_close(logps.double(), exp_l, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(entropy.double(), exp_h, atol=TOL[dtype] * 10, rtol=0)
    assert torch.all(logps[~mask] == 0) and torch.all(entropy[~mask] == 0)


@pytest.mark.parametrize("V", [151936, 128256])
def test_real_vocab_sizes(V):
    logits, targets, mask = _inputs(1, 3, V, torch.bfloat16, seed=1)
    logps, entropy = lk.token_logprobs(logits, targets, mask=mask, return_entropy=True)
    exp_l, exp_h = ref.token_logprobs(logits, targets, mask=mask)
    torch.testing.assert_close(logps.double(), exp_l, atol=1e-4, rtol=0)
    torch.testing.assert_close(entropy.double(), exp_h, atol=1e-3, rtol=0)


def test_long_sequence():
    logits, targets, mask = _inputs(1, 8192, 64, torch.float32, seed=2)
    logps, _ = lk.token_logprobs(logits, targets, mask=mask)
    torch.testing.assert_close(logps.double(), ref.token_logprobs(logits, targets, mask=mask)[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("per_row", [False, True])
def test_temperature(per_row):
    logits, targets, mask = _inputs(2, 5, 53, torch.float32, seed=3)
    tau = torch.rand(2, 5, dtype=torch.float64) + 0.5 if per_row else 0.7
    logps, entropy = lk.token_logprobs(logits, targets, mask=mask, temperature=tau, return_entropy=True)
    exp_l, exp_h = ref.token_logprobs(logits, targets, tau, mask=mask)
    torch.testing.assert_close(logps.double(), exp_l, atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), exp_h, atol=1e-4, rtol=0)


def test_large_logits_stay_finite():
    logits, targets, mask = _inputs(2, 4, 300, torch.float32, seed=4, scale=1e4)
    logps, entropy = lk.token_logprobs(logits, targets, mask=mask, return_entropy=True)
    assert torch.isfinite(logps).all() and torch.isfinite(entropy).all() and (logps <= 0).all()
    torch.testing.assert_close(logps.double(), ref.token_logprobs(logits, targets, mask=mask)[0], atol=1e-3, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_token_logprobs_gradient(dtype, strided, inplace, small_chunks):
    V = 301
    logits, targets, mask = _inputs(3, 6, V, dtype, seed=5, strided=strided)
    g = torch.Generator().manual_seed(6)
    w_l = torch.randn(3, 6, generator=g, dtype=torch.float64)
    w_h = torch.randn(3, 6, generator=g, dtype=torch.float64)

    ref_logits = logits.detach().double().requires_grad_()
    exp_l, exp_h = ref.token_logprobs(ref_logits, targets, 0.9, mask=mask)
    ((exp_l * w_l).sum() + (exp_h * w_h).sum()).backward()

    x = logits.detach().clone().requires_grad_() if not inplace else logits.detach().clone()
    leaf = x if not inplace else x.requires_grad_()
    inp = leaf * 1 if inplace else leaf  # inplace needs a non-leaf buffer the op may overwrite
    logps, entropy = lk.token_logprobs(inp, targets, mask=mask, temperature=0.9, return_entropy=True,
                                       inplace=inplace)
    ((logps.double() * w_l).sum() + (entropy.double() * w_h).sum()).backward()
    assert_grad_close(leaf.grad, ref_logits.grad, dtype, "dL/dlogits")
    assert torch.all(leaf.grad[~mask] == 0)  # masked tokens: exact-zero gradient rows


def test_gradcheck_token_logprobs_with_entropy():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    tau = torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.5

    def f(x):
        logps, entropy = lk.token_logprobs(x, targets, mask=mask, temperature=tau, return_entropy=True)
        return logps, entropy

    assert torch.autograd.gradcheck(f, (logits,))


def test_caller_logits_untouched_without_inplace():
    logits, targets, mask = _inputs(2, 3, 50, torch.float32, seed=9)
    logits.requires_grad_()
    before = logits.detach().clone()
    logps, entropy = lk.token_logprobs(logits, targets, mask=mask, return_entropy=True)
    (logps.sum() + entropy.sum()).backward()
    assert torch.equal(logits.detach(), before)


def test_two_dimensional_rows():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(9, 33, generator=g)
    targets = torch.randint(0, 33, (9,), generator=g)
    logps, _ = lk.token_logprobs(logits, targets)
    assert logps.shape == (9,)
    torch.testing.assert_close(logps.double(), ref.token_logprobs(logits, targets)[0], atol=2e-5, rtol=0)


# ---------------------------------------------------------------- linear_token_logprobs
def _hidden_inputs(B, T, H, V, dtype, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g, dtype=torch.float64)).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[-1] = False
    return hidden, weight, b, targets, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("V", [97, 1001])
def test_linear_token_logprobs_forward_and_grads(dtype, bias, V, small_chunks):
    hidden, weight, b, targets, mask = _hidden_inputs(2, 5, 16, V, dtype, seed=V + bias, bias=bias)
    tensors = [hidden, weight] + ([b] if bias else [])
    ours = [t.detach().clone().requires_grad_() for t in tensors]
    theirs = [t.detach().double().requires_grad_() for t in tensors]
    logps, entropy = lk.linear_token_logprobs(ours[0], ours[1], targets, bias=ours[2] if bias else None,
                                              mask=mask, temperature=0.8, return_entropy=True)
    exp_l, exp_h = ref.linear_token_logprobs(theirs[0], theirs[1], targets, theirs[2] if bias else None, 0.8, mask)
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    torch.testing.assert_close(logps.double(), exp_l, atol=tol, rtol=0)
    torch.testing.assert_close(entropy.double(), exp_h, atol=tol * 10, rtol=0)
    g = torch.Generator().manual_seed(11)
    w_l, w_h = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    ((logps.double() * w_l).sum() + (entropy.double() * w_h).sum()).backward()
    ((exp_l * w_l).sum() + (exp_h * w_h).sum()).backward()
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a.grad.double(), e.grad, atol=tol * 10, rtol=tol * 10)


def test_linear_frozen_weight_gets_no_grad():
    hidden, weight, _, targets, mask = _hidden_inputs(2, 3, 8, 40, torch.float32, seed=12)
    hidden.requires_grad_()
    logps, _ = lk.linear_token_logprobs(hidden, weight, targets, mask=mask)
    logps.sum().backward()
    assert weight.grad is None and hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_gradcheck_linear_token_logprobs():
    hidden, weight, b, targets, mask = _hidden_inputs(2, 3, 4, 9, torch.float64, seed=13, bias=True)
    for t in (hidden, weight, b):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w, bb: lk.linear_token_logprobs(h, w, targets, bias=bb, mask=mask, return_entropy=True),
        (hidden, weight, b))


def test_linear_bf16_close_to_fp32_eager():
    hidden, weight, _, targets, mask = _hidden_inputs(2, 4, 32, 257, torch.bfloat16, seed=14)
    logps, _ = lk.linear_token_logprobs(hidden, weight, targets, mask=mask)
    expected = ref.token_logprobs(torch.nn.functional.linear(hidden, weight), targets, mask=mask)[0]
    torch.testing.assert_close(logps.double(), expected, atol=1e-4, rtol=0)
