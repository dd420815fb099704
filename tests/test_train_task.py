"""lens-train building blocks: the task and verifier, the tokenizer, rollouts and the RL update."""
import copy
import random

import pytest
import torch

pytest.importorskip("transformers")

import lens_kernels as lk  # noqa: E402
from lens_kernels.train.config import TrainConfig  # noqa: E402
from lens_kernels.train.loop import (  # noqa: E402
    GROUP_FRACTIONS, Setup, fused_step_blocker, loss_config, micro_batch_order, policy_update, sequence_logprobs)
from lens_kernels.train.model import CharTokenizer, build_tiny_model  # noqa: E402
from lens_kernels.train.rollout import (  # noqa: E402
    completion_mask, decode_completions, encode_answers, encode_prompts, rollout, sample, score)
from lens_kernels.train.task import (  # noqa: E402
    BASE, DIGITS, LEVELS, Task, answer_text, carries, check_levels, draw, prompt_text, shortcut_answer, verify)


def _sum_from_answer(text):
    """Read the sum back from an answer: the digits at even positions, the last carry on top."""
    digits = [int(c) for c in text[0::2]] + [int(text[-1])]
    return sum(d * BASE ** i for i, d in enumerate(digits))


def test_verifier_is_exact():
    p = (3, 1234, 5678)
    assert prompt_text(p) == "4 3 2 1+8 7 6 5=" and answer_text(p) == "21119060"  # 6912: 2 c1, 1 c1, 9 c0, 6 c0
    assert verify(p, "21119060") and carries(1234, 5678) == 2
    for wrong in ("21119060 ", " 21119060", "2111906", "211190600", "21019060", "", "6912", "21119061"):
        assert not verify(p, wrong), wrong
    # the shortcut: a dropped carry is a wrong answer, and the carry after it is recomputed without it
    assert shortcut_answer(1234, 5678, [True, False, False, False]) == "20019060"  # 3+7 without the carry in: 0, carry 1
    assert not verify(p, shortcut_answer(1234, 5678, [True, False, False, False]))
    assert shortcut_answer(1234, 5678, [False] * DIGITS) == answer_text(p)


def test_answers_hold_the_sum_and_levels_count_carries():
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randrange(BASE ** DIGITS), rng.randrange(BASE ** DIGITS)
        text = answer_text((1, a, b))
        assert len(text) == 2 * DIGITS and _sum_from_answer(text) == a + b
        assert int(carries(a, b)) == sum(int(c) for c in text[1::2])  # carries written out = carries counted
        # dropping every carry gives the digit-wise sum mod BASE and no carry at all
        dropped = shortcut_answer(a, b, [True] * DIGITS)
        assert dropped[1::2] == "0" * DIGITS and verify((1, a, b), dropped) == (carries(a, b) == 0)
    for level, n_carries in LEVELS.items():
        problem = draw(rng, level)
        assert problem[0] == level and carries(*problem[1:]) == n_carries


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_task_levels_and_held_out_split(level):
    task = Task(levels=[level], test_per_level=40, seed=5)
    test = task.test[level]
    assert len(set(test)) == 40
    train = task.sample(random.Random(0), 300)
    assert not set(train) & set(test)  # disjoint
    for lvl, a, b in train + test:
        assert lvl == level and 0 <= a < BASE ** DIGITS and 0 <= b < BASE ** DIGITS
        assert carries(a, b) == LEVELS[level]
    assert Task(levels=[level], test_per_level=40, seed=5).test == task.test  # deterministic, from the seed
    assert Task(levels=[level], test_per_level=40, seed=6).test != task.test
    assert task.sample(random.Random(0), 300) == train


def test_levels_splits_are_disjoint_across_levels_and_warmup_targets():
    task = Task(test_per_level=50, seed=1)
    held_out = [p for level in task.levels for p in task.test[level]]
    assert len(set(held_out)) == len(held_out) == 50 * len(LEVELS)
    assert all(task.is_held_out(p) for p in held_out)
    assert not any(task.is_held_out(p) for p in task.sample(random.Random(2), 1000))
    # warm-up targets: exact with drop_carry 0; with drop_carry 1 every carry is dropped
    problem = (3, 1234, 5678)
    rng = random.Random(0)
    assert Task.warmup_target(problem, rng, 0.0) == answer_text(problem)
    assert Task.warmup_target(problem, rng, 1.0) == shortcut_answer(1234, 5678, [True] * DIGITS)
    half = [Task.warmup_target(problem, rng, 0.5) for _ in range(400)]
    assert 0.15 < sum(t == answer_text(problem) for t in half) / 400 < 0.35  # 2 carries kept: 1/4


def test_bad_levels():
    with pytest.raises(ValueError, match="levels"):
        check_levels([0, 2])
    with pytest.raises(ValueError, match="levels"):
        check_levels([])


def test_char_tokenizer_roundtrip_and_errors():
    tok = CharTokenizer()
    text = " 0123456789+-="
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.eos_id]) == ""
    with pytest.raises(ValueError, match="alphabet"):
        tok.encode("12a")


def test_completion_mask_and_decoding():
    tok = CharTokenizer()
    rows = [tok.encode("20000000") + [tok.eos_id] + tok.encode("34"),   # eos mid-row, tokens after it masked
            [tok.eos_id] + tok.encode("1234567890"),                    # empty answer
            tok.encode("20000000000")]                                  # no eos: whole row kept, never correct
    comp = torch.tensor(rows)
    mask = completion_mask(comp, tok.eos_id)
    assert mask.tolist() == [[True] * 9 + [False] * 2, [True] + [False] * 10, [True] * 11]
    assert decode_completions(tok, comp) == ["20000000", "", None]
    problems = [(1, 1, 1), (1, 0, 0), (1, 1, 1)]
    assert answer_text(problems[0]) == "20000000"
    assert score(tok, problems, comp).tolist() == [1.0, 0.0, 0.0]


def _tiny(dtype=torch.float32, seed=0):
    tok = CharTokenizer()
    torch.manual_seed(seed)
    model = build_tiny_model(tok.vocab_size, hidden_size=32, layers=2, heads=2).to(dtype).eval()
    return model, tok


def _sample_without_cache(model, prompts, steps, tok, temperature, generator):
    seqs, done = prompts, torch.zeros(prompts.shape[0], dtype=torch.bool)
    for _ in range(steps):
        logits = model(input_ids=seqs, use_cache=False).logits[:, -1]
        if temperature > 0:
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, tok.fill_id), token)
        done |= token == tok.eos_id
        seqs = torch.cat([seqs, token[:, None]], 1)
    return seqs[:, prompts.shape[1]:]


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_kv_cache_sampling_is_exact(temperature):
    # fp64 so that cached and uncached logits agree to ~1e-15 and the same draws follow
    model, tok = _tiny(torch.float64)
    problems = Task(levels=[2, 5], test_per_level=6).test[5][:6]
    prompts = encode_prompts(tok, problems, 18, "cpu")  # 2 filler tokens in front
    got = sample(model, prompts, 7, tok.eos_id, tok.fill_id, temperature=temperature,
                 generator=torch.Generator().manual_seed(3))
    want = _sample_without_cache(model, prompts, 7, tok, temperature, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_old_logprobs_match_sampling_distribution():
    model, tok = _tiny(torch.float64)
    problems = Task(levels=[3], test_per_level=4).test[3]
    batch = rollout(model, tok, problems, 4, 16, 6, temperature=0.8, generator=torch.Generator().manual_seed(1),
                    device="cpu")
    logps = sequence_logprobs(model, batch.sequences, batch.completions, batch.mask, 16, 0.8)
    full = torch.log_softmax(model(input_ids=batch.sequences).logits[:, 15:-1] / 0.8, -1)
    want = full.gather(-1, batch.completions[..., None]).squeeze(-1) * batch.mask
    assert torch.all(logps <= 0) and not torch.isnan(logps).any()
    torch.testing.assert_close(logps, want.to(logps.dtype), rtol=1e-6, atol=1e-6)
    assert torch.all(logps[~batch.mask] == 0)
    # the sampler's own log-probs of the drawn tokens (fp32 softmax) are the same distribution's
    assert batch.sample_logps.dtype == torch.float32 and torch.all(batch.sample_logps <= 0)
    torch.testing.assert_close(batch.sample_logps[batch.mask], logps[batch.mask].float(), rtol=1e-5, atol=1e-5)


def _setup_and_rollout(**options):
    config = TrainConfig(levels="1,2", test_per_level=8, hidden_size=32, layers=2, heads=2, prompts_per_step=4,
                         group_size=4, grad_accum=2, **options).validate()
    setup = Setup(config, torch.device("cpu"), announce=False)
    problems = setup.task.sample(random.Random(0), 4)
    batch = rollout(setup.model, setup.tokenizer, problems, 4, setup.prompt_len, setup.completion_len,
                    temperature=1.0, generator=torch.Generator().manual_seed(0), device="cpu")
    batch.rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0])  # every kind of group
    return setup, batch


def _update(fused_head, monkeypatch=None, seen=None):
    setup, batch = _setup_and_rollout(inner_updates=2, fused_head=fused_head)
    old = sequence_logprobs(setup.model, batch.sequences, batch.completions, batch.mask, setup.prompt_len, 1.0)
    adv, _ = lk.group_advantages(batch.rewards, group_size=4, estimator="lens", old_logps=old, mask=batch.mask)
    # plain SGD: the update is the clipped gradient. AdamW's first step is about lr * sign(grad), which
    # turns fp32 rounding in a near-zero gradient entry into a difference of up to lr.
    opt = torch.optim.SGD(setup.model.parameters(), lr=1e-1)
    before = [p.detach().clone() for p in setup.model.parameters()]
    stats = policy_update(setup, opt, batch, adv, old, None, lk.LossConfig(), torch.Generator().manual_seed(0))
    return before, [p.detach().clone() for p in setup.model.parameters()], stats


def test_policy_update_uses_strided_logits_view(monkeypatch):
    seen = []
    real = lk.policy_loss_from_logits

    def spy(logits, *args, **kwargs):
        seen.append((logits.is_contiguous(), logits._base is not None, kwargs["grad_scale"]))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(lk, "policy_loss_from_logits", spy)
    before, after, stats = _update(False)
    assert len(seen) == 4  # 2 inner updates x 2 micro-batches
    assert all(not contiguous and is_view and scale == 0.5 for contiguous, is_view, scale in seen)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert stats["ratio_mean"] > 0 and stats["grad_norm"] > 0


def test_fused_head_update_matches_logits_update():
    _, logits_path, s1 = _update(False)
    _, hidden_path, s2 = _update(True)
    for a, b in zip(logits_path, hidden_path):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("n, group_size", [(16, 4), (24, 8), (6, 2)])
def test_micro_batch_order_keeps_groups_whole(n, group_size):
    gen = torch.Generator().manual_seed(n)
    order = micro_batch_order(n, group_size, True, gen, "cpu")
    assert sorted(order.tolist()) == list(range(n))
    groups = (order // group_size).view(-1, group_size)
    assert torch.all(groups == groups[:, :1])  # every slice of G holds one group, in order
    assert torch.equal(order.view(-1, group_size) % group_size, torch.arange(group_size).expand(n // group_size, -1))
    shuffled = [micro_batch_order(n, group_size, True, torch.Generator().manual_seed(s), "cpu") for s in range(4)]
    assert any(not torch.equal(shuffled[0], other) for other in shuffled[1:])  # the group order is shuffled
    assert sorted(micro_batch_order(n, group_size, False, gen, "cpu").tolist()) == list(range(n))


@pytest.mark.parametrize("estimator, fused_head, beta", [
    ("lens", False, 0.0), ("grpo", False, 0.0), ("dr_grpo", False, 0.0),
    ("lens", True, 0.0), ("grpo", True, 0.0), ("lens", False, 0.1), ("neg_uniform", False, 0.0),
    ("nsr", False, 0.0)])
def test_one_call_lens_step_matches_two_stage_update(estimator, fused_head, beta, monkeypatch):
    setup, batch = _setup_and_rollout(inner_updates=1, estimator=estimator, fused_head=fused_head, beta=beta)
    config, model, P = setup.config, setup.model, setup.prompt_len
    assert fused_step_blocker(config) is None
    lcfg = loss_config(config)
    ref = None
    if beta:
        ref = sequence_logprobs(model, batch.sequences, batch.completions, batch.mask, P, 1.0)
        ref = ref - 0.3 * torch.rand(ref.shape, generator=torch.Generator().manual_seed(1)) * batch.mask
    start = copy.deepcopy(model.state_dict())

    calls = []
    name = "lens_policy_loss_from_hidden" if fused_head else "lens_policy_loss_from_logits"
    real = getattr(lk, name)
    monkeypatch.setattr(lk, name, lambda *a, **k: calls.append(k["group_size"]) or real(*a, **k))
    fused = policy_update(setup, torch.optim.SGD(model.parameters(), lr=1e-1), batch, None, None, ref, lcfg,
                          torch.Generator().manual_seed(0))
    fused_params = [p.detach().clone() for p in model.parameters()]
    assert calls == [4, 4]  # one call per micro-batch, two micro-batches of two whole groups

    model.load_state_dict(start)
    old = sequence_logprobs(model, batch.sequences, batch.completions, batch.mask, P, 1.0)
    adv, adv_stats = lk.group_advantages(batch.rewards, group_size=4, estimator=estimator,
                                         old_logps=old if estimator == "lens" else None,
                                         mask=batch.mask if estimator == "lens" else None)
    two_stage = policy_update(setup, torch.optim.SGD(model.parameters(), lr=1e-1), batch, adv, old, ref, lcfg,
                              torch.Generator().manual_seed(0), whole_groups=True)
    moved = 0.0
    for a, b, p0 in zip(fused_params, model.parameters(), start.values()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-7)
        moved = max(moved, float((b.detach() - p0).abs().max()))
    assert moved > 1e-3  # the update is not empty
    for key in ("loss", "policy_loss", "kl", "entropy", "ratio_mean", "clip_frac"):
        assert fused[key] == pytest.approx(two_stage[key], rel=1e-5, abs=1e-7), key
    assert fused["kl"] > 0 if beta else fused["kl"] == 0
    # the micro-batches' group metrics aggregate to the whole rollout batch's
    for key in GROUP_FRACTIONS + ("mean_abs_adv_negative", "mean_abs_adv_mixed"):
        assert fused[key] == pytest.approx(float(adv_stats[key]), rel=1e-6, abs=1e-7), key
    assert fused["frac_negative_groups"] == 0.25 and fused["frac_mixed_groups"] == 0.5


def test_fused_step_applies_only_on_policy_with_whole_groups():
    base = dict(levels="1,2", prompts_per_step=4, group_size=4, grad_accum=2)
    assert fused_step_blocker(TrainConfig(inner_updates=1, **base).validate()) is None
    assert "--inner-updates 2" in fused_step_blocker(TrainConfig(inner_updates=2, **base).validate())
    assert "--no-fused-step" in fused_step_blocker(TrainConfig(inner_updates=1, fused_step=False, **base).validate())
    split = TrainConfig(levels="1,2", prompts_per_step=3, group_size=4, grad_accum=2, inner_updates=1).validate()
    assert "split groups" in fused_step_blocker(split)
    setup, batch = _setup_and_rollout(inner_updates=2)
    with pytest.raises(ValueError, match="on-policy"):
        policy_update(setup, torch.optim.SGD(setup.model.parameters(), lr=0.1), batch, None, None, None,
                      loss_config(setup.config), torch.Generator().manual_seed(0))


def test_attention_choice(monkeypatch):
    import importlib.util

    from lens_kernels.train import model as model_mod

    assert model_mod.attention_implementation(torch.device("cpu"), torch.float32) == "sdpa"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert model_mod.attention_implementation(torch.device("cuda"), torch.bfloat16) == "flash_attention_2"
    assert model_mod.attention_implementation(torch.device("cuda"), torch.float32) == "sdpa"  # flash-attn: 16-bit only
    assert model_mod.attention_implementation(torch.device("cpu"), torch.bfloat16) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert model_mod.attention_implementation(torch.device("cuda"), torch.bfloat16) == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_architectures_sample_valid_tokens(arch):
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(tok.vocab_size, arch=arch, hidden_size=32, layers=1, heads=2).eval()
    assert type(model).__name__.lower().startswith(arch)
    prompts = encode_prompts(tok, [(2, 12, 3), (1, 4, 5)], 16, "cpu")
    out = sample(model, prompts, 4, tok.eos_id, tok.fill_id, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4) and int(out.min()) >= 0 and int(out.max()) < tok.vocab_size
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model(tok.vocab_size, arch="gpt2")
