"""Shared cases of the hidden-path tests: random batches, the comparison with the float64 reference."""
import functools

import torch

import lens_kernels as lk
from lens_kernels import reference as ref

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
             op=None, num_tokens=None):
    """(ours, expected): each a dict of loss, metrics and the gradients of hidden, weight, bias. ``op``
    has the signature of ``lk.policy_loss_from_hidden`` (default: it, on the torch backend)."""
    op = op or functools.partial(lk.policy_loss_from_hidden, backend="torch")
    ours_in = {k: batch[k].detach().clone().requires_grad_(k != "weight" or not frozen_weight)
               for k in ("hidden", "weight", "bias") if batch[k] is not None}
    want_in = {k: v.detach().double().requires_grad_(k != "weight" or not frozen_weight)
               for k, v in ours_in.items()}
    common = dict(old_logps=batch["old_logps"], ref_logps=batch["ref_logps"] if cfg.beta else None,
                  is_weights=batch["is_weights"], config=cfg, num_tokens=num_tokens)
    loss, metrics = op(
        ours_in["hidden"], ours_in["weight"], batch["targets"], batch["mask"], batch["advantages"],
        bias=ours_in.get("bias"), temperature=temperature, grad_scale=grad_scale, mode=mode, **common)
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
