"""policy_loss and policy_loss_from_logits / _from_hidden (torch backend) against the float64 reference.

The torch backend computes the loss gradient in closed form (the coefficients the fused kernels
use); the reference differentiates the plain formulas with autograd.
"""
import itertools

import pytest
import torch
from seeds import stable_seed
from tolerances import assert_grad_close, assert_value_close

import lens_kernels as lk
from lens_kernels import reference as ref
from lens_kernels.backends.torch import _common as torch_common
from lens_kernels.config import KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES, RATIO_LEVELS

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _batch(B, T, dtype, seed, adv_per_token=False):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios on both sides of the clip
    refl = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    adv_shape = (B, T) if adv_per_token else (B,)
    adv = torch.randn(*adv_shape, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[1] = False  # a fully masked row
    is_w = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    cast = lambda t: t.to(dtype)
    return cast(logps), cast(old), cast(refl), cast(entropy), cast(adv), mask, cast(is_w)


def _compare(cfg, dtype, seed, with_old=True, is_weights=False, adv_per_token=False, num_tokens=None,
             num_sequences=None):
    logps, old, refl, entropy, adv, mask, is_w = _batch(5, 8, dtype, seed, adv_per_token)
    ours_l = logps.clone().requires_grad_()
    ours_h = entropy.clone().requires_grad_()
    theirs_l = logps.double().requires_grad_()
    theirs_h = entropy.double().requires_grad_()
    kw = dict(old_logps=old if with_old else None, ref_logps=refl if cfg.beta else None,
              is_weights=is_w if is_weights else None, config=cfg, num_tokens=num_tokens,
              num_sequences=num_sequences)
    loss, metrics = lk.policy_loss(ours_l, adv, mask, entropy=ours_h, **kw)
    exp_loss, exp_metrics = ref.policy_loss(theirs_l, adv, mask, entropy=theirs_h, **kw)
    tol = TOL[dtype]
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), exp_loss, atol=tol, rtol=tol)
    for name, value in exp_metrics.items():
        assert metrics[name].dim() == 0
        torch.testing.assert_close(metrics[name].double(), value.double(), atol=tol, rtol=tol, msg=name)
    loss.backward()
    exp_loss.backward()
    torch.testing.assert_close(ours_l.grad.double(), theirs_l.grad, atol=tol, rtol=tol)
    if theirs_h.grad is not None:
        torch.testing.assert_close(ours_h.grad.double(), theirs_h.grad, atol=tol, rtol=tol)
    assert torch.all(ours_l.grad[~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("policy,level", list(itertools.product(POLICY_LOSSES, RATIO_LEVELS)))
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("kl", KL_ESTIMATORS)
def test_every_loss_type_level_aggregation_and_kl(dtype, policy, level, agg, kl):
    cfg = lk.LossConfig(policy_loss=policy, ratio_level=level, loss_agg_mode=agg, kl_estimator=kl, beta=0.05,
                        epsilon_high=0.28, entropy_coef=0.01, cispo_ratio_cap=1.2)
    _compare(cfg, dtype, seed=stable_seed(policy, level, agg, kl))


OPTION_CASES = {
    "dual_clip": dict(dual_clip=3.0),
    "delta": dict(delta=1.3),
    "log_ratio_clamp": dict(log_ratio_clamp=0.2),
    "kl_clamp": dict(beta=0.1, kl_clamp=0.05),
    "sapo_temperatures": dict(policy_loss="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.6),
    "entropy_token_mean": dict(entropy_coef=0.02, loss_agg_mode="seq-mean-token-sum", entropy_agg_mode="token-mean"),
    "dr_grpo_norm": dict(loss_agg_mode="seq-mean-token-sum-norm", loss_norm_length=64.0),
    "dp_size": dict(dp_size=4.0, loss_agg_mode="token-mean"),
    "everything": dict(dual_clip=2.5, delta=1.5, log_ratio_clamp=1.0, beta=0.2, kl_estimator="k2", kl_clamp=0.3,
                       entropy_coef=-0.01, epsilon_low=0.1, epsilon_high=0.3, loss_agg_mode="seq-mean-token-mean"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(OPTION_CASES))
@pytest.mark.parametrize("level", RATIO_LEVELS)
def test_options(dtype, case, level):
    _compare(lk.LossConfig(ratio_level=level, **OPTION_CASES[case]), dtype, seed=len(case))


@pytest.mark.parametrize("policy", POLICY_LOSSES)
@pytest.mark.parametrize("level", RATIO_LEVELS)
def test_is_weights_and_token_advantages(policy, level):
    cfg = lk.LossConfig(policy_loss=policy, ratio_level=level)
    _compare(cfg, torch.float64, seed=3, is_weights=True, adv_per_token=True)


def test_sequence_is_weights():
    logps, old, _, _, adv, mask, _ = _batch(4, 6, torch.float64, 21)
    w = torch.rand(4, dtype=torch.float64) + 0.5
    x, y = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    a, _ = lk.policy_loss(x, adv, mask, old_logps=old, is_weights=w)
    b, _ = ref.policy_loss(y, adv, mask, old_logps=old, is_weights=w)
    a.backward(), b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("level", RATIO_LEVELS)
def test_on_policy_default(level):
    _compare(lk.LossConfig(ratio_level=level), torch.float64, seed=4, with_old=False)


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_global_normalizers(agg):
    cfg = lk.LossConfig(loss_agg_mode=agg)
    _compare(cfg, torch.float64, seed=5, num_tokens=123.0, num_sequences=torch.tensor(17.0, dtype=torch.float64))


def test_fully_masked_batch_is_zero_not_nan():
    logps, old, _, entropy, adv, mask, _ = _batch(3, 4, torch.float32, 6)
    mask = torch.zeros_like(mask)
    for agg in LOSS_AGG_MODES:
        x = logps.clone().requires_grad_()
        loss, metrics = lk.policy_loss(x, adv, mask, old_logps=old, entropy=entropy,
                                       config=lk.LossConfig(loss_agg_mode=agg, entropy_coef=0.1))
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.all(x.grad == 0)
        assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("cfg", [
    lk.LossConfig(beta=0.1, entropy_coef=0.05, dual_clip=3.0, loss_agg_mode="seq-mean-token-mean"),
    lk.LossConfig(policy_loss="sapo", ratio_level="sequence", beta=0.1, kl_estimator="k1"),
    # (CISPO and GSPO-token stop gradients by design, so finite differences cannot check them; the
    # comparison with the reference's autograd above covers them)
    lk.LossConfig(policy_loss="sapo", beta=0.3, kl_clamp=0.2, loss_agg_mode="token-sum", entropy_coef=0.1,
                  entropy_agg_mode="token-mean"),
    lk.LossConfig(delta=1.4, log_ratio_clamp=0.5, loss_agg_mode="token-mean"),
])
def test_gradcheck_policy_loss(cfg):
    logps, old, refl, entropy, adv, mask, is_w = _batch(3, 5, torch.float64, 7)
    logps.requires_grad_(), entropy.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda l, h: lk.policy_loss(l, adv, mask, old_logps=old, ref_logps=refl, entropy=h, is_weights=is_w,
                                    config=cfg)[0],
        (logps, entropy))


# ---------------------------------------------------------------- the loss heads
def _logits_batch(B, T, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 2
    logits = full.to(dtype)[:, :-1]  # the usual strided slice
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0] = False
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = ref.token_logprobs(logits, targets, mask=mask)[0] + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    return logits, targets, mask, adv, old


def _logits_case(dtype, level, inplace):
    logits, targets, mask, adv, old = _logits_batch(4, 6, 211, dtype, seed=8)
    cfg = lk.LossConfig(ratio_level=level, beta=0.05, entropy_coef=0.01, dual_clip=3.0)
    refl = old + 0.1
    base = logits.detach().clone().requires_grad_()
    x = base * 1 if inplace else base
    loss, metrics = lk.policy_loss_from_logits(x, targets, mask, adv, old_logps=old, ref_logps=refl, config=cfg,
                                               temperature=0.9, inplace=inplace)
    y = logits.detach().double().requires_grad_()
    exp_loss, exp_metrics = ref.policy_loss_from_logits(y, targets, mask, adv, temperature=0.9, old_logps=old,
                                                        ref_logps=refl, config=cfg)
    loss.backward()
    exp_loss.backward()
    return (loss, metrics, base.grad), (exp_loss, exp_metrics, y.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", RATIO_LEVELS)
@pytest.mark.parametrize("inplace", [False, True])
def test_policy_loss_from_logits(dtype, level, inplace, monkeypatch):
    monkeypatch.setattr(torch_common, "CHUNK_BYTES", 8192)
    (loss, metrics, grad), (exp_loss, exp_metrics, exp_grad) = _logits_case(dtype, level, inplace)
    assert_value_close(loss, exp_loss, dtype, "loss")
    assert_value_close(metrics["entropy"], exp_metrics["entropy"], dtype, "entropy")
    assert_grad_close(grad, exp_grad, dtype, "dL/dlogits")


@pytest.mark.parametrize("factor", [1.10, 1.01, 0.99])
def test_bf16_gradient_tolerance_rejects_a_scaled_gradient(factor, monkeypatch):
    """The tolerance above is not a rubber stamp: the right gradient scaled by 1% fails it."""
    monkeypatch.setattr(torch_common, "CHUNK_BYTES", 8192)
    (loss, _, grad), (exp_loss, _, exp_grad) = _logits_case(torch.bfloat16, "token", False)
    assert_grad_close(grad, exp_grad, torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_grad_close(grad.double() * factor, exp_grad, torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_value_close(loss.double() * factor, exp_loss, torch.bfloat16)


@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize("bias", [False, True])
def test_policy_loss_from_hidden(mode, bias, monkeypatch):
    monkeypatch.setattr(torch_common, "CHUNK_BYTES", 4096)
    g = torch.Generator().manual_seed(9)
    B, T, H, V = 3, 5, 12, 131
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / 4).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5
    cfg = lk.LossConfig(entropy_coef=0.01, loss_agg_mode="seq-mean-token-mean")
    loss, _ = lk.policy_loss_from_hidden(hidden, weight, targets, mask, adv, bias=b, old_logps=old, config=cfg,
                                         temperature=1.3, mode=mode)
    leaves = [t for t in (hidden, weight, b) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    exp_loss, _ = ref.policy_loss_from_hidden(copies[0], copies[1], targets, mask, adv,
                                              bias=copies[2] if bias else None, temperature=1.3, old_logps=old,
                                              config=cfg)
    exp_grads = torch.autograd.grad(exp_loss, copies)
    torch.testing.assert_close(loss, exp_loss, atol=1e-10, rtol=1e-10)
    for a, e in zip(grads, exp_grads):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-9)


def test_fused_logits_loss_fp32_exact_at_a_large_vocabulary():
    """torch's CPU log_softmax sums exp lane by lane in fp32: at V = 151936 its row offset was off by
    7e-5 (loss 3e-5 relative, gradient 1e-4 of its max against float64). The fused torch path measures
    the offset with a cascade sum; measured after the fix: loss 2e-7, gradient 2e-6 (bounds: 5x)."""
    gen = torch.Generator().manual_seed(151936)
    B, T, V = 1, 24, 151936
    z = 2.0 * torch.randn(B, T + 1, V, generator=gen)
    hot = torch.randint(0, V, (B, T + 1), generator=gen)
    z.scatter_(-1, hot.unsqueeze(-1), 17.0)  # peaked like a trained policy's logits
    targets, mask, adv = hot[:, 1:], torch.rand(B, T, generator=gen) > 0.2, torch.randn(B, generator=gen)
    ref_lp, _ = ref.token_logprobs(z[:, :-1].double(), targets, 0.9, mask)
    old = (ref_lp + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()
    x = z.clone().requires_grad_(True)
    loss, _ = lk.policy_loss_from_logits(x[:, :-1], targets, mask, adv, old_logps=old, temperature=0.9,
                                         config=lk.LossConfig(entropy_coef=0.01), backend="torch")
    loss.backward()
    xr = z.double().requires_grad_(True)
    want, _ = ref.policy_loss_from_logits(xr[:, :-1], targets, mask, adv, old_logps=old, temperature=0.9,
                                                config=lk.LossConfig(entropy_coef=0.01))
    want.backward()
    assert abs(float(loss) - float(want)) <= 1e-6 * abs(float(want))
    assert float((x.grad.double() - xr.grad).abs().max()) <= 1e-5 * float(xr.grad.abs().max())
