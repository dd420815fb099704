"""policy_loss_from_hidden(mode="fast") on the torch backend against the float64 reference.

Fast mode computes dX, dW and dbias in forward (3 GEMMs per row chunk) and backward only scales
them, so every test checks the loss, the metrics and all three gradients after ``backward``.
``CHUNK_BYTES`` is shrunk so that chunk boundaries fall inside sequences.
"""
import warnings

import pytest
import torch

import lens_kernels as lk
from lens_kernels import reference as ref
from lens_kernels.backends import torch_ops

# per-dtype tolerances on max |error| / max |expected| of each output
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}

CONFIGS = {
    "grpo": lk.LossConfig(loss_agg_mode="seq-mean-token-mean"),
    "dapo_kl_entropy": lk.LossConfig(epsilon_high=0.28, beta=0.05, kl_estimator="k3", entropy_coef=0.01),
    "dual_clip_clamp": lk.LossConfig(dual_clip=2.5, log_ratio_clamp=0.3, delta=1.4, loss_agg_mode="token-sum"),
    "cispo_k2": lk.LossConfig(policy_loss="cispo", cispo_ratio_cap=1.1, beta=0.1, kl_estimator="k2",
                              kl_clamp=0.2),
    "sapo_entropy_agg": lk.LossConfig(policy_loss="sapo", entropy_coef=-0.02, entropy_agg_mode="token-mean",
                                      loss_agg_mode="seq-mean-token-sum-norm", loss_norm_length=11.0, dp_size=2.0),
}


def make_batch(B, T, H, V, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1] = False  # a fully masked sequence
    targets[~mask] = -100  # padding ids under the mask are legal
    logps, _ = ref.linear_token_logprobs(hidden, weight, targets.clamp(min=0), b)
    old = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios on both sides of the clip
    refl = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    is_w = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(hidden=cast(hidden), weight=cast(weight), bias=cast(b), targets=targets, mask=mask,
                advantages=adv.float(), old_logps=old.float(), ref_logps=refl.float(), is_weights=is_w.float())


def assert_close_scaled(got, want, tol, name):
    assert got is not None, f"{name}: no gradient"
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = max(want.abs().max().item(), 1e-12)
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def run_both(batch, cfg, temperature=1.0, grad_output=1.0, grad_scale=1.0, mode="fast", frozen_weight=False,
             backend="torch", num_tokens=None):
    """(ours, expected): each a dict of loss, metrics and the gradients of hidden, weight, bias."""
    ours_in = {k: batch[k].detach().clone().requires_grad_(k != "weight" or not frozen_weight)
               for k in ("hidden", "weight", "bias") if batch[k] is not None}
    want_in = {k: v.detach().double().requires_grad_(k != "weight" or not frozen_weight)
               for k, v in ours_in.items()}
    common = dict(old_logps=batch["old_logps"], ref_logps=batch["ref_logps"] if cfg.beta else None,
                  is_weights=batch["is_weights"], config=cfg, num_tokens=num_tokens)
    loss, metrics = lk.policy_loss_from_hidden(
        ours_in["hidden"], ours_in["weight"], batch["targets"], batch["mask"], batch["advantages"],
        bias=ours_in.get("bias"), temperature=temperature, grad_scale=grad_scale, mode=mode, backend=backend,
        **common)
    (loss * grad_output).backward()
    tau = temperature.double() if torch.is_tensor(temperature) else temperature
    exp_loss, exp_metrics = ref.policy_loss_from_hidden(
        want_in["hidden"], want_in["weight"], batch["targets"], batch["mask"], batch["advantages"],
        bias=want_in.get("bias"), temperature=tau, **common)
    (exp_loss * grad_output).backward()
    ours = dict(loss=loss, metrics=metrics, **{k: v.grad for k, v in ours_in.items()})
    want = dict(loss=exp_loss, metrics=exp_metrics, **{k: v.grad for k, v in want_in.items()})
    return ours, want


def check(ours, want, tol):
    assert_close_scaled(ours["loss"], want["loss"], tol, "loss")
    for name, value in want["metrics"].items():
        assert ours["metrics"][name].dim() == 0
        torch.testing.assert_close(ours["metrics"][name].double(), value.double(), atol=tol, rtol=tol, msg=name)
    for name in ("hidden", "weight", "bias"):
        if name in want:
            if want[name] is None:
                assert ours[name] is None, f"{name}: a gradient where none is wanted"
            else:
                assert ours[name].dtype == want[name].dtype or ours[name].dtype != torch.float64
                assert_close_scaled(ours[name], want[name], tol, name)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows at V=37 (fp32), so boundaries fall inside the sequences of T=7."""
    monkeypatch.setattr(torch_ops, "CHUNK_BYTES", 3 * 37 * 12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_matches_reference(dtype, config, small_chunks):
    batch = make_batch(4, 7, 16, 37, dtype, seed=hash(config) % 2**31)
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
        torch_ops._grad_scale_warned = False
        ours, want = run_both(batch, CONFIGS["grpo"], grad_output=grad_output, grad_scale=grad_scale)
    check(ours, want, TOL[torch.float64])
    rescaled = [w for w in caught if "grad_scale" in str(w.message)]
    assert len(rescaled) == (0 if grad_output == grad_scale else 1)


def test_frozen_weight_skips_dw(small_chunks, monkeypatch):
    calls = []
    real = torch_ops.accumulate_t_mm
    monkeypatch.setattr(torch_ops, "accumulate_t_mm", lambda *a: (calls.append(1), real(*a)))
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
    assert type(loss.grad_fn).__name__ == "FastHiddenLossFunctionBackward"
    monkeypatch.setattr(torch_ops.F, "linear", lambda *a, **k: pytest.fail("backward recomputed the logits"))
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()  # the stored gradient is handed out once
    monkeypatch.undo()
    gspo = lk.LossConfig(ratio_level="sequence")
    loss, _ = lk.policy_loss_from_hidden(hidden, batch["weight"], batch["targets"], batch["mask"],
                                         batch["advantages"], config=gspo, backend="torch")
    assert type(loss.grad_fn).__name__ != "FastHiddenLossFunctionBackward"
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
