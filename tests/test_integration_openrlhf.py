"""Parity of the OpenRLHF adapter with OpenRLHF's installed ``PolicyLoss`` (ppo and gspo), fp32, 1e-6.

OpenRLHF's ``openrlhf.models`` package __init__ imports flash-attn (no CPU install), so the test loads
the real ``openrlhf.models.loss`` module (and the ``utils`` it imports) without running that __init__;
no code on the compared path is replaced. ``openrlhf.models.utils`` imports deepspeed at the top."""
import importlib
import os
import sys
import types
import warnings

import pytest
import torch

openrlhf = pytest.importorskip("openrlhf", reason="OpenRLHF is not installed (see requirements-integrations.txt)")
pytest.importorskip("deepspeed", reason="openrlhf.models.utils imports deepspeed (see requirements-integrations.txt)")


def load_loss_module():
    try:
        return importlib.import_module("openrlhf.models.loss")
    except ImportError:  # the package __init__ needs flash-attn: load the submodules from the real path
        package = types.ModuleType("openrlhf.models")
        package.__path__ = [os.path.join(os.path.dirname(openrlhf.__file__), "models")]
        sys.modules["openrlhf.models"] = package
        return importlib.import_module("openrlhf.models.loss")


loss_module = load_loss_module()
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
    cls = lk_openrlhf.patch()
    yield original, cls
    lk_openrlhf.unpatch()
    assert loss_module.PolicyLoss is original


@pytest.mark.parametrize("loss_type", ("ppo", "gspo"))
@pytest.mark.parametrize("dual_clip", (None, 3.0))
@pytest.mark.parametrize("token_level", (True, False))
@pytest.mark.parametrize("globals_", ({}, {"dp_size": 2, "batch_num_tokens": 40.0, "global_batch_size": 9.0}))
def test_policy_loss_parity(patched, loss_type, dual_clip, token_level, globals_):
    original, cls = patched
    assert loss_module.PolicyLoss is cls and issubclass(cls, original)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level,
              policy_loss_type=loss_type)
    lp, old, adv, mask = make_batch(hash((loss_type, dual_clip, token_level)) % 997)
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
