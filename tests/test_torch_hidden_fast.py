"""policy_loss_from_hidden(mode="fast") on the torch backend against the float64 reference.

Fast mode computes dX, dW and dbias in forward (3 GEMMs per row chunk) and backward only scales
them, so every test checks the loss, the metrics and all three gradients after ``backward``.
``CHUNK_BYTES`` is shrunk so that chunk boundaries fall inside sequences.
"""
import importlib
import warnings

import pytest
import torch

import lens_kernels as lk
from hidden_cases import CONFIGS, TOL, check, make_batch, run_both
from lens_kernels.backends.torch import _common as torch_common
from lens_kernels import loss as loss_module

# the module, not the function of the same name that the package re-exports
torch_hidden = importlib.import_module("lens_kernels.backends.torch.policy_loss_from_hidden")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows at V=37 (fp32), so boundaries fall inside the sequences of T=7."""
    monkeypatch.setattr(torch_common, "CHUNK_BYTES", 3 * 37 * 12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_matches_reference(dtype, config, small_chunks):
    batch = make_batch(4, 7, 16, 37, dtype, seed=list(CONFIGS).index(config))
    ours, want = run_both(batch, CONFIGS[config])
    check(ours, want, TOL[dtype])


@pytest.mark.parametrize("temperature", ["scalar", "per_row", "per_token"])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_temperature_and_bias(temperature, bias, small_chunks):
    batch = make_batch(3, 7, 8, 37, torch.float32, seed=7, bias=bias)
    tau = {"scalar": 0.7, "per_row": torch.tensor([[0.6], [1.3], [0.9]]),
           "per_token": torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) + 0.5}[temperature]
    ours, want = run_both(batch, CONFIGS["dapo_kl_entropy"], temperature=tau)
    check(ours, want, TOL[torch.float32])


def test_fast_bf16_weights_accumulate_in_fp32(small_chunks):
    batch = make_batch(4, 7, 32, 37, torch.bfloat16, seed=3)
    ours, want = run_both(batch, CONFIGS["dapo_kl_entropy"])
    assert ours["weight"].dtype == torch.bfloat16 and ours["hidden"].dtype == torch.bfloat16
    check(ours, want, TOL[torch.bfloat16])


@pytest.mark.parametrize("grad_output,grad_scale", [(1.0, 1.0), (0.25, 0.25), (3.0, 1.0), (1.0, 0.125)])
def test_grad_scale_contract(grad_output, grad_scale, small_chunks):
    batch = make_batch(3, 7, 8, 37, torch.float64, seed=11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_module.GRAD_SCALE_WATCH = loss_module._GradScaleWatch()
        ours, want = run_both(batch, CONFIGS["grpo"], grad_output=grad_output, grad_scale=grad_scale)
    check(ours, want, TOL[torch.float64])
    rescaled = [w for w in caught if "grad_scale" in str(w.message)]
    assert len(rescaled) == (0 if grad_output == grad_scale else 1)


def test_frozen_weight_skips_dw(small_chunks, monkeypatch):
    calls = []
    real = torch_hidden.accumulate_t_mm
    monkeypatch.setattr(torch_hidden, "accumulate_t_mm", lambda *a: (calls.append(1), real(*a)))
    batch = make_batch(3, 7, 8, 37, torch.float64, seed=5)
    ours, want = run_both(batch, CONFIGS["grpo"], frozen_weight=True)
    assert ours["weight"] is None and calls == []
    check(ours, want, TOL[torch.float64])


def test_fast_computes_the_gradient_in_forward(small_chunks, monkeypatch):
    """3 GEMMs: backward runs no linear at all; GSPO and no-grad calls take the lean path."""
    batch = make_batch(3, 7, 8, 37, torch.float64, seed=9)
    hidden = batch["hidden"].clone().requires_grad_()
    loss, _ = lk.policy_loss_from_hidden(hidden, batch["weight"], batch["targets"], batch["mask"],
                                         batch["advantages"], old_logps=batch["old_logps"], backend="torch")
    assert type(loss.grad_fn).__name__ == "FastHiddenLossBackward"
    monkeypatch.setattr(torch_hidden.F, "linear", lambda *a, **k: pytest.fail("backward recomputed the logits"))
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()  # the stored gradient is handed out once
    monkeypatch.undo()
    gspo = lk.LossConfig(ratio_level="sequence")
    loss, _ = lk.policy_loss_from_hidden(hidden, batch["weight"], batch["targets"], batch["mask"],
                                         batch["advantages"], config=gspo, backend="torch")
    assert type(loss.grad_fn).__name__ != "FastHiddenLossBackward"
    with torch.no_grad():
        loss, _ = lk.policy_loss_from_hidden(hidden, batch["weight"], batch["targets"], batch["mask"],
                                             batch["advantages"], backend="torch")
    assert loss.grad_fn is None


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_gspo_falls_back_to_lean_and_is_exact(level, small_chunks):
    batch = make_batch(4, 7, 8, 37, torch.float64, seed=13)
    ours, want = run_both(batch, lk.LossConfig(ratio_level=level, beta=0.02))
    check(ours, want, TOL[torch.float64])


def test_masked_tokens_get_no_gradient(small_chunks):
    """A masked row of hidden gets exactly 0, even with garbage old/ref log-probs under the mask."""
    batch = make_batch(3, 7, 8, 37, torch.float64, seed=17)
    _, want = run_both(batch, CONFIGS["dapo_kl_entropy"])  # the reference NaNs on garbage: give it zeros
    batch["old_logps"][~batch["mask"]] = float("-inf")
    batch["ref_logps"][~batch["mask"]] = float("nan")
    ours, _ = run_both(batch, CONFIGS["dapo_kl_entropy"])
    check(ours, want, TOL[torch.float64])
    assert torch.all(ours["hidden"][~batch["mask"]] == 0)


def test_global_token_normalizer(small_chunks):
    batch = make_batch(3, 7, 8, 37, torch.float32, seed=19)
    ours, want = run_both(batch, CONFIGS["dapo_kl_entropy"], num_tokens=40)
    check(ours, want, TOL[torch.float32])
