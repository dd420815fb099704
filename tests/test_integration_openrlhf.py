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
import zlib

import pytest
import torch

openrlhf = pytest.importorskip("openrlhf", reason="OpenRLHF is not installed (see requirements-integrations.txt)")
pytest.importorskip("deepspeed", reason="openrlhf.models.utils imports deepspeed (see requirements-integrations.txt)")
pytest.importorskip("ray", reason="OpenRLHF's experience_maker imports ray (see requirements-integrations.txt)")


def load_loss_module():
    try:
        return importlib.import_module("openrlhf.models.loss")
    except ImportError:  # the package __init__ needs flash-attn: load the submodules from the real path
        sys.modules["openrlhf.models"] = package_without_init("openrlhf.models", "models")
        return importlib.import_module("openrlhf.models.loss")


def package_without_init(name, *parts):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(os.path.dirname(openrlhf.__file__), *parts)]
    return package


def load_experience_maker_module():
    name = "openrlhf.trainer.ppo_utils.experience_maker"
    try:
        return importlib.import_module(name)
    except ImportError:  # the Ray launcher pulls flash-attn and vLLM: see the module docstring
        pass
    launcher = types.ModuleType("openrlhf.trainer.ray.launcher")
    launcher.RayActorGroup = type("RayActorGroup", (), {})
    stand_ins = {"openrlhf.trainer.ray": package_without_init("openrlhf.trainer.ray", "trainer", "ray"),
                 launcher.__name__: launcher}
    saved = {key: sys.modules.get(key) for key in stand_ins}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module(name)
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


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
    lp, old, adv, mask = make_batch(zlib.crc32(repr((loss_type, dual_clip, token_level)).encode()) % 997)
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


def test_lens_advantages_match_group_advantages(patched):
    maker = maker_module.RemoteExperienceMaker
    experiences = make_experiences(21, binary=True)
    rewards = torch.empty(N_SAMPLES * PROMPTS)
    width = max(EXPERIENCE_WIDTHS)
    old_logps, mask = torch.zeros(len(rewards), width), torch.zeros(len(rewards), width)
    for e in experiences:
        rewards[e.index] = e.rewards
        old_logps[e.index, :e.action_mask.size(1)] = e.action_log_probs
        mask[e.index, :e.action_mask.size(1)] = e.action_mask.float()
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
