"""lens-train building blocks: the task and verifier, the tokenizer, rollouts and the RL update."""
import random

import pytest
import torch

pytest.importorskip("transformers")

import lens_kernels as lk  # noqa: E402
from lens_kernels.train.config import TrainConfig  # noqa: E402
from lens_kernels.train.loop import Setup, policy_update, sequence_logprobs  # noqa: E402
from lens_kernels.train.model import CharTokenizer, build_tiny_model  # noqa: E402
from lens_kernels.train.rollout import (  # noqa: E402
    completion_mask, decode_completions, encode_answers, encode_prompts, rollout, sample, score)
from lens_kernels.train.task import LEVELS, Task, answer_text, check_levels, prompt_text, verify  # noqa: E402


def test_verifier_is_exact():
    p = (3, 123, 45)
    assert prompt_text(p) == "123+45=" and answer_text(p) == "168"
    assert verify(p, "168")
    for wrong in ("0168", "168 ", " 168", "167", "", "16", "1688", "+168"):
        assert not verify(p, wrong), wrong


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_task_levels_and_held_out_split(level):
    task = Task(levels=[level], test_per_level=40, seed=5)
    da, db = LEVELS[level]
    test = task.test[level]
    assert len(set(test)) == min(40, 10 ** (da + db) // 5)
    train = task.sample(random.Random(0), 300)
    assert not set(train) & set(test)
    for lvl, a, b in train + test:
        assert lvl == level and 0 <= a < 10 ** da and 0 <= b < 10 ** db
    assert Task(levels=[level], test_per_level=40, seed=5).test == task.test  # from the seed


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
    rows = [tok.encode("12") + [tok.eos_id] + tok.encode("34"),   # eos mid-row, tokens after it masked
            [tok.eos_id] + tok.encode("1234"),                    # empty answer
            tok.encode("12345")]                                  # no eos: whole row kept, never correct
    comp = torch.tensor(rows)
    mask = completion_mask(comp, tok.eos_id)
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] + [False] * 4, [True] * 5]
    assert decode_completions(tok, comp) == ["12", "", None]
    problems = [(1, 10, 2), (1, 0, 0), (5, 12345, 0)]
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
    prompts = encode_prompts(tok, problems, 11, "cpu")
    got = sample(model, prompts, 7, tok.eos_id, tok.fill_id, temperature=temperature,
                 generator=torch.Generator().manual_seed(3))
    want = _sample_without_cache(model, prompts, 7, tok, temperature, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_old_logprobs_match_sampling_distribution():
    model, tok = _tiny(torch.float64)
    problems = Task(levels=[3], test_per_level=4).test[3]
    batch = rollout(model, tok, problems, 4, 7, 6, temperature=0.8, generator=torch.Generator().manual_seed(1),
                    device="cpu")
    logps = sequence_logprobs(model, batch.sequences, batch.completions, batch.mask, 7, 0.8)
    full = torch.log_softmax(model(input_ids=batch.sequences).logits[:, 6:-1] / 0.8, -1)
    want = full.gather(-1, batch.completions[..., None]).squeeze(-1) * batch.mask
    assert torch.all(logps <= 0) and not torch.isnan(logps).any()
    torch.testing.assert_close(logps, want.to(logps.dtype), rtol=1e-6, atol=1e-6)
    assert torch.all(logps[~batch.mask] == 0)


def _update(fused_head, monkeypatch=None, seen=None):
    config = TrainConfig(levels="1,2", test_per_level=8, hidden_size=32, layers=2, heads=2, prompts_per_step=4,
                         group_size=4, inner_updates=2, grad_accum=2, fused_head=fused_head).validate()
    setup = Setup(config, torch.device("cpu"), announce=False)
    problems = setup.task.sample(random.Random(0), 4)
    batch = rollout(setup.model, setup.tokenizer, problems, 4, setup.prompt_len, setup.completion_len,
                    temperature=1.0, generator=torch.Generator().manual_seed(0), device="cpu")
    batch.rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0])  # every kind of group
    old = sequence_logprobs(setup.model, batch.sequences, batch.completions, batch.mask, setup.prompt_len, 1.0)
    adv, _ = lk.group_advantages(batch.rewards, group_size=4, estimator="lens", old_logps=old, mask=batch.mask)
    # SGD: the update is linear in the gradient; Adam's g / sqrt(v) would blow fp32 rounding of a
    # near-zero gradient element up to a full step and make the two paths' comparison meaningless
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
    prompts = encode_prompts(tok, [(2, 12, 3), (1, 4, 5)], 5, "cpu")
    out = sample(model, prompts, 4, tok.eos_id, tok.fill_id, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4) and int(out.min()) >= 0 and int(out.max()) < tok.vocab_size
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model(tok.vocab_size, arch="gpt2")
