"""The Triton hidden path against the float64 reference: on the GPU when there is one, else under the
Triton interpreter on CPU tensors (fp32/fp16 only where tl.dot runs: bf16 dots are broken there).

TRITON_INTERPRET must be set before the kernels are decorated, so this module sets it and reloads the
two op modules if another test imported them first without it.
"""
import functools
import importlib
import os
import sys

import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("linear_token_logprobs", "policy_loss_from_hidden"):
        _module = sys.modules.get("lens_kernels.backends.triton." + _name)
        if _module is not None:
            importlib.reload(_module)

from hidden_cases import CONFIGS, TOL, check, make_batch, run_both  # noqa: E402
from lens_kernels import reference as ref  # noqa: E402
linear_op = importlib.import_module("lens_kernels.backends.triton.linear_token_logprobs")
loss_op = importlib.import_module("lens_kernels.backends.triton.policy_loss_from_hidden")

# fp16 products are exact in fp32 accumulation, but hidden/weight themselves are rounded to fp16
TOL_TRITON = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
B, T, H, V = 3, 7, 24, 77  # V odd and not a multiple of any tile; T=7 puts chunk boundaries inside sequences


def _to_device(batch):
    return {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _poisoned_empty(monkeypatch):
    """torch.empty fills with NaN during the test: an output a kernel fails to write shows."""
    real = torch.empty

    def empty(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-7)

    monkeypatch.setattr(torch, "empty", empty)


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature", ["one", "scalar", "per_row"])
@pytest.mark.parametrize("entropy_grad", [True, False])
def test_linear_token_logprobs_matches_reference(dtype, temperature, entropy_grad, monkeypatch):
    batch = _to_device(make_batch(B, T, H, V, dtype, seed=21))
    tau = {"one": 1.0, "scalar": 0.7, "per_row": torch.tensor([[0.6], [1.3], [0.9]], device=DEVICE)}[temperature]
    _poisoned_empty(monkeypatch)
    inputs = {k: batch[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    expected_in = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    logp, entropy = linear_op.linear_token_logprobs(inputs["hidden"], inputs["weight"], batch["targets"],
                                                    inputs["bias"], batch["mask"], tau, True)
    exp_logp, exp_entropy = ref.linear_token_logprobs(
        expected_in["hidden"], expected_in["weight"], batch["targets"], expected_in["bias"],
        tau.double() if torch.is_tensor(tau) else tau, batch["mask"])
    assert logp.dtype == torch.float32 and (logp <= 0).all()
    tol = TOL_TRITON[dtype]
    check(dict(loss=logp, metrics={}), dict(loss=exp_logp, metrics={}), tol)
    check(dict(loss=entropy, metrics={}), dict(loss=exp_entropy, metrics={}), tol)
    g = torch.Generator().manual_seed(2)
    g_logp = torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE)
    g_entropy = torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE)
    if entropy_grad:
        ((logp * g_logp.float()).sum() + (entropy * g_entropy.float()).sum()).backward()
        ((exp_logp * g_logp).sum() + (exp_entropy * g_entropy).sum()).backward()
    else:  # no gradient reaches the entropy: the kernel's HAS_ENTROPY_GRAD=False variant
        (logp * g_logp.float()).sum().backward()
        (exp_logp * g_logp).sum().backward()
    check({k: v.grad for k, v in inputs.items()} | dict(loss=logp.sum(), metrics={}),
          {k: v.grad for k, v in expected_in.items()} | dict(loss=exp_logp.sum(), metrics={}), tol)
    assert torch.all(inputs["hidden"].grad[~batch["mask"]] == 0)


def test_linear_token_logprobs_frozen_weight_and_sequence_sums(monkeypatch):
    batch = _to_device(make_batch(B, T, H, V, torch.float32, seed=23, bias=False))
    _poisoned_empty(monkeypatch)
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone()  # frozen
    logp, _ = linear_op.linear_token_logprobs(hidden, weight, batch["targets"], None, batch["mask"], 1.0)
    logp.sum().backward()
    assert weight.grad is None and torch.isfinite(hidden.grad).all()
    logp2, entropy2, sums = linear_op.linear_token_logprobs_with_sequence_sums(
        batch["hidden"], weight, batch["targets"], None, batch["mask"], 1.0)
    exp_logp, _ = ref.linear_token_logprobs(batch["hidden"], weight, batch["targets"], None, 1.0, batch["mask"])
    torch.testing.assert_close(logp2.double(), exp_logp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(sums.double(), exp_logp.sum(-1), atol=2e-5, rtol=2e-5)
    assert sums[1] == 0  # the fully masked sequence


def test_linear_token_logprobs_large_logits_and_vocab_slabs(monkeypatch):
    """|z| ~ 1e3 (the split lse keeps log p exact), and dW slabs smaller than V (slab edges mid-tile)."""
    monkeypatch.setattr(linear_op, "DW_SLAB_ROWS", 20)
    batch = _to_device(make_batch(2, 5, 16, V, torch.float32, seed=29))
    weight = (batch["weight"] * 300).requires_grad_()
    hidden = batch["hidden"].clone().requires_grad_()
    logp, entropy = linear_op.linear_token_logprobs(hidden, weight, batch["targets"], None, batch["mask"], 1.0, True)
    (logp.sum() + entropy.sum()).backward()
    w64 = weight.detach().double().requires_grad_()
    h64 = hidden.detach().double().requires_grad_()
    exp_logp, exp_entropy = ref.linear_token_logprobs(h64, w64, batch["targets"], None, 1.0, batch["mask"])
    (exp_logp.sum() + exp_entropy.sum()).backward()
    assert (logp <= 0).all()
    torch.testing.assert_close(logp.double(), exp_logp, atol=2e-3, rtol=1e-5)
    check(dict(loss=logp.sum(), metrics={}, hidden=hidden.grad, weight=weight.grad),
          dict(loss=exp_logp.sum(), metrics={}, hidden=h64.grad, weight=w64.grad), 1e-4)


# ---------------------------------------------------------------------------------------------
# policy_loss_from_hidden, both modes
# ---------------------------------------------------------------------------------------------
def _loss_op(chunk_rows=5):
    return functools.partial(loss_op.policy_loss_from_hidden, chunk_rows=chunk_rows)


@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_policy_loss_from_hidden_matches_reference(mode, config, monkeypatch):
    batch = _to_device(make_batch(B, T, H, V, torch.float32, seed=31 + list(CONFIGS).index(config)))
    _poisoned_empty(monkeypatch)
    ours, want = run_both(batch, CONFIGS[config], mode=mode, op=_loss_op())
    check(ours, want, TOL_TRITON[torch.float32])


@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_gspo_in_both_modes(mode, level):
    batch = _to_device(make_batch(B, T, H, V, torch.float32, seed=41))
    ours, want = run_both(batch, CONFIGS["grpo"].__class__(ratio_level=level, beta=0.02), mode=mode, op=_loss_op())
    check(ours, want, TOL_TRITON[torch.float32])


@pytest.mark.parametrize("mode,dtype", [("fast", torch.bfloat16), ("fast", torch.float16), ("lean", torch.float16),
                                        ("lean", torch.bfloat16)])
def test_half_precision_weights(mode, dtype):
    if DEVICE == "cpu" and dtype == torch.bfloat16 and mode == "lean":
        # the interpreter's bf16 tl.dot gives garbage (loss inf, entropy 0, in both modes when called
        # directly): this case runs on a GPU
        pytest.skip("bf16 tl.dot is broken in the interpreter")
    batch = _to_device(make_batch(B, T, H, V, dtype, seed=43))
    ours, want = run_both(batch, CONFIGS["dapo_kl_entropy"], mode=mode, op=_loss_op())
    assert ours["weight"].dtype == dtype
    check(ours, want, TOL_TRITON[dtype] * 2)


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_temperature_frozen_weight_and_grad_scale(mode):
    batch = _to_device(make_batch(B, T, H, V, torch.float32, seed=47))
    tau = torch.tensor([[0.6], [1.3], [0.9]], device=DEVICE)
    ours, want = run_both(batch, CONFIGS["sapo_entropy_agg"], temperature=tau, mode=mode, frozen_weight=True,
                          grad_output=0.5, grad_scale=0.25, op=_loss_op(chunk_rows=4))
    assert ours["weight"] is None
    check(ours, want, TOL_TRITON[torch.float32])
