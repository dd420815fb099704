"""Parity of the OpenRLHF adapter with OpenRLHF's installed code, fp32, 1e-6: ``PolicyLoss`` (ppo and
gspo) and ``RemoteExperienceMaker.compute_advantages_and_returns`` (group_norm; LENS against
``lk.group_advantages``).

OpenRLHF's ``openrlhf.models`` package __init__ imports flash-attn (no CPU install), so the test loads
the real ``openrlhf.models.loss`` module (and the ``utils`` it imports) without running that __init__;
no code on the compared path is replaced. ``openrlhf.models.utils`` imports deepspeed at the top.

``experience_maker`` imports ``RayActorGroup`` from ``openrlhf.trainer.ray.launcher``, only to annotate
``RemoteExperienceMaker.__init__`` (not called here); that launcher imports ``openrlhf.models``' Actor
(flash-attn) and its package __init__ imports vLLM. While the real ``experience_maker`` module loads,
the test puts in ``sys.modules`` the ``openrlhf.trainer.ray`` package without its __init__ and a
launcher module that holds only an empty ``RayActorGroup`` class, then removes both. Everything on the
compared path (``compute_advantages_and_returns``, ``apply_length_penalties``, ``compute_reward``,
``get_cumulative_returns``, ``Experience``) is OpenRLHF's real code."""
import importlib
import os
import sys
import types
import warnings

import pytest
import torch
from seeds import stable_seed

openrlhf = pytest.importorskip("openrlhf", reason="OpenRLHF is not installed (see requirements-integrations.txt)")
pytest.importorskip("deepspeed", reason="openrlhf.models.utils imports deepspeed (see requirements-integrations.txt)")
pytest.importorskip("ray", reason="OpenRLHF's experience_maker imports ray (see requirements-integrations.txt)")


from _openrlhf_cpu import load_experience_maker_module, load_loss_module  # noqa: E402

loss_module = load_loss_module()
maker_module = load_experience_maker_module()
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402
import lens_kernels as lk  # noqa: E402
from lens_kernels.integrations import openrlhf as lk_openrlhf  # noqa: E402

B, T = 6, 8


def make_batch(seed):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3 - 0.05
    old = lp + 0.4 * torch.randn(B, T, generator=g)
    old[1, 2] = lp[1, 2] + 25.0  # beyond the +-20 clamp of the ppo loss
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[0] = 0.0
    mask[1, 2] = 1.0
    return lp, old, adv, mask


def run(module, lp, old, adv, mask, **kw):
    x = lp.clone().requires_grad_(True)
    out = module(x, old, adv, mask, **kw)
    (g,) = torch.autograd.grad(out[0], x)
    return out, g


@pytest.fixture
def patched():
    original = loss_module.PolicyLoss
    maker = maker_module.RemoteExperienceMaker
    original_method = maker.compute_advantages_and_returns
    cls = lk_openrlhf.patch()
    yield original, cls
    lk_openrlhf.unpatch()
    assert loss_module.PolicyLoss is original
    assert maker.compute_advantages_and_returns is original_method


@pytest.mark.parametrize("loss_type", ("ppo", "gspo"))
@pytest.mark.parametrize("dual_clip", (None, 3.0))
@pytest.mark.parametrize("token_level", (True, False))
@pytest.mark.parametrize("globals_", ({}, {"dp_size": 2, "batch_num_tokens": 40.0, "global_batch_size": 9.0}))
def test_policy_loss_parity(patched, loss_type, dual_clip, token_level, globals_):
    original, cls = patched
    assert loss_module.PolicyLoss is cls and issubclass(cls, original)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level,
              policy_loss_type=loss_type)
    lp, old, adv, mask = make_batch(stable_seed(loss_type, dual_clip, token_level) % 997)
    want, g_want = run(original(**kw), lp, old, adv, mask, **globals_)
    got, g_got = run(cls(**kw), lp, old, adv, mask, **globals_)
    assert g_want.abs().sum() > 0
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got[1:3], want[1:3]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-6, atol=1e-6)
    assert got[3] is None and want[3] is None and got[4] is None and want[4] is None


def test_is_correction_falls_back_with_one_warning(patched):
    original, cls = patched
    kw = dict(is_correction_level="token", is_correction_mode="mask")
    lp, old, adv, mask = make_batch(1)
    rollout = old + 0.05
    with pytest.warns(UserWarning, match="IS correction"):
        got, _ = run(cls(**kw), lp, old, adv, mask, rollout_log_probs=rollout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(cls(**kw), lp, old, adv, mask, rollout_log_probs=rollout)
    want, _ = run(original(**kw), lp, old, adv, mask, rollout_log_probs=rollout)
    torch.testing.assert_close(got[0], want[0])


# ----- group normalization: RemoteExperienceMaker.compute_advantages_and_returns -----------------
N_SAMPLES, PROMPTS = 4, 3
EXPERIENCE_SIZES, EXPERIENCE_WIDTHS = (5, 4, 3), (6, 8, 5)


def make_experiences(seed, binary):
    """Experiences (OpenRLHF's dataclass) holding a shuffled rollout batch of PROMPTS x N_SAMPLES."""
    g = torch.Generator().manual_seed(seed)
    n = N_SAMPLES * PROMPTS
    if binary:
        rewards = (torch.rand(n, generator=g) > 0.5).float()
        rewards[:N_SAMPLES] = 0.0  # a negative group: group_norm gives it 0, LENS does not
    else:
        rewards = torch.randn(n, generator=g)
        rewards[N_SAMPLES:2 * N_SAMPLES] = 1.0  # a zero-std group
    order = torch.randperm(n, generator=g).tolist()
    experiences, start = [], 0
    for size, width in zip(EXPERIENCE_SIZES, EXPERIENCE_WIDTHS):
        index = order[start:start + size]
        start += size
        lengths = torch.randint(1, width + 1, (size,), generator=g)
        mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
        experiences.append(maker_module.Experience(
            action_mask=mask, action_log_probs=-torch.rand(size, width, generator=g) * 2 - 0.01,
            kl=0.1 * torch.randn(size, width, generator=g) * mask, rewards=rewards[index].clone(),
            response_length=lengths.float(), index=index, info={}))
    return experiences


def make_maker(estimator, gamma=1.0, overlong=None):
    advantage = types.SimpleNamespace(estimator=estimator, gamma=gamma, lambd=1.0, no_std_norm=False)
    args = types.SimpleNamespace(
        algo=types.SimpleNamespace(advantage=advantage),
        rollout=types.SimpleNamespace(n_samples_per_prompt=N_SAMPLES, max_new_tokens=8),
        reward=types.SimpleNamespace(clip_range=(-3.0, 3.0), overlong_buffer_len=overlong,
                                     overlong_penalty_factor=0.5, stop_properly_penalty_coef=None),
        data=types.SimpleNamespace(max_len=8))
    maker = types.SimpleNamespace(strategy=types.SimpleNamespace(args=args), args=args,
                                  advantage_estimator=estimator, kl_ctl=FixedKLController(0.05))
    maker.get_cumulative_returns = maker_module.RemoteExperienceMaker.get_cumulative_returns.__get__(maker)
    return maker


def compute(method, estimator, experiences, **kw):
    return method(make_maker(estimator, **kw), experiences)


@pytest.mark.parametrize("binary", (False, True))
@pytest.mark.parametrize("overlong,gamma", ((None, 1.0), (3, 1.0), (None, 0.9)))
def test_group_norm_parity(patched, binary, overlong, gamma):
    maker = maker_module.RemoteExperienceMaker
    original = lk_openrlhf._method_originals[maker]
    patched_method = maker.compute_advantages_and_returns
    assert patched_method is not original
    seed = 3 * binary + (overlong or 0) + int(10 * gamma)
    want = compute(original, "group_norm", make_experiences(seed, binary), gamma=gamma, overlong=overlong)
    got = compute(patched_method, "group_norm", make_experiences(seed, binary), gamma=gamma, overlong=overlong)
    assert sum(float(e.advantages.abs().sum()) for e in want) > 0
    for a, b in zip(got, want):
        for name in ("advantages", "returns", "rewards"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-6)
        assert a.kl is None and b.kl is None
        assert sorted(a.info) == sorted(b.info)
        for key in b.info:
            torch.testing.assert_close(a.info[key], b.info[key], rtol=1e-6, atol=1e-6)


def flat_batch(experiences):
    """(rewards [N], old log-probs [N, width], action mask [N, width]) of the experiences, in sample
    order and right-padded: the inputs lk.group_advantages sees for the same batch."""
    rewards = torch.empty(N_SAMPLES * PROMPTS)
    width = max(EXPERIENCE_WIDTHS)
    old_logps, mask = torch.zeros(len(rewards), width), torch.zeros(len(rewards), width)
    for e in experiences:
        rewards[e.index] = e.rewards
        old_logps[e.index, :e.action_mask.size(1)] = e.action_log_probs
        mask[e.index, :e.action_mask.size(1)] = e.action_mask.float()
    return rewards, old_logps, mask


def test_lens_advantages_match_group_advantages(patched):
    maker = maker_module.RemoteExperienceMaker
    experiences = make_experiences(21, binary=True)
    rewards, old_logps, mask = flat_batch(experiences)
    want, _ = lk.group_advantages(rewards, group_size=N_SAMPLES, estimator="lens", old_logps=old_logps, mask=mask,
                                  eps=lk.TRAINER_EPS["openrlhf"], lens_alpha=0.25)
    assert want[:N_SAMPLES].abs().min() > 0  # the negative group is not silent under LENS
    # without KL the per-sample return is exactly the LENS advantage (clipped to reward.clip_range)
    for e in experiences:
        e.kl = torch.zeros_like(e.kl)
    got = compute(maker.compute_advantages_and_returns, "lens", experiences)
    for e in got:
        torch.testing.assert_close(e.advantages[:, 0], want[e.index].clamp(-3.0, 3.0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(e.info["return"], want[e.index].clamp(-3.0, 3.0), rtol=1e-6, atol=1e-6)
        assert e.info["lens_confidence"].shape == (len(e.index),)


def test_other_estimators_run_openrlhf_method(patched):
    maker = maker_module.RemoteExperienceMaker
    original = lk_openrlhf._method_originals[maker]
    for estimator in ("rloo", "reinforce_baseline"):
        want = compute(original, estimator, make_experiences(5, False))
        got = compute(maker.compute_advantages_and_returns, estimator, make_experiences(5, False))
        for a, b in zip(got, want):
            torch.testing.assert_close(a.advantages, b.advantages, rtol=0, atol=0)


def test_lens_graded_rewards_use_the_threshold_before_length_penalties(patched):
    """Graded rewards (+-1 here): without a threshold LENS fails at the first step naming the option;
    with --algo.advantage.lens_correct_threshold the correct mask is reward >= threshold."""
    maker = maker_module.RemoteExperienceMaker
    experiences = make_experiences(22, binary=True)
    for e in experiences:
        e.rewards = e.rewards * 2 - 1  # DAPO-style +-1
        e.kl = torch.zeros_like(e.kl)
    with pytest.raises(ValueError, match="^LENS needs to know which samples are correct: set "
                                         "--algo.advantage.lens_correct_threshold") as info:
        compute(maker.compute_advantages_and_returns, "lens", make_experiences(22, binary=False))
    assert "correct=" not in str(info.value).replace("lens_correct_", "")
    rewards, old_logps, mask = flat_batch(experiences)
    want, stats = lk.group_advantages(rewards, group_size=N_SAMPLES, estimator="lens", old_logps=old_logps, mask=mask,
                                      correct=rewards >= 1.0, eps=lk.TRAINER_EPS["openrlhf"], lens_alpha=0.25)
    assert stats["frac_negative_groups"] > 0
    m = make_maker("lens")
    m.strategy.args.algo.advantage.lens_correct_threshold = 1.0
    got = maker.compute_advantages_and_returns(m, experiences)
    for e in got:
        torch.testing.assert_close(e.advantages[:, 0], want[e.index].clamp(-3.0, 3.0), rtol=1e-6, atol=1e-6)


def test_dynamic_filtering_warns_once_with_lens(patched):
    lk_openrlhf._warned.clear()
    m = make_maker("lens")
    m.strategy.args.algo.dynamic_filtering_enable = True
    with pytest.warns(UserWarning, match="dynamic_filtering_enable"):
        lk_openrlhf.lens_config_warnings(m.strategy.args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk_openrlhf.lens_config_warnings(m.strategy.args)
    lk_openrlhf._warned.clear()


# ----- OpenRLHF's own CLI (openrlhf.cli.train_ppo_ray) through lens_kernels.integrations.openrlhf_cli ----
class _Stop(Exception):
    pass


def docs_cli_args():
    """The arguments of the OpenRLHF recipe in docs/openrlhf.md (after the module name)."""
    import pathlib
    import re
    import shlex

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "openrlhf.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "openrlhf_cli" in b)
    tokens = shlex.split(" ".join(line.rstrip().rstrip("\\") for line in block.splitlines()))
    return tokens[tokens.index("lens_kernels.integrations.openrlhf_cli") + 1:]


def test_openrlhf_cli_accepts_lens_and_sets_the_worker_hook(monkeypatch):
    """OpenRLHF's real train_ppo_ray module runs as __main__ (its parser and checks) with `lens`
    accepted; its ray.init gets the worker setup hook. Its imports that need vLLM / flash-attn are
    stand-ins here (GPU-only), and ray.init stops the run before any actor starts."""
    import ray

    from lens_kernels.integrations import openrlhf_cli

    for name in ("openrlhf.trainer.ray", "openrlhf.trainer.ray.launcher", "openrlhf.trainer.ray.ppo_actor",
                 "openrlhf.trainer.ray.ppo_critic"):
        stub = types.ModuleType(name)
        for attr in ("create_vllm_engines", "RayActorGroup", "ReferenceModelActor", "RewardModelActor",
                     "PolicyModelActor", "CriticModelActor"):
            setattr(stub, attr, type(attr, (), {}))
        monkeypatch.setitem(sys.modules, name, stub)
    seen = {}

    def fake_init(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    argv = ["--actor.model_name_or_path", "unused", "--algo.advantage.estimator", "lens",
            "--algo.advantage.lens_alpha", "0.3", "--algo.advantage.lens_correct_threshold", "1.0",
            "--rollout.n_samples_per_prompt", "4", "--rollout.batch_size", "8", "--rollout.micro_batch_size", "2"]
    try:
        with pytest.raises(_Stop):
            openrlhf_cli.main(argv)
        parsed = openrlhf_cli.last_parsed
        assert getattr(parsed, "algo.advantage.estimator") == "lens"
        assert getattr(parsed, "algo.advantage.lens_alpha") == 0.3
        assert getattr(parsed, "algo.advantage.lens_correct_threshold") == 1.0
        assert seen["runtime_env"]["worker_process_setup_hook"] == openrlhf_cli.SETUP_HOOK
        assert "TOKENIZERS_PARALLELISM" in seen["runtime_env"]["env_vars"]  # OpenRLHF's own env kept
        assert loss_module.PolicyLoss.__name__ == "LensPolicyLoss"  # patched in the driver too
        assert ray.init is fake_init  # restored
        with pytest.raises(SystemExit, match="n_samples_per_prompt"):
            openrlhf_cli.main(argv[:-6] + ["--rollout.n_samples_per_prompt", "1"])
        with pytest.warns(UserWarning, match="dynamic_filtering_enable"), pytest.raises(_Stop):
            openrlhf_cli.main(argv + ["--algo.dynamic_filtering_enable", "--reward.remote_url", "x"])
        docs = docs_cli_args()  # the documented command parses and reaches ray.init with the hook
        seen.clear()
        with pytest.raises(_Stop):
            openrlhf_cli.main(docs)
        assert getattr(openrlhf_cli.last_parsed, "algo.advantage.estimator") == "lens"
        assert getattr(openrlhf_cli.last_parsed, "rollout.n_samples_per_prompt") == 8
        assert seen["runtime_env"]["worker_process_setup_hook"] == openrlhf_cli.SETUP_HOOK
    finally:
        lk_openrlhf.unpatch()
    with pytest.raises(ValueError, match="worker_process_setup_hook"):
        openrlhf_cli.with_setup_hook({"worker_process_setup_hook": "other.hook"})
