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
