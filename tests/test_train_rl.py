"""What one RL step of lens-train does to the policy, on fixed seeds (deterministic, so not flaky).

These are the RL assertions that hold at any model quality, so they run in CI in seconds: the paper's
mechanism (GRPO gets no gradient from a negative group; LENS does, and pushes down its most confident
mistake) and the policy-gradient direction (a step raises the advantage-weighted log-likelihood)."""
import random

import pytest
import torch

pytest.importorskip("transformers")

import lens_kernels as lk  # noqa: E402
from lens_kernels.train.config import TrainConfig  # noqa: E402
from lens_kernels.train.loop import Setup, loss_config, policy_update  # noqa: E402
from lens_kernels.train.rollout import rollout  # noqa: E402

G = 8


def _batch(rewards, estimator):
    config = TrainConfig(levels="4,5", test_per_level=4, hidden_size=32, layers=2, heads=2, prompts_per_step=2,
                         group_size=G, grad_accum=1, inner_updates=1, estimator=estimator).validate()
    setup = Setup(config, torch.device("cpu"), announce=False)
    problems = setup.task.sample(random.Random(0), 2)
    batch = rollout(setup.model, setup.tokenizer, problems, G, setup.prompt_len, setup.completion_len,
                    temperature=1.0, generator=torch.Generator().manual_seed(0), device="cpu")
    batch.rewards = torch.tensor(rewards, dtype=torch.float32)
    return setup, batch


def _seq_logps(setup, batch):
    with torch.no_grad():
        logits = setup.model(input_ids=batch.sequences).logits[:, setup.prompt_len - 1:-1]
        logps, _ = lk.token_logprobs(logits, batch.completions, mask=batch.mask)
    mask = batch.mask.float()
    return (logps * mask).sum(1) / mask.sum(1)  # s_i: mean token log-prob, log of LENS's confidence


def _step(setup, batch, lr=0.05):
    before = [p.detach().clone() for p in setup.model.parameters()]
    opt = torch.optim.SGD(setup.model.parameters(), lr=lr)
    policy_update(setup, opt, batch, None, None, None, loss_config(setup.config), torch.Generator().manual_seed(0))
    return before


def test_negative_groups_grpo_learns_nothing_lens_pushes_down_confident_mistakes():
    rewards = [0.0] * (2 * G)  # two negative groups: every answer wrong
    setup, batch = _batch(rewards, "grpo")
    before = _step(setup, batch)
    assert all(torch.equal(a, b) for a, b in zip(before, setup.model.parameters()))  # zero advantage, no signal

    setup, batch = _batch(rewards, "lens")
    s_old = _seq_logps(setup, batch)
    adv, metrics = lk.group_advantages(batch.rewards, group_size=G, estimator="lens",
                                       old_logps=batch.sample_logps, mask=batch.mask)
    assert bool((adv != 0).any()) and float(metrics["frac_negative_groups"]) == 1.0
    before = _step(setup, batch)
    assert any(not torch.equal(a, b) for a, b in zip(before, setup.model.parameters()))
    s_new = _seq_logps(setup, batch)
    # the step ascends sum_i A_i s_i: the more confident mistakes (A_i most negative) lose likelihood
    assert float((adv * s_new).sum()) > float((adv * s_old).sum())
    for g in range(2):
        group = slice(g * G, (g + 1) * G)
        most_confident = int(torch.argmax(s_old[group]))
        assert float(s_new[group][most_confident]) < float(s_old[group][most_confident])


@pytest.mark.parametrize("estimator", ["grpo", "lens"])
def test_mixed_groups_raise_the_right_answers(estimator):
    rewards = [1.0, 0, 0, 1, 0, 0, 0, 0] + [0, 1, 1, 1, 0, 1, 1, 0]
    setup, batch = _batch(rewards, estimator)
    s_old = _seq_logps(setup, batch)
    _step(setup, batch)
    s_new = _seq_logps(setup, batch)
    right = batch.rewards == 1
    # correct answers gain log-likelihood relative to the wrong ones of their group
    gain = s_new - s_old
    for g in range(2):
        group = slice(g * G, (g + 1) * G)
        assert float(gain[group][right[group]].mean()) > float(gain[group][~right[group]].mean())


@pytest.mark.parametrize("estimator", ["neg_uniform", "nsr"])
def test_negative_groups_push_every_wrong_answer_down(estimator):
    """The simpler uses of a negative group: every wrong answer gets the same negative advantage, so a
    step lowers the group's likelihood as a whole (LENS instead moves it from the confident mistakes
    to the others, summing to zero)."""
    rewards = [0.0] * (2 * G)
    setup, batch = _batch(rewards, estimator)
    adv, _ = lk.group_advantages(batch.rewards, group_size=G, estimator=estimator)
    expected = -0.25 / G if estimator == "neg_uniform" else -1.0
    assert torch.equal(adv, torch.full((2 * G,), expected))
    s_old = _seq_logps(setup, batch)
    _step(setup, batch, lr=0.05 if estimator == "nsr" else 1.0)
    s_new = _seq_logps(setup, batch)
    for g in range(2):
        group = slice(g * G, (g + 1) * G)
        assert float(s_new[group].mean()) < float(s_old[group].mean())
