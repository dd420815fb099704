"""The float64 reference itself, on numbers worked by hand."""
import math

import pytest
import torch

import lens_kernels as lk
from lens_kernels import reference as ref


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    logps, entropy = ref.token_logprobs(logits, torch.tensor([[2]]))
    lse = math.log(math.e + math.e ** 2 + math.e ** 3)
    assert abs(float(logps) - (3.0 - lse)) < 1e-12
    p = [math.exp(v - lse) for v in (1.0, 2.0, 3.0)]
    assert abs(float(entropy) + sum(q * math.log(q) for q in p)) < 1e-12
    half, _ = ref.token_logprobs(logits, torch.tensor([[2]]), temperature=2.0)
    assert abs(float(half) - (1.5 - math.log(sum(math.exp(v / 2) for v in (1.0, 2.0, 3.0))))) < 1e-12


def _one_token_loss(rho, adv, **cfg):
    l = torch.tensor([[math.log(rho)]], dtype=torch.float64)
    loss, _ = ref.policy_loss(l, torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1),
                              old_logps=torch.zeros(1, 1, dtype=torch.float64), config=lk.LossConfig(**cfg))
    return float(loss)


@pytest.mark.parametrize("rho,adv,cfg,expected", [
    (1.5, 1.0, {}, -1.2),  # clipped above: -min(1.5, 1.2)
    (0.5, 1.0, {}, -0.5),  # unclipped
    (0.5, -1.0, {}, 0.8),  # -min(-0.5, -0.8)
    (5.0, -1.0, {}, 5.0),
    (5.0, -1.0, dict(dual_clip=3.0), 3.0),  # dual clip bounds the loss by c|A|
    (5.0, -1.0, dict(delta=2.0), 2.0),  # delta clamps the unclipped ratio
    (1.5, 1.0, dict(epsilon_high=0.28), -1.28),
    (2.0, 1.0, dict(policy_loss="sapo"), -4.0 / 1.0 / (1 + math.exp(-1.0))),
])
def test_ppo_by_hand(rho, adv, cfg, expected):
    assert abs(_one_token_loss(rho, adv, **cfg) - expected) < 1e-12


def test_kl_estimators_by_hand():
    l, r = torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([[-1.5]], dtype=torch.float64)
    d = -0.5
    for est, expected in (("k1", 0.5), ("k2", 0.125), ("k3", math.exp(d) - d - 1)):
        assert abs(float(ref.kl_estimate(l, r, lk.LossConfig(kl_estimator=est))) - expected) < 1e-12


def test_aggregations_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    assert float(ref.aggregate(v, m, "token-mean")) == 10.0 / 4
    assert float(ref.aggregate(v, m, "seq-mean-token-mean")) == (2.0 + 4.0) / 2
    assert float(ref.aggregate(v, m, "seq-mean-token-sum")) == (6.0 + 4.0) / 2
    assert float(ref.aggregate(v, m, "seq-mean-token-sum-norm")) == 10.0 / (2 * 3)
    assert float(ref.aggregate(v, m, "token-sum")) == 10.0
    assert float(ref.aggregate(v, m, "token-mean", num_tokens=20, dp_size=4)) == 10.0 / 20 * 4


def test_lens_negative_group_reference_by_hand():
    old = torch.log(torch.tensor([[0.5], [0.2], [0.4], [0.1]], dtype=torch.float64))
    adv = ref.group_advantages(torch.zeros(4), group_size=4, estimator="lens", old_logps=old,
                               mask=torch.ones_like(old))
    rt = [-0.25 * p / (1.0 - p) for p in (0.5, 0.2, 0.4, 0.1)]
    mean = sum(rt) / 4
    torch.testing.assert_close(adv, 0.25 * (torch.tensor(rt, dtype=torch.float64) - mean))


# ------------------------------------------------------------- special values (docs/inputs.md)
def _logits(B, T, V, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, torch.randint(0, V, (B, T), generator=g)


def test_minus_inf_logits_are_the_smaller_vocabulary():
    """Banned tokens (-inf) give the log-probs, entropy and gradients of the vocabulary without them."""
    logits, targets = _logits(2, 3, 9, seed=101)
    banned = torch.tensor([0, 4, 5])  # includes the first element of every row
    allowed = torch.tensor([v for v in range(9) if v not in banned.tolist()])
    targets = allowed[targets % len(allowed)]
    x = logits.clone()
    x[..., banned] = -math.inf
    x.requires_grad_()
    small = logits[..., allowed].clone().requires_grad_()
    small_targets = torch.searchsorted(allowed, targets)
    lp, h = ref.token_logprobs(x, targets, temperature=0.7)
    lp2, h2 = ref.token_logprobs(small, small_targets, temperature=0.7)
    torch.testing.assert_close(lp, lp2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h2, rtol=1e-12, atol=1e-12)
    w = torch.randn(2, 3, generator=torch.Generator().manual_seed(102), dtype=torch.float64)
    (lp * w + h * w.flip(0)).sum().backward()
    (lp2 * w + h2 * w.flip(0)).sum().backward()
    assert torch.all(x.grad[..., banned] == 0)
    torch.testing.assert_close(x.grad[..., allowed], small.grad, rtol=1e-12, atol=1e-12)


def test_special_rows_and_targets():
    logits, targets = _logits(1, 6, 5, seed=103)
    logits[0, 0, targets[0, 0]] = -math.inf  # the target is banned: -inf log-prob, finite entropy
    logits[0, 1] = -math.inf  # no finite logit: NaN
    logits[0, 2, 3] = math.nan  # NaN
    logits[0, 3, 1] = math.inf  # +inf: NaN
    targets[0, 4] = 5  # out of range: NaN
    targets[0, 5] = -100
    lp, h = ref.token_logprobs(logits, targets)
    assert lp[0, 0] == -math.inf and torch.isfinite(h[0, 0])
    assert torch.isnan(lp[0, 1:]).all() and torch.isnan(h[0, 1:4]).all() and torch.isfinite(h[0, 4:]).all()


def test_bad_kept_target_gives_a_nan_gradient_row_only():
    logits, targets = _logits(2, 2, 5, seed=104)
    targets[1, 0] = 7
    x = logits.clone().requires_grad_()
    lp, h = ref.token_logprobs(x, targets)
    (lp.nansum() + h.sum()).backward()
    assert torch.isnan(x.grad[1, 0]).all()
    others = torch.ones(2, 2, dtype=torch.bool)
    others[1, 0] = False
    assert torch.isfinite(x.grad[others]).all()


def test_nothing_under_the_mask_is_read():
    g = torch.Generator().manual_seed(105)
    logits, targets = _logits(3, 4, 6, seed=105)
    mask = torch.rand(3, 4, generator=g) < 0.6
    mask[0, 0], mask[2] = False, False
    junk = logits.clone()
    junk[~mask] = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0], dtype=torch.float64)
    bad_targets = torch.where(mask, targets, torch.full_like(targets, -100))
    adv = torch.randn(3, 4, generator=g, dtype=torch.float64)
    old = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    refl = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    w = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.5
    poison = lambda t: torch.where(mask, t, torch.full_like(t, math.nan))  # noqa: E731
    cfg = lk.LossConfig(beta=0.1, entropy_coef=0.01, ratio_level="sequence")
    results = []
    for z, y, a, o, r, iw in ((logits, targets, adv, old, refl, w),
                              (junk, bad_targets, poison(adv), poison(old), poison(refl), poison(w))):
        x = z.clone().requires_grad_()
        loss, metrics = ref.policy_loss_from_logits(x, y, mask, a, old_logps=o, ref_logps=r, is_weights=iw,
                                                    config=cfg)
        loss.backward()
        results.append((loss, metrics, x.grad))
    (l1, m1, g1), (l2, m2, g2) = results
    assert torch.isfinite(l1) and torch.equal(l1, l2)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert torch.equal(g1, g2) and torch.all(g2[~mask] == 0)


@pytest.mark.parametrize("B,T", [(0, 3), (2, 0), (0, 0)])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm", "token-sum"])
def test_empty_work_is_a_zero_loss(B, T, agg):
    x = torch.randn(B, T, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, T, dtype=torch.bool)
    lp, h = ref.token_logprobs(x, targets, mask=mask)
    assert lp.shape == (B, T) and h.shape == (B, T)
    cfg = lk.LossConfig(loss_agg_mode=agg, beta=0.1, entropy_coef=0.01)
    loss, metrics = ref.policy_loss_from_logits(x, targets, mask, torch.zeros(B, dtype=torch.float64),
                                                old_logps=torch.zeros(B, T), ref_logps=torch.zeros(B, T), config=cfg)
    loss.backward()
    assert float(loss.detach()) == 0.0 and x.grad.shape == x.shape
    assert float(metrics["ratio_min"]) == 1.0 and float(metrics["ratio_max"]) == 1.0
    assert all(torch.isfinite(v) for v in metrics.values())
    hidden = torch.randn(B, T, 4, dtype=torch.float64)
    loss, _ = ref.policy_loss_from_hidden(hidden, torch.randn(5, 4, dtype=torch.float64), targets, mask,
                                          torch.zeros(B, dtype=torch.float64), config=cfg.replace(beta=0.0))
    assert float(loss.detach()) == 0.0
    assert ref.group_advantages(torch.zeros(0), group_size=2).shape == (0,)


def test_minus_inf_target_in_the_loss():
    """A kept target with a -inf logit: rho = 0 (finite PPO term), k3 KL = +inf."""
    logits, targets = _logits(1, 2, 4, seed=106)
    logits[0, 0, targets[0, 0]] = -math.inf
    x = logits.clone().requires_grad_()
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = ref.policy_loss_from_logits(x, targets, mask, torch.tensor([1.0], dtype=torch.float64),
                                                old_logps=torch.full((1, 2), -1.0, dtype=torch.float64))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and float(metrics["ratio_min"]) == 0.0
    kl = ref.kl_estimate(torch.tensor([-math.inf]), torch.tensor([-1.0]), lk.LossConfig())
    assert float(kl) == math.inf


@pytest.mark.parametrize("temperature", ["B", "B1"])
def test_per_sequence_temperature_when_B_equals_T(temperature):
    logits, targets = _logits(3, 3, 5, seed=107)
    tau = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    lp, _ = ref.token_logprobs(logits, targets, temperature=tau if temperature == "B" else tau[:, None])
    for b in range(3):
        torch.testing.assert_close(lp[b], ref.token_logprobs(logits[b:b + 1], targets[b:b + 1],
                                                             temperature=float(tau[b]))[0][0])


def test_lens_confidence_uses_the_kept_tokens():
    old = torch.log(torch.tensor([[0.5, 0.9], [0.2, 0.3]], dtype=torch.float64))
    mask = torch.tensor([[1, 0], [1, 1]])
    s = ref.sequence_mean(torch.where(mask.bool(), old, torch.full_like(old, math.nan)), mask)
    torch.testing.assert_close(s, torch.stack([old[0, 0], old[1].mean()]))


@pytest.mark.parametrize("cfg,loss_kind", [
    (dict(), "finite"), (dict(ratio_level="sequence"), "finite"), (dict(policy_loss="sapo"), "finite"),
    (dict(dual_clip=3.0), "finite"), (dict(beta=0.1, kl_estimator="k1"), -math.inf),
    (dict(beta=0.1, kl_estimator="k2"), math.inf), (dict(beta=0.1, kl_estimator="k3"), math.inf),
    (dict(beta=0.1, kl_estimator="k3", kl_clamp=5.0), "finite"),
    (dict(beta=0.1, kl_estimator="k2", kl_clamp=5.0), "finite"),
    (dict(policy_loss="cispo"), "nan"),
    (dict(ratio_level="sequence_token"), "nan"),
])
def test_minus_inf_target_follows_the_formula(cfg, loss_kind):
    """docs/inputs.md: ratio 0 (PPO/SAPO finite, exact gradient), KL infinite unless clamped, CISPO/GSPO-token NaN."""
    logits, targets = _logits(2, 3, 5, seed=108)
    logits[0, 1, targets[0, 1]] = -math.inf
    x = logits.clone().requires_grad_()
    mask = torch.ones(2, 3, dtype=torch.bool)
    g = torch.Generator().manual_seed(109)
    loss, _ = ref.policy_loss_from_logits(x, targets, mask, torch.randn(2, generator=g, dtype=torch.float64),
                                          old_logps=-torch.rand(2, 3, generator=g, dtype=torch.float64),
                                          ref_logps=-torch.rand(2, 3, generator=g, dtype=torch.float64),
                                          config=lk.LossConfig(**cfg))
    if loss_kind == "finite":
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    elif loss_kind == "nan":
        assert torch.isnan(loss)
    else:
        assert float(loss.detach()) == loss_kind
