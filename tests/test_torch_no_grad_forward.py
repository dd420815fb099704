"""The torch backend's forward when no gradient follows (a rollout's old-log-prob pass, evaluation): the
kept rows only, gathered first when some are masked, in their own row math. Against the float64
reference on fresh random inputs and on special values, beside the autograd path's forward."""
import pytest
import torch

import lens_kernels as lk
from lens_kernels import reference as ref
from lens_kernels.backends.torch import _common as torch_common

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5}


@pytest.fixture(params=["one chunk", "small chunks"])
def chunks(request, monkeypatch):
    if request.param == "small chunks":  # chunk edges inside sequences and between kept rows
        monkeypatch.setattr(torch_common, "NO_GRAD_CHUNK_BYTES", 4096)


def _logits(B, T, V, dtype, seed, layout):
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    logits = {"slice": full[:, :-1], "contiguous": full[:, :-1].contiguous(),
              "rows": full.reshape(-1, V)[: B * T][::1], "row-strided": full.reshape(-1, V)[::2]}[layout]
    lead = logits.shape[:-1]
    targets = torch.randint(0, V, lead, generator=g)
    mask = torch.rand(lead, generator=g) < 0.7
    mask.view(-1)[:2] = False
    targets[~mask] = -100
    return logits, targets, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["slice", "contiguous", "rows", "row-strided"])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("tau", [1.0, 0.7, "per-token"])
def test_token_logprobs_without_grad_matches_reference(dtype, layout, masked, tau, chunks):
    logits, targets, mask = _logits(3, 9, 211, dtype, seed=5, layout=layout)
    if not masked:
        mask, targets = None, targets.clamp(min=0)
    temperature = torch.rand(targets.shape, dtype=torch.float64) + 0.5 if tau == "per-token" else tau
    before = logits.clone()
    with torch.no_grad():
        logps, entropy = lk.token_logprobs(logits, targets, mask=mask, temperature=temperature,
                                           return_entropy=True, backend="torch")
        only, none = lk.token_logprobs(logits, targets, mask=mask, temperature=temperature, backend="torch")
    exp_l, exp_h = ref.token_logprobs(logits, targets, temperature, mask=mask)
    torch.testing.assert_close(logps.double(), exp_l, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(entropy.double(), exp_h, atol=TOL[dtype] * 10, rtol=0)
    torch.testing.assert_close(only, logps, atol=TOL[dtype], rtol=0)
    assert none is None and torch.equal(logits, before)
    if masked:
        assert torch.all(logps[~mask] == 0) and torch.all(entropy[~mask] == 0)


def test_special_values_without_grad():
    """-inf entries exact, a -inf target gives -inf, NaN / +inf / all -inf rows NaN when kept, garbage under
    the mask never read into a result."""
    logits, targets, mask = _logits(2, 6, 40, torch.float32, seed=7, layout="slice")
    mask[:] = True
    targets = targets.clamp(min=0)
    mask[1, 0] = False
    logits[1, 0] = float("nan")  # masked garbage
    logits[0, 0, ::3] = float("-inf")  # banned tokens in a kept row
    targets[0, 0] = 1
    logits[0, 1, 5] = float("-inf")
    targets[0, 1] = 5  # a -inf target
    logits[0, 2, 7] = float("nan")
    logits[0, 3, 9] = float("inf")
    logits[0, 4] = float("-inf")  # no finite entry
    with torch.no_grad():
        logps, entropy = lk.token_logprobs(logits, targets, mask=mask, return_entropy=True, backend="torch")
    exp_l, exp_h = ref.token_logprobs(logits, targets, mask=mask)
    torch.testing.assert_close(logps.double(), exp_l, atol=2e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(entropy.double(), exp_h, atol=2e-4, rtol=0, equal_nan=True)
    assert logps[0, 1] == float("-inf") and torch.isfinite(entropy[0, 0])
    assert all(torch.isnan(logps[0, r]) and torch.isnan(entropy[0, r]) for r in (2, 3, 4))
    assert logps[1, 0] == 0 and entropy[1, 0] == 0


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), "all masked"])
def test_empty_work_without_grad(shape):
    B, T = (2, 3) if shape == "all masked" else shape
    logits = torch.randn(B, T + 1, 11)[:, :-1]
    targets = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool) if shape == "all masked" else None
    with torch.no_grad():
        logps, entropy = lk.token_logprobs(logits, targets, mask=mask, return_entropy=True, backend="torch")
    assert logps.shape == (B, T) and torch.all(logps == 0) and torch.all(entropy == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("masked", [True, False])
def test_linear_token_logprobs_without_grad_matches_reference(dtype, bias, masked, chunks):
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 3, 7, 16, 301
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    if bias:
        b[::5] = float("-inf")  # banned tokens through the bias
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7 if masked else None
    if masked:
        mask[0, :3] = False
        hidden[0, 0] = float("nan")  # garbage under the mask
    for temperature in (1.0, 0.8):
        with torch.no_grad():
            logps, entropy = lk.linear_token_logprobs(hidden, weight, targets, bias=b, mask=mask,
                                                      temperature=temperature, return_entropy=True, backend="torch")
        exp_l, exp_h = ref.linear_token_logprobs(hidden, weight, targets, b, temperature, mask)
        tol = 1e-10 if dtype == torch.float64 else 3e-5
        torch.testing.assert_close(logps.double(), exp_l, atol=tol, rtol=0)
        torch.testing.assert_close(entropy.double(), exp_h, atol=tol * 10, rtol=0)
        if masked:
            assert torch.all(logps[~mask] == 0) and torch.all(entropy[~mask] == 0)


def test_grad_path_is_taken_when_a_gradient_follows():
    """A logits tensor that requires grad under grad mode still gets its gradient (the autograd path)."""
    logits, targets, mask = _logits(2, 5, 31, torch.float64, seed=9, layout="contiguous")
    leaf = logits.clone().requires_grad_()
    logps, _ = lk.token_logprobs(leaf, targets, mask=mask, backend="torch")
    logps.sum().backward()
    assert leaf.grad is not None and torch.all(leaf.grad[~mask] == 0)
