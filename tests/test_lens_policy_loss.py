"""The one-call LENS step against the reference composition group_advantages + policy_loss_from_logits."""
import pytest
import torch
from seeds import stable_seed
from tolerances import assert_grad_close, assert_value_close

import lens_kernels as lk
from lens_kernels import reference as ref

G, T, V = 4, 6, 37  # odd V


def _batch(groups, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    B = groups * G
    logits = (torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 2).to(dtype)[:, :-1]
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[2] = False  # a completion with no loss tokens
    rewards = (torch.rand(B, generator=g) < 0.4).double()
    rewards[:G] = 0  # a negative group
    rewards[G:2 * G] = 1  # an all-correct group
    rewards[2 * G:3 * G] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # a mixed group
    return logits, targets, mask, rewards


def _reference(logits, targets, mask, rewards, cfg, estimator="lens", old=None, group_ids=None, **adv_kw):
    confidence_logps = old if old is not None else ref.token_logprobs(logits, targets, mask=mask)[0]
    adv = ref.group_advantages(rewards, group_size=None if group_ids is not None else G, group_ids=group_ids,
                               estimator=estimator, old_logps=confidence_logps, mask=mask, **adv_kw)
    x = logits.detach().double().requires_grad_()
    loss, metrics = ref.policy_loss_from_logits(x, targets, mask, adv, old_logps=old, config=cfg)
    loss.backward()
    return loss, adv, x.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("estimator", ["lens", "grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("on_policy", [True, False])
def test_matches_reference_composition(dtype, tol, estimator, on_policy):
    logits, targets, mask, rewards = _batch(4, dtype, seed=stable_seed(estimator, on_policy))
    old = None
    if not on_policy:
        old = ref.token_logprobs(logits, targets, mask=mask)[0] + 0.1 * torch.randn(logits.shape[:2],
                                                                                    dtype=torch.float64)
        old = old.to(torch.float32 if dtype == torch.float32 else dtype)
    cfg = lk.LossConfig(epsilon_high=0.28, entropy_coef=0.01, loss_agg_mode="seq-mean-token-mean")
    x = logits.detach().clone().requires_grad_()
    loss, metrics = lk.lens_policy_loss_from_logits(x, targets, mask, rewards, group_size=G,
                                                    advantage_config=lk.AdvantageConfig(estimator=estimator),
                                                    old_logps=old, config=cfg)
    loss.backward()
    exp_loss, exp_adv, exp_grad = _reference(logits, targets, mask, rewards, cfg, estimator,
                                             None if old is None else old.double())
    torch.testing.assert_close(metrics["advantages"].double(), exp_adv, atol=tol * 10, rtol=tol * 10)
    torch.testing.assert_close(loss.double(), exp_loss, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double(), exp_grad, atol=tol, rtol=tol * 10)
    assert float(metrics["on_policy"]) == float(on_policy)
    negative = float((rewards.view(-1, G).sum(1) == 0).double().mean())
    assert abs(float(metrics["frac_negative_groups"]) - negative) < 1e-6


def test_every_group_kind_gets_its_advantages():
    logits, targets, mask, rewards = _batch(3, torch.float32, seed=3)
    loss, metrics = lk.lens_policy_loss_from_logits(logits, targets, mask, rewards, group_size=G)
    adv = metrics["advantages"]
    assert torch.all(adv[G:2 * G] == 0)  # all correct
    assert torch.any(adv[:G] != 0) and abs(float(adv[:G].sum())) < 1e-6  # negative: rescued, de-meaned
    assert torch.all(adv[2 * G:3 * G][[0, 3]] > 0) and torch.all(adv[2 * G:3 * G][[1, 2]] < 0)


def test_shuffled_group_ids():
    logits, targets, mask, rewards = _batch(4, torch.float64, seed=4)
    perm = torch.randperm(4 * G, generator=torch.Generator().manual_seed(5))
    ids = (torch.arange(4 * G) // G + 100)[perm]
    x = logits[perm].detach().clone().requires_grad_()
    loss, metrics = lk.lens_policy_loss_from_logits(x, targets[perm], mask[perm], rewards[perm], group_ids=ids,
                                                    group_size=G)
    loss.backward()
    exp_loss, exp_adv, exp_grad = _reference(logits[perm], targets[perm], mask[perm], rewards[perm], lk.LossConfig(),
                                             group_ids=ids)
    torch.testing.assert_close(loss, exp_loss)
    torch.testing.assert_close(x.grad, exp_grad)
    contiguous, cm = lk.lens_policy_loss_from_logits(logits, targets, mask, rewards, group_size=G)
    torch.testing.assert_close(metrics["advantages"], cm["advantages"][perm])


def test_hidden_variant_matches_logits_variant():
    g = torch.Generator().manual_seed(6)
    B, H = 2 * G, 8
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    rewards = torch.tensor([0.0] * G + [1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    loss, metrics = lk.lens_policy_loss_from_hidden(hidden, weight, targets, mask, rewards, group_size=G)
    grads = torch.autograd.grad(loss, (hidden, weight))
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss2, metrics2 = lk.lens_policy_loss_from_logits(h2 @ w2.T, targets, mask, rewards, group_size=G)
    grads2 = torch.autograd.grad(loss2, (h2, w2))
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(metrics["advantages"], metrics2["advantages"])
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


def test_partial_group_is_a_clear_error():
    logits, targets, mask, rewards = _batch(3, torch.float32, seed=7)
    logits, targets, mask, rewards = logits[:8], targets[:8], mask[:8], rewards[:8]
    with pytest.raises(ValueError, match="whole groups"):
        lk.lens_policy_loss_from_logits(logits[:7], targets[:7], mask[:7], rewards[:7], group_size=G)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    with pytest.raises(ValueError, match=r"group 1 has 3 completions"):
        lk.lens_policy_loss_from_logits(logits, targets, mask, rewards, group_ids=ids, group_size=G)
    with pytest.raises(ValueError, match="group_size"):
        lk.lens_policy_loss_from_logits(logits, targets, mask, rewards)


@pytest.mark.parametrize("estimator", ["lens", "grpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_reference_composition(estimator, dtype):
    import triton_interp  # the interpreter on CPU, the GPU otherwise

    device = triton_interp.DEVICE
    logits, targets, mask, rewards = _batch(3, dtype, seed=11)
    cfg = lk.LossConfig(entropy_coef=0.01, beta=0.0, dual_clip=3.0)
    x = logits.detach().clone().to(device).requires_grad_()
    loss, metrics = lk.lens_policy_loss_from_logits(x, targets.to(device), mask.to(device), rewards.to(device),
                                                    group_size=G, advantage_config=lk.AdvantageConfig(estimator=estimator),
                                                    config=cfg, backend="triton")
    loss.backward()
    exp_loss, exp_adv, exp_grad = _reference(logits, targets, mask, rewards, cfg, estimator)
    torch.testing.assert_close(metrics["advantages"].double().cpu(), exp_adv, atol=1e-4, rtol=1e-4)
    assert_value_close(loss, exp_loss, dtype, "loss")
    # the triton kernels' bf16 gradient is measured within 0.72% of each element (about two bf16
    # roundings, 2^-7), against one rounding (2^-8) for torch: 4 half-ulps (1.6%) allowed, margin x2
    assert_grad_close(x.grad, exp_grad, dtype, "dL/dlogits", ulps=4.0)
