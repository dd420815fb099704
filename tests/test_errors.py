"""Bad input (docs/design.md, Inputs, errors and special values): a ValueError or TypeError whose message names the argument."""
import pytest
import torch

import lens_kernels as lk

B, T, V = 2, 3, 7


def good():
    g = torch.Generator().manual_seed(0)
    return dict(
        logits=torch.randn(B, T, V, generator=g),
        targets=torch.randint(0, V, (B, T), generator=g),
        mask=torch.ones(B, T, dtype=torch.bool),
        advantages=torch.randn(B, generator=g),
        old_logps=-torch.rand(B, T, generator=g),
    )


def loss_from_logits(**over):
    kw = good()
    kw.update(over)
    return lk.policy_loss_from_logits(kw.pop("logits"), kw.pop("targets"), kw.pop("mask"), kw.pop("advantages"),
                                      **kw)


@pytest.mark.parametrize("over,exc,name", [
    (dict(logits=torch.randn(B, T + 1, V)), ValueError, "targets"),
    (dict(targets=torch.randint(0, V, (B, T + 1))), ValueError, "targets"),
    (dict(mask=torch.ones(B, T + 1)), ValueError, "mask"),
    (dict(advantages=torch.randn(B + 1)), ValueError, "advantages"),
    (dict(advantages=torch.randn(B, T + 1)), ValueError, "advantages"),
    (dict(old_logps=torch.randn(B, T - 1)), ValueError, "old_logps"),
    (dict(targets=torch.full((B, T), V)), ValueError, "targets"),
    (dict(targets=torch.full((B, T), -1)), ValueError, "targets"),
    (dict(logits=torch.randn(B, V, T).transpose(1, 2)), ValueError, "stride"),
    (dict(logits=torch.randint(0, 3, (B, T, V))), TypeError, "logits"),
    (dict(logits=torch.randn(B, T, V).to(torch.complex64)), TypeError, "logits"),
    (dict(targets=torch.rand(B, T)), TypeError, "targets"),
    (dict(logits=[[0.0]]), TypeError, "logits"),
    (dict(logits=torch.randn(B * T, V)), ValueError, "logits"),
    (dict(config="grpo"), TypeError, "config"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=torch.ones(5)), ValueError, "temperature"),
    (dict(num_tokens=-3), ValueError, "num_tokens"),
    (dict(grad_scale=0), ValueError, "grad_scale"),
    (dict(config=lk.LossConfig(beta=0.1)), ValueError, "ref_logps"),
    (dict(is_weights=torch.rand(B + 1)), ValueError, "is_weights"),
    (dict(mask=torch.full((B, T), 0.5)), ValueError, "mask"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=torch.ones(T)), ValueError, "temperature"),
    (dict(temperature=torch.ones(B, T, 1)), ValueError, "temperature"),
    (dict(temperature=torch.tensor([1.0, float("inf")])), ValueError, "temperature"),
    (dict(num_tokens=torch.tensor(-5.0)), ValueError, "num_tokens"),
    (dict(num_tokens=torch.tensor(0.0)), ValueError, "num_tokens"),
    (dict(num_sequences=float("inf")), ValueError, "num_sequences"),
    (dict(grad_scale=float("inf")), ValueError, "grad_scale"),
    (dict(logits=torch.randn(1, T, V).expand(B, T, V), inplace=True), ValueError, "logits"),
])
def test_policy_loss_from_logits_errors(over, exc, name):
    with pytest.raises(exc, match=name):
        loss_from_logits(**over)


def test_masked_padding_targets_are_accepted():
    kw = good()
    kw["mask"][0, 1] = False
    kw["targets"][0, 1] = -100
    loss, _ = loss_from_logits(targets=kw["targets"], mask=kw["mask"])
    assert torch.isfinite(loss)


def test_token_logprobs_errors():
    kw = good()
    with pytest.raises(ValueError, match="logits"):
        lk.token_logprobs(torch.randn(V), kw["targets"])
    with pytest.raises(ValueError, match="targets"):
        lk.token_logprobs(kw["logits"], kw["targets"][:, :2])
    with pytest.raises(ValueError, match="mask"):
        lk.token_logprobs(kw["logits"], kw["targets"], mask=torch.ones(B))


def test_linear_token_logprobs_errors():
    hidden, weight = torch.randn(B, T, 4), torch.randn(V, 4)
    targets = torch.randint(0, V, (B, T))
    with pytest.raises(ValueError, match="weight"):
        lk.linear_token_logprobs(hidden, torch.randn(V, 5), targets)
    with pytest.raises(TypeError, match="weight"):
        lk.linear_token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="bias"):
        lk.linear_token_logprobs(hidden, weight, targets, bias=torch.randn(V + 1))
    with pytest.raises(ValueError, match="targets"):
        lk.linear_token_logprobs(hidden, weight, torch.full((B, T), V))
    with pytest.raises(ValueError, match="mode"):
        lk.policy_loss_from_hidden(hidden, weight, targets, torch.ones(B, T), torch.randn(B), mode="turbo")


def test_policy_loss_errors():
    logps = -torch.rand(B, T)
    with pytest.raises(ValueError, match="entropy"):
        lk.policy_loss(logps, torch.randn(B), torch.ones(B, T), config=lk.LossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="logps"):
        lk.policy_loss(-torch.rand(B), torch.randn(B), torch.ones(B, T))
    with pytest.raises(TypeError, match="mask"):
        lk.policy_loss(logps, torch.randn(B), "all")


@pytest.mark.parametrize("call,exc,name", [
    (lambda: lk.group_advantages(torch.rand(10), group_size=3), ValueError, "group_size"),
    (lambda: lk.group_advantages(torch.rand(10), group_size=0), ValueError, "group_size"),
    (lambda: lk.group_advantages(torch.rand(10)), ValueError, "group_size"),
    (lambda: lk.group_advantages(torch.rand(4), group_size=2, group_ids=torch.zeros(4, dtype=torch.long)),
     ValueError, "group_ids"),
    (lambda: lk.group_advantages(torch.rand(4), group_ids=torch.zeros(3, dtype=torch.long)), ValueError, "group_ids"),
    (lambda: lk.group_advantages(torch.rand(4), group_ids=torch.zeros(4)), TypeError, "group_ids"),
    (lambda: lk.group_advantages(torch.rand(4), group_size=2, estimator="ppo"), ValueError, "estimator"),
    (lambda: lk.group_advantages(torch.rand(4), group_size=2, scale="global"), ValueError, "scale"),
    (lambda: lk.group_advantages(torch.tensor([0.0, 1.0, 0.5, 1.0]), group_size=2, estimator="lens",
                                 old_logps=-torch.rand(4, 3)), ValueError, "binary"),
    (lambda: lk.group_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), group_size=2, estimator="lens"),
     ValueError, "old_logps"),
    (lambda: lk.group_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), group_size=2, estimator="lens",
                                 old_logps=-torch.rand(3, 2)), ValueError, "old_logps"),
    (lambda: lk.group_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), group_size=2, estimator="lens",
                                 old_logps=-torch.rand(4, 2), mask=torch.ones(4, 3)), ValueError, "mask"),
    (lambda: lk.group_advantages(torch.tensor([0.0, float("nan"), 1.0, 1.0]), group_size=2), ValueError, "NaN"),
    (lambda: lk.group_advantages(torch.tensor([0.0, float("inf"), 1.0, 1.0]), group_size=2), ValueError, "finite"),
    (lambda: lk.group_advantages(torch.rand(4, 1), group_size=2), ValueError, "rewards"),
    (lambda: lk.group_advantages([0.0, 1.0], group_size=2), TypeError, "rewards"),
    (lambda: lk.group_advantages(torch.rand(4), group_size=2, lens_alpha=-1.0), ValueError, "lens_alpha"),
    (lambda: lk.group_advantages(torch.rand(4), group_size=2, nan_rewards="skip"), ValueError, "nan_rewards"),
    (lambda: lk.group_advantages(torch.rand(4), group_size=2, correct=torch.ones(3)), ValueError, "correct"),
])
def test_group_advantages_errors(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inputs_are_not_modified(backend):
    """Forward and backward, on every backend here (triton under the interpreter; see also
    test_special_inputs.py::test_inputs_are_not_modified for every op)."""
    import triton_interp  # noqa: F401  (TRITON_INTERPRET before triton is imported)

    kw = good()
    kw["logits"].requires_grad_()
    copies = {k: v.detach().clone() for k, v in kw.items()}
    loss, _ = loss_from_logits(backend=backend, ref_logps=kw["old_logps"] - 0.1, is_weights=torch.rand(B) + 0.5,
                               config=lk.LossConfig(beta=0.1, entropy_coef=0.01), **kw)
    loss.backward()
    rewards = torch.tensor([0.0, 1.0, 0.0, 0.0])
    r_copy = rewards.clone()
    lk.group_advantages(rewards, group_size=2, estimator="lens", old_logps=kw["old_logps"].repeat(2, 1))
    assert torch.equal(rewards, r_copy)
    for k, v in kw.items():
        assert torch.equal(v.detach(), copies[k]), k
