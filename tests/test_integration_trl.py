"""Parity of the TRL adapter with TRL's own GRPOTrainer code (installed package), fp32 to 1e-6.

The loss parity builds a bare trainer (``object.__new__``) with the attributes ``_compute_loss``
reads and fixes the log-probs that ``_get_per_token_logps_and_entropies`` returns: TRL's own loss
code runs for real on them, and so does ours. The advantage parity runs TRL's real
``_generate_and_score_completions`` on a tiny model with fixed rewards. The end-to-end test trains
``LensGRPOTrainer`` for 3 steps on CPU.
"""
import collections
import itertools
import types
import warnings

import pytest
import torch
from seeds import stable_seed

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'lens-kernels[trl]')")
accelerate = pytest.importorskip("accelerate")

import lens_kernels as lk  # noqa: E402
from lens_kernels.integrations.trl import LensGRPOConfig, LensGRPOTrainer, unpack_logps_output  # noqa: E402

GRPOTrainer = trl.GRPOTrainer
B, T, G = 6, 7, 3
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


@pytest.fixture
def accelerator():
    # per test: building a GRPOConfig (another test) resets accelerate's shared state
    return accelerate.Accelerator(cpu=True)


def make_inputs(seed, beta, with_is, level):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3 - 0.05
    old = logps + 0.3 * torch.randn(B, T, generator=g)
    ref = logps + 0.2 * torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[0] = 0.0  # a fully masked completion contributes 0, never NaN
    mask[1, 0] = 1.0
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": torch.randn(B, generator=g), "old_per_token_logps": old,
        "num_items_in_batch": torch.tensor(float(mask.sum() * 2 + 3)),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref
    if with_is:
        shape = (B, 1) if level == "sequence" else (B, T)
        inputs["importance_sampling_ratio"] = 0.5 + torch.rand(shape, generator=g)
    entropies = torch.rand(B, T, generator=g) * 2
    return logps, entropies, inputs


def bare_trainer(cls, accelerator, loss_type, level, beta, with_is, entropy_coef=0.0, arity=3, training=True,
                 bias_kl=False):
    tr = object.__new__(cls)
    args = LensGRPOConfig.__new__(LensGRPOConfig)  # field values only: no __post_init__ side effects
    for f in LensGRPOConfig.__dataclass_fields__.values():
        if f.default is not f.default_factory:
            object.__setattr__(args, f.name, f.default)
    args.delta = 1.5 if loss_type in ("grpo", "dapo") else None
    args.steps_per_generation = 2
    args.sapo_temperature_pos, args.sapo_temperature_neg = 1.0, 1.05
    args.use_bias_correction_kl = bias_kl
    tr.args = args
    tr.loss_type, tr.importance_sampling_level, tr.beta = loss_type, level, beta
    tr.epsilon_low = 0.2
    tr.epsilon_high = 1.3 if loss_type == "cispo" else 0.28
    tr.max_completion_length = T + 3
    tr.top_entropy_quantile, tr.off_policy_mask_threshold = 1.0, None
    tr.use_vllm = tr.vllm_importance_sampling_correction = with_is
    tr.aux_loss_enabled = False
    tr._entropy_bonus_enabled = entropy_coef != 0.0
    tr.entropy_coef, tr.use_adaptive_entropy = entropy_coef, False
    tr.current_gradient_accumulation_steps = 4
    tr.accelerator = accelerator
    model = torch.nn.Linear(1, 1)
    model.train(training)
    tr.model = model
    tr._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    return tr


def run_loss(tr, logps, entropies, inputs, arity=3):
    lp = logps.clone().requires_grad_(True)
    ent = entropies.clone().requires_grad_(True)

    def fixed(*args, **kwargs):
        return (lp, ent, None) if arity == 3 else (lp, ent)

    tr._get_per_token_logps_and_entropies = fixed
    loss = tr._compute_loss(tr.model, dict(inputs))
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    return loss.detach(), g_lp, (torch.zeros_like(ent) if g_ent is None else g_ent), tr._metrics


def assert_close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# beta 0.04 with TRL's default use_bias_correction_kl=True (the KL times the importance ratio) and without
CASES = [c for c in itertools.product(LOSS_TYPES, ("token", "sequence"), ((0.0, False), (0.04, False), (0.04, True)),
                                      (False, True))]


@pytest.mark.parametrize("loss_type,level,kl,with_is", CASES)
def test_compute_loss_parity(accelerator, loss_type, level, kl, with_is):
    beta, bias_kl = kl
    logps, ent, inputs = make_inputs(stable_seed(loss_type, level, kl, with_is) % 1000, beta, with_is, level)
    kw = dict(bias_kl=bias_kl)
    want = run_loss(bare_trainer(GRPOTrainer, accelerator, loss_type, level, beta, with_is, **kw), logps, ent, inputs)
    got = run_loss(bare_trainer(LensGRPOTrainer, accelerator, loss_type, level, beta, with_is, **kw), logps, ent,
                   inputs)
    assert torch.isfinite(got[0]) and want[1].abs().sum() > 0
    for a, b in zip(got[:3], want[:3]):
        assert_close(a, b)
    for name in ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "cispo_clip_ratio"):
        # at sequence level TRL averages clip flags per sequence, the adapter per token (documented)
        if name in want[3]["train"] and (level == "token" or "clip" not in name):
            assert got[3]["train"][name] == pytest.approx(want[3]["train"][name], abs=1e-6), name


@pytest.mark.parametrize("loss_type", ("grpo", "dapo"))
@pytest.mark.parametrize("training", (True, False))
def test_entropy_bonus_and_eval_normalizers(accelerator, loss_type, training):
    logps, ent, inputs = make_inputs(7, 0.0, False, "token")
    kw = dict(entropy_coef=0.01, training=training)
    want = run_loss(bare_trainer(GRPOTrainer, accelerator, loss_type, "token", 0.0, False, **kw), logps, ent, inputs)
    got = run_loss(bare_trainer(LensGRPOTrainer, accelerator, loss_type, "token", 0.0, False, **kw), logps, ent, inputs)
    for a, b in zip(got[:3], want[:3]):
        assert_close(a, b)
    mode = "train" if training else "eval"
    assert got[3][mode]["policy_loss"] == pytest.approx(want[3][mode]["policy_loss"], abs=1e-6)


def test_two_value_arity(accelerator):
    """TRL before 1.7 returns (logps, entropies): the adapter gives the same loss."""
    logps, ent, inputs = make_inputs(3, 0.04, False, "token")
    want = run_loss(bare_trainer(GRPOTrainer, accelerator, "dapo", "token", 0.04, False), logps, ent, inputs)
    got = run_loss(bare_trainer(LensGRPOTrainer, accelerator, "dapo", "token", 0.04, False), logps, ent, inputs,
                   arity=2)
    for a, b in zip(got[:3], want[:3]):
        assert_close(a, b)
    with pytest.raises(ValueError, match="expected 2 or 3"):
        unpack_logps_output((1,))


def test_unsupported_option_falls_back_with_one_warning(accelerator):
    logps, ent, inputs = make_inputs(5, 0.0, False, "token")
    tr = bare_trainer(LensGRPOTrainer, accelerator, "dapo", "token", 0.0, False)
    tr.top_entropy_quantile = 0.5
    ref = bare_trainer(GRPOTrainer, accelerator, "dapo", "token", 0.0, False)
    ref.top_entropy_quantile = 0.5
    with pytest.warns(UserWarning, match="top_entropy_quantile"):
        got = run_loss(tr, logps, ent, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_loss(tr, logps, ent, inputs)  # warned once only
    want = run_loss(ref, logps, ent, inputs)
    assert_close(got[0], want[0])


def test_config_validation():
    with pytest.raises(ValueError, match="advantage_estimator"):
        LensGRPOConfig(output_dir="unused", advantage_estimator="ppo", report_to=[], use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="fused_loss_head"):
        LensGRPOConfig(output_dir="unused", fused_loss_head="tokens", report_to=[], use_cpu=True, bf16=False)


# ----- a real trainer on a tiny model: TRL's advantage code, and 3 LENS training steps -------------
def load_example():
    """The TRL example (python/example_trl.py) supplies the tiny model and tokenizer made in code."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "python" / "example_trl.py"
    spec = importlib.util.spec_from_file_location("example_trl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_trainer(tmp_path, reward_fn, **overrides):
    from datasets import Dataset

    model, tokenizer = load_example().tiny_model_and_tokenizer()
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=6, max_steps=3, learning_rate=5e-2, logging_steps=1, report_to=[],
                   use_cpu=True, bf16=False, save_strategy="no", advantage_estimator="lens", seed=0,
                   gradient_accumulation_steps=1)
    options.update(overrides)
    args = LensGRPOConfig(**options)
    dataset = Dataset.from_dict({"prompt": ["1+2=", "3+4=", "5+1=", "2+2="] * 4})
    return LensGRPOTrainer(model=model, args=args, reward_funcs=reward_fn, train_dataset=dataset,
                           processing_class=tokenizer)


def always_wrong(completions, **kwargs):
    return [0.0] * len(completions)


def first_wrong_group(completions, **kwargs):
    """Binary: the first group is all wrong, later completions alternate right/wrong."""
    return [float(i >= 4 and i % 2 == 0) for i in range(len(completions))]


@pytest.mark.slow
@pytest.mark.parametrize("scale", ("group", "batch", "none"))
def test_trl_advantages_parity(tmp_path, scale):
    """TRL's real _generate_and_score_completions (fixed random rewards, NaN for an unscorable row) gives
    the advantages of lk.group_advantages with TRL's conventions."""
    trainer = make_trainer(tmp_path, always_wrong, advantage_estimator="grpo", scale_rewards=scale)
    g = torch.Generator().manual_seed(11)
    fixed = torch.randn(8, 1, generator=g)
    fixed[3] = torch.nan
    trainer._calculate_rewards = lambda *a, **k: fixed.clone()
    trainer.model.train()
    inputs = [{"prompt": p} for p in ["1+2=", "1+2=", "1+2=", "1+2=", "3+4=", "3+4=", "3+4=", "3+4="]]
    trainer.args.per_device_train_batch_size = 8
    out = trainer._generate_and_score_completions(inputs)
    want, _ = lk.group_advantages(fixed[:, 0], group_size=4, scale=scale, eps=1e-4, nan_rewards="zero_advantage",
                                  estimator="grpo")
    assert out["advantages"].abs().sum() > 0
    assert_close(out["advantages"], want)


@pytest.mark.slow
def test_lens_grpo_trainer_trains_three_steps(tmp_path):
    trainer = make_trainer(tmp_path, first_wrong_group)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert result.global_step == 3
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
    assert changed > 0
    logged = [h for h in trainer.state.log_history if "lens/frac_negative_groups" in h]
    assert logged and all(0.0 <= h["lens/frac_negative_groups"] <= 1.0 for h in logged)
    assert any(h["lens/frac_negative_groups"] > 0 for h in logged)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


# ----- fused_loss_head: the loss from the logits or the hidden states, on a real tiny model ---------
def fused_case_inputs(seed, vocab, beta):
    g = torch.Generator().manual_seed(seed)
    prompt_len, completion_len = 3, 5
    prompt_ids = torch.randint(2, vocab, (B, prompt_len), generator=g)
    prompt_mask = torch.ones(B, prompt_len)
    prompt_mask[1, 0] = prompt_mask[2, :2] = 0.0  # left padding, as TRL's tokenizer pads prompts
    completion_ids = torch.randint(2, vocab, (B, completion_len), generator=g)
    completion_mask = (torch.arange(completion_len) < torch.tensor([5, 3, 1, 4, 2, 5]).unsqueeze(1)).float()
    completion_mask[5] = 0.0  # a fully masked completion
    old = -torch.rand(B, completion_len, generator=g) * 3 - 0.1
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
              "old_per_token_logps": old, "num_items_in_batch": completion_mask.sum() * 2}
    if beta:
        inputs["ref_per_token_logps"] = old + 0.2 * torch.randn(B, completion_len, generator=g)
    return inputs


def fused_case_loss(cls, accelerator, model, inputs, loss_type, beta, temperature, fused, bias_kl=False):
    tr = bare_trainer(cls, accelerator, loss_type, "token", beta, False, bias_kl=bias_kl)
    tr.model, tr.temperature = model, temperature
    tr.args.fused_loss_head = fused
    model.zero_grad(set_to_none=True)
    loss = tr._compute_loss(model, dict(inputs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", ("logits", "hidden"))
@pytest.mark.parametrize("loss_type,beta,temperature,bias_kl", (("grpo", 0.0, 1.0, False), ("dapo", 0.04, 0.7, False),
                                                                ("bnpo", 0.04, 1.0, False), ("grpo", 0.04, 0.7, True),
                                                                ("dapo", 0.04, 1.0, True)))
def test_fused_loss_head_matches_default_path(accelerator, fused, loss_type, beta, temperature, bias_kl):
    """The fused loss head gives TRL's loss and parameter gradients (TRL's own log-prob pass, with the
    fused LM head TRL installs on the model), in fp32; also with TRL's bias-corrected KL."""
    model, _ = load_example().tiny_model_and_tokenizer(seed=1)
    model.train()
    trl.trainer.utils.add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    inputs = fused_case_inputs(stable_seed(fused, loss_type) % 1000, model.config.vocab_size, beta)
    case = (loss_type, beta, temperature)
    want = fused_case_loss(GRPOTrainer, accelerator, model, inputs, *case, None, bias_kl)
    default = fused_case_loss(LensGRPOTrainer, accelerator, model, inputs, *case, None, bias_kl)
    got = fused_case_loss(LensGRPOTrainer, accelerator, model, inputs, *case, fused, bias_kl)
    assert torch.isfinite(got[0]) and sorted(got[1]) == sorted(want[1])
    assert sum(float(g.abs().sum()) for g in want[1].values()) > 0
    for other in (default, want):
        assert_close(got[0], other[0])
        for name in want[1]:
            assert_close(got[1][name], other[1][name])


# ----- the one-call LENS step (lk.lens_policy_loss_from_*) when its preconditions hold --------------
from lens_kernels.integrations.trl import fused_step_blocker, group_shuffle  # noqa: E402


def fused_step_log(trainer):
    return [h["lens/fused_step"] for h in trainer.state.log_history if "lens/fused_step" in h]


def groups_of_mixed_kinds(completions, **kwargs):
    """Binary rewards: group 0 all wrong, group 1 mixed (groups of 4 in TRL's order)."""
    return [float(i >= 4 and i % 2 == 0) for i in range(len(completions))]


@pytest.mark.slow
def test_fused_lens_step_trains_and_matches_two_stage_training(tmp_path):
    """One process, steps_per_generation=1, on-policy: every step takes the fused op, and two SGD steps
    give the weights of the two-stage path (forced old-log-prob pass + group_advantages + policy_loss)."""
    common = dict(per_device_train_batch_size=8, max_steps=2, optim="sgd", learning_rate=0.5)
    fused = make_trainer(tmp_path / "fused", groups_of_mixed_kinds, **common)
    before = [p.detach().clone() for p in fused.model.parameters()]
    fused.train()  # build and train one after the other: each starts from the seed
    two_stage = make_trainer(tmp_path / "two", groups_of_mixed_kinds, lens_fused_step=False, **common)
    two_stage.train()
    assert fused_step_log(fused) == [1.0, 1.0] and fused_step_log(two_stage) == [0.0, 0.0]
    assert any(not torch.equal(a, b) for a, b in zip(before, fused.model.parameters()))
    for a, b in zip(fused.model.parameters(), two_stage.model.parameters()):
        assert_close(a.detach(), b.detach())
    rows = [[h for h in t.state.log_history if "loss" in h] for t in (fused, two_stage)]
    for got, want in zip(*rows):
        for name in ("loss", "entropy", "lens/frac_negative_groups", "lens/frac_mixed_groups",
                     "lens/mean_abs_adv_mixed"):
            assert got[name] == pytest.approx(want[name], abs=1e-6), name
    assert rows[0][0]["lens/frac_negative_groups"] == pytest.approx(0.5)


@pytest.mark.slow
def test_partial_groups_take_the_two_stage_path(tmp_path):
    """per_device_train_batch_size=2 with groups of 4 (micro-batches of 2 from a shuffled group of 4):
    fused_step 0, LENS still on."""
    trainer = make_trainer(tmp_path, groups_of_mixed_kinds, per_device_train_batch_size=2, num_generations=4,
                           steps_per_generation=2, gradient_accumulation_steps=2, max_steps=1)
    trainer.train()
    assert fused_step_log(trainer) == [0.0]
    assert any("lens/frac_negative_groups" in h for h in trainer.state.log_history)


def generated_batch(trainer, rewards, fused_step):
    """TRL's real _generate_and_score_completions on fixed rewards, with the same sampling seed."""
    trainer.args.lens_fused_step = fused_step

    def fixed_rewards(*args, **kwargs):  # the adapter's _calculate_rewards keeps what it returns
        trainer._lens_rewards_per_func = rewards.clone()
        return rewards.clone()

    trainer._calculate_rewards = fixed_rewards
    trainer.model.train()
    torch.manual_seed(5)
    prompts = ["1+2="] * 4 + ["3+4="] * 4 + ["5+1="] * 4
    return trainer._generate_and_score_completions([{"prompt": p} for p in prompts])


@pytest.mark.slow
@pytest.mark.parametrize("head,loss_type,entropy_coef,scale", ((None, "grpo", 0.0, "group"),
                                                                ("logits", "dapo", 0.0, "none"),
                                                                ("hidden", "bnpo", 0.01, "group")))
def test_fused_step_loss_and_gradients_match_two_stage(tmp_path, head, loss_type, entropy_coef, scale):
    """One micro-batch through both paths of the real trainer, fp32 to 1e-6: the fused op's advantages
    (NaN reward -> 0) and its loss and parameter gradients equal the two-stage path's, on a shuffled batch."""
    trainer = make_trainer(tmp_path, always_wrong, per_device_train_batch_size=12, loss_type=loss_type,
                           entropy_coef=entropy_coef, scale_rewards=scale, fused_loss_head=head)
    trainer.current_gradient_accumulation_steps = 1
    rewards = torch.tensor([0., 0, 0, 0, 1, 0, 1, 1, 0, 1, float("nan"), 0]).unsqueeze(1)
    two_stage, fused = generated_batch(trainer, rewards, False), generated_batch(trainer, rewards, True)
    assert torch.equal(two_stage["completion_ids"], fused["completion_ids"])
    assert "lens_rewards" in fused and "lens_rewards" not in two_stage and "old_per_token_logps" not in fused
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    results = []
    for batch in (two_stage, {k: v[perm] if torch.is_tensor(v) and v.ndim else v for k, v in fused.items()}):
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                        if p.grad is not None}))
    assert trainer._metrics["train"]["lens/fused_step"][-2:] == [0.0, 1.0]
    (want_loss, want_grads), (got_loss, got_grads) = results
    assert torch.isfinite(got_loss) and sorted(got_grads) == sorted(want_grads)
    assert sum(float(g.abs().sum()) for g in want_grads.values()) > 0
    assert_close(got_loss, want_loss)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name])
    stats = trainer._metrics["train"]["lens/frac_mixed_groups"]
    assert stats[-1] == pytest.approx(stats[0]) == pytest.approx(2 / 3)


def test_fused_step_blocker_names_each_precondition(accelerator):
    def ready():
        tr = bare_trainer(LensGRPOTrainer, accelerator, "grpo", "token", 0.0, False)
        tr.args.advantage_estimator, tr.scale_rewards = "lens", "group"
        tr.args.per_device_train_batch_size, tr.args.per_device_eval_batch_size = 8, 4
        tr.num_generations, tr.num_generations_eval = 4, 2
        return tr

    tr = ready()
    prompts = ["a"] * 4 + ["b"] * 4
    assert fused_step_blocker(tr, {}, "train", prompts) is None
    # accumulation (steps_per_generation > 1), several processes and TRL's default bias-corrected KL
    # keep the one-call step: micro-batches hold whole groups
    tr.args.steps_per_generation, tr.beta, tr.args.use_bias_correction_kl = 4, 0.04, True
    tr.accelerator = types.SimpleNamespace(num_processes=2, process_index=1)
    assert fused_step_blocker(tr, {}, "train", prompts) is None
    cases = [("advantage_estimator", lambda t: setattr(t.args, "advantage_estimator", "dr_grpo"), {}, None),
             ("lens_fused_step", lambda t: setattr(t.args, "lens_fused_step", False), {}, None),
             ("off-policy", lambda t: None, {"old_per_token_logps": torch.zeros(1)}, None),
             ("scale_rewards", lambda t: setattr(t, "scale_rewards", "batch"), {}, None),
             ("multiple of the group size", lambda t: setattr(t.args, "per_device_train_batch_size", 6), {}, None),
             ("whole groups", lambda t: None, {}, ["a"] * 3 + ["b"] * 5),
             ("top_entropy_quantile", lambda t: setattr(t, "top_entropy_quantile", 0.5), {}, None),
             ("aux loss", lambda t: setattr(t, "aux_loss_enabled", True), {}, None),
             ("multimodal", lambda t: None, {"pixel_values": torch.zeros(1)}, None)]
    for match, breaks, output, rows in cases:
        broken = ready()
        breaks(broken)
        assert match in (fused_step_blocker(broken, output, "train", rows) or ""), match
    # an eval batch is checked against the eval batch size and group size
    assert fused_step_blocker(ready(), {}, "eval", ["a", "a", "b", "b"]) is None
    broken = ready()
    broken.num_generations_eval = 3
    assert "multiple of the group size" in fused_step_blocker(broken, {}, "eval")


def test_group_shuffle_keeps_groups_whole():
    torch.manual_seed(0)
    batch = {"x": torch.arange(12) * 10, "ids": torch.arange(12) // 4, "names": [f"n{i}" for i in range(12)],
             "scalar": torch.tensor(3.0), "none": None}
    out = group_shuffle(batch, 4)
    assert out["scalar"] is batch["scalar"] and out["none"] is None
    assert sorted(out["x"].tolist()) == batch["x"].tolist()
    for chunk in out["ids"].split(4):
        assert len(set(chunk.tolist())) == 1
    assert out["names"] == [f"n{i}" for i in (out["x"] // 10).tolist()]


def test_graded_reward_config_is_checked():
    with pytest.raises(ValueError, match="advantage_estimator='lens'"):
        LensGRPOConfig(output_dir="unused", lens_correct_threshold=1.0, report_to=[], use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="lens_correct_threshold must be a number"):
        LensGRPOConfig(output_dir="unused", advantage_estimator="lens", lens_correct_threshold="1", report_to=[],
                       use_cpu=True, bf16=False)


# ----- graded rewards, the completions log and gradient accumulation on the real trainer ------------
def accuracy(completions, **kwargs):
    return [0.0] * len(completions)


def format_reward(completions, **kwargs):
    return [0.0] * len(completions)


def graded_rewards():
    """[12, 2]: an accuracy verifier (1 correct, partial credit 0.5, DAPO-style -1 wrong) and a format
    reward, in groups of 4: group 0 has no correct answer, group 1 and 2 are mixed."""
    accuracy = torch.tensor([-1.0, 0.5, -1, 0.5, 1, -1, 1, 0.5, 1, 1, -1, 0.5])
    fmt = torch.tensor([0.2, 0.0, 0.1, 0.2, 0.2, 0.0, 0.1, 0.2, 0.0, 0.2, 0.1, 0.0])
    return torch.stack([accuracy, fmt], dim=1)


@pytest.mark.slow
def test_graded_rewards_need_a_verifier_and_use_it(tmp_path):
    """Two reward functions with weights and non-binary values: with lens_correct_reward_func the advantages are group_advantages(total
    weighted reward, correct=accuracy >= 1), on both paths, and the completions log shows them."""
    rewards = graded_rewards()
    with pytest.raises(ValueError, match="is not one of the reward functions"):
        make_trainer(tmp_path, [accuracy, format_reward], lens_correct_reward_func="acc")
    trainer = make_trainer(tmp_path, [accuracy, format_reward], per_device_train_batch_size=12,
                           reward_weights=[1.0, 0.5], lens_correct_reward_func="accuracy")
    trainer.current_gradient_accumulation_steps = 1
    total = rewards[:, 0] + 0.5 * rewards[:, 1]
    correct = rewards[:, 0] >= 1.0
    two_stage = generated_batch(trainer, rewards, False)
    logged = list(trainer._logs["advantages"])
    mask = two_stage["completion_mask"]
    old = trainer._old_logps_for_lens(two_stage, "train")
    want, stats = lk.group_advantages(total, group_size=4, estimator="lens", old_logps=old, mask=mask, correct=correct,
                                      eps=1e-4, nan_rewards="zero_advantage")
    assert stats["frac_negative_groups"] == pytest.approx(1 / 3) and want[:4].abs().min() > 0
    assert_close(two_stage["advantages"], want)
    assert logged == pytest.approx(want.tolist(), abs=1e-6)  # what is trained, not TRL's GRPO advantages
    fused = generated_batch(trainer, rewards, True)
    assert torch.equal(fused["lens_correct"], correct)
    trainer._compute_loss(trainer.model, fused)
    assert list(trainer._logs["advantages"]) == pytest.approx(want.tolist(), abs=1e-6)
    # a threshold on the total weighted reward instead of a verifier
    trainer.args.lens_correct_reward_func, trainer._lens_correct_index = None, None
    trainer.args.lens_correct_threshold = 1.0
    assert torch.equal(trainer.lens_correct(rewards, total), total >= 1.0)


@pytest.mark.slow
def test_completions_log_shows_the_trained_advantages(tmp_path):
    """An all-wrong group: TRL logs GRPO's zeros, the adapter logs the LENS advantages it trains on,
    on the two-stage path and on the one-call path (written back from shuffled micro-batches)."""
    trainer = make_trainer(tmp_path, always_wrong, per_device_train_batch_size=12)
    trainer.current_gradient_accumulation_steps = 1
    rewards = torch.tensor([0., 0, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0]).unsqueeze(1)
    two_stage = generated_batch(trainer, rewards, False)
    want = two_stage["advantages"]
    assert want[:4].abs().min() > 0 and list(trainer._logs["advantages"]) == pytest.approx(want.tolist(), abs=1e-6)
    fused = generated_batch(trainer, rewards, True)
    assert list(trainer._logs["advantages"])[:4] == [0.0] * 4  # TRL's GRPO values until the loss runs
    # micro-batches of whole groups, as the adapter's group shuffle makes them
    order = torch.cat([torch.arange(8, 12), torch.arange(0, 8)])
    for rows in (order[:4], order[4:]):
        trainer._compute_loss(trainer.model, {k: v[rows] if torch.is_tensor(v) and v.ndim else v
                                              for k, v in fused.items()})
    assert list(trainer._logs["advantages"]) == pytest.approx(want.tolist(), abs=1e-6)


@pytest.mark.slow
def test_accumulation_keeps_the_one_call_step_without_an_extra_forward(tmp_path):
    """TRL's default accumulation (steps_per_generation = gradient_accumulation_steps = 2): the one-call
    step runs on every micro-batch (groups kept whole by the group shuffle), with no extra no-grad
    forward, and one optimizer step gives the weights of the two-stage path (which makes that forward)."""
    common = dict(per_device_train_batch_size=4, num_generations=4, gradient_accumulation_steps=2, max_steps=1,
                  optim="sgd", learning_rate=0.5)
    runs = {}
    for name, fused_step in (("fused", True), ("two", False)):
        trainer = make_trainer(tmp_path / name, groups_of_mixed_kinds, lens_fused_step=fused_step, **common)
        assert trainer.args.steps_per_generation == 2
        calls = []
        real = trainer._old_logps_for_lens
        trainer._old_logps_for_lens = lambda *a, **k: calls.append(1) or real(*a, **k)
        trainer.train()
        runs[name] = (trainer, len(calls))
    (fused, fused_calls), (two, two_calls) = runs["fused"], runs["two"]
    assert fused_calls == 0 and two_calls == 1
    assert fused_step_log(fused) == [1.0] and fused_step_log(two) == [0.0]
    for a, b in zip(fused.model.parameters(), two.model.parameters()):
        assert_close(a.detach(), b.detach())
    got, want = ([h for h in t.state.log_history if "loss" in h][0] for t in (fused, two))
    for name in ("loss", "lens/frac_negative_groups", "lens/frac_mixed_groups"):
        assert got[name] == pytest.approx(want[name], abs=1e-6), name


@pytest.mark.slow
def test_example_trl_runs(tmp_path):
    """The TRL recipe as shipped (python/example_trl.py, linked from docs/trl.md) trains on CPU."""
    trainer = load_example().main(output_dir=str(tmp_path), max_steps=1)
    assert trainer.state.global_step == 1
    assert any("lens/frac_negative_groups" in h for h in trainer.state.log_history)


# ----- what a user of the real trainer sees: refusals, warnings, logs -----------------------------
@pytest.mark.slow
def test_several_rewards_or_a_weight_refuse_to_build_without_saying_what_is_correct(tmp_path):
    """The summed reward must not silently decide correctness: two reward functions, or one with a
    weight other than 1, and no lens_correct_* option is refused when the trainer is built, with the
    option to set; naming the verifier or a threshold builds."""
    for funcs, extra, said in (([accuracy, format_reward], {}, "2 reward functions"),
                               ([accuracy], {"reward_weights": [2.0]}, "reward weight 2")):
        with pytest.raises(ValueError, match="lens_correct_reward_func='accuracy'") as info:
            make_trainer(tmp_path, funcs, **extra)
        assert said in str(info.value) and "lens_correct_threshold" in str(info.value)
    make_trainer(tmp_path, [accuracy, format_reward], lens_correct_reward_func="accuracy")
    make_trainer(tmp_path, [accuracy], reward_weights=[2.0], lens_correct_threshold=2.0)
    make_trainer(tmp_path, [accuracy, format_reward], advantage_estimator="grpo")  # TRL's own estimator: no check


def half_credit(completions, **kwargs):
    return [0.5] * len(completions)


@pytest.mark.slow
def test_binary_reward_error_leads_with_the_trainer_option(tmp_path):
    """A graded reward with no lens_correct_* option: the first step fails, and the message starts with
    the LensGRPOConfig options (the core API's correct= is not something a trainer user passes)."""
    trainer = make_trainer(tmp_path, half_credit, max_steps=1)
    with pytest.raises(ValueError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("LENS needs to know which completions are correct: set LensGRPOConfig("
                              "lens_correct_reward_func=")
    assert "rewards[0] = 0.5" in message and "correct=" not in message.replace("lens_correct_", "")


def lens_warnings(record):
    return [str(w.message) for w in record if "two-stage path" in str(w.message)]


@pytest.mark.slow
@pytest.mark.parametrize("options,named,cost", (
    (dict(steps_per_generation=2, gradient_accumulation_steps=1), "steps_per_generation=2", "TRL's own"),
    (dict(num_iterations=2), "num_iterations=2", "TRL's own"),
    (dict(scale_rewards="batch"), "scale_rewards='batch'", "one extra no-grad forward")))
def test_two_stage_fallback_warns_once_and_logs_group_stats_every_step(tmp_path, options, named, cost):
    """Each setting that leaves the one-call step warns once, naming the option and the cost; every
    logged step (also those that train on a buffered generation) has the lens/ group statistics."""
    trainer = make_trainer(tmp_path, groups_of_mixed_kinds, max_steps=4, **options)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    found = lens_warnings(record)
    assert len(found) == 1 and named in found[0] and cost in found[0], found
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert len(rows) == 4 and all(h["lens/fused_step"] == 0.0 for h in rows)
    for name in ("frac_negative_groups", "frac_mixed_groups", "mean_abs_adv_negative", "mean_confidence_negative"):
        assert all(f"lens/{name}" in h for h in rows), name
    assert all(0.0 < h["lens/mean_confidence_negative"] < 1.0 for h in rows if h["lens/frac_negative_groups"] > 0)


@pytest.mark.slow
def test_one_call_step_does_not_warn(tmp_path):
    trainer = make_trainer(tmp_path, groups_of_mixed_kinds, max_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    assert lens_warnings(record) == [] and fused_step_log(trainer) == [1.0]


@pytest.mark.slow
@pytest.mark.parametrize("fused_step", (False, True))
def test_completions_table_shows_the_lens_signal(tmp_path, fused_step):
    """TRL prints advantages to 2 decimals (the ~1e-3 LENS advantages of an all-wrong group read 0.00):
    the table's lens_advantage column has 3 significant digits, lens_confidence each completion's
    confidence, and lens/mean_confidence_negative the all-wrong groups' mean confidence."""
    trainer = make_trainer(tmp_path, always_wrong, per_device_train_batch_size=12)
    trainer.current_gradient_accumulation_steps = 1
    rewards = torch.tensor([0., 0, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0]).unsqueeze(1)
    batch = generated_batch(trainer, rewards, fused_step)
    if fused_step:
        trainer._compute_loss(trainer.model, batch)
    old = trainer._old_logps_for_lens(batch, "train")
    want, stats = lk.group_advantages(rewards[:, 0], group_size=4, estimator="lens", old_logps=old,
                                      mask=batch["completion_mask"], eps=1e-4, nan_rewards="zero_advantage")
    assert 0 < want[:4].abs().max() < 0.02  # 0.00 or 0.01 at TRL's 2 decimals
    extra = trainer._logs["extra"]
    assert list(extra["lens_advantage"]) == [f"{a:.3g}" for a in want.tolist()]
    assert all(float(v) != 0.0 for v in list(extra["lens_advantage"])[:4])
    confidence = [float(v) for v in extra["lens_confidence"]]
    assert confidence == pytest.approx(stats["confidence"].tolist(), abs=1e-4)
    if not fused_step:  # logged with the loss of every micro-batch
        trainer._compute_loss(trainer.model, batch)
    logged = trainer._metrics["train"]
    assert logged["lens/mean_confidence_negative"][-1] == pytest.approx(sum(confidence[:4]) / 4, abs=1e-4)
    assert logged["lens/mean_abs_adv_negative"][-1] == pytest.approx(float(want[:4].abs().mean()), rel=1e-4)


@pytest.mark.slow
def test_completions_table_is_written_with_the_lens_columns(tmp_path):
    """log_completions=True on the real trainer: TRL's table (its parquet file) carries the columns."""
    import pandas

    trainer = make_trainer(tmp_path, groups_of_mixed_kinds, max_steps=1, log_completions=True)
    trainer.train()
    table = pandas.read_parquet(next((tmp_path / "completions").glob("*.parquet")))
    assert {"lens_advantage", "lens_confidence", "advantage"} <= set(table.columns)
    assert [f"{a:.3g}" for a in table["advantage"]] == list(table["lens_advantage"])


def test_docs_recipe_is_the_example():
    """docs/trl.md's recipe block is, line for line, the example that test_example_trl_runs and CI's
    docs run execute (so the recipe as written is the one that trains)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    recipe = re.findall(r"```python\n(.*?)```", (root / "docs" / "trl.md").read_text(), flags=re.S)
    example = [line.strip() for line in (root / "python" / "example_trl.py").read_text().splitlines()]
    assert len(recipe) == 1
    lines = [line.strip() for line in recipe[0].splitlines()]
    assert any(example[i:i + len(lines)] == lines for i in range(len(example))), "docs/trl.md recipe != example"
    assert 'lens_correct_reward_func="accuracy"' in recipe[0] and "reward_funcs=[accuracy, format_reward]" in recipe[0]
