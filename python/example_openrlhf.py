"""OpenRLHF's PolicyLoss computed by lens_kernels after patch(), on a random batch.

    python python/example_openrlhf.py

OpenRLHF's ``openrlhf.models`` package imports flash-attn; on a machine without it (CPU), this
example loads the real ``openrlhf.models.loss`` module without that package __init__.
"""
import importlib
import os
import sys
import types

import openrlhf
import torch

try:
    importlib.import_module("openrlhf.models.loss")
except ImportError:
    package = types.ModuleType("openrlhf.models")
    package.__path__ = [os.path.join(os.path.dirname(openrlhf.__file__), "models")]
    sys.modules["openrlhf.models"] = package
loss_module = importlib.import_module("openrlhf.models.loss")

from lens_kernels.integrations import openrlhf as lk_openrlhf  # noqa: E402

lk_openrlhf.patch()
torch.manual_seed(0)
B, T = 8, 10
log_probs = (-torch.rand(B, T) * 2).requires_grad_(True)
old = log_probs.detach() + 0.1 * torch.randn(B, T)
adv = torch.randn(B, 1).expand(B, T)
mask = (torch.rand(B, T) > 0.2).float()
loss, clip_ratio, ppo_kl, _, _ = loss_module.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)(log_probs, old, adv, mask)
loss.backward()
print(loss_module.PolicyLoss.__name__, "loss", float(loss), "clip", float(clip_ratio),
      "ppo_kl", float(ppo_kl))
lk_openrlhf.unpatch()
