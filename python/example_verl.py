"""LENS with verl: what VERL_USE_EXTERNAL_MODULES=lens_kernels.integrations.verl registers, on a random batch.

In a real run (Hydra overrides):
    VERL_USE_EXTERNAL_MODULES=lens_kernels.integrations.verl python -m verl.trainer.main_ppo \\
        algorithm.adv_estimator=lens +algorithm.lens_alpha=0.25 actor_rollout_ref.rollout.n=8 ...
    (docs/verl.md: the full command, Ray clusters, graded rewards, when loss_mode=lens is needed)

    python python/example_verl.py
"""
import numpy as np
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos

import lens_kernels.integrations.verl  # noqa: F401  (registers "lens" in verl's registries)

torch.manual_seed(0)
n, T, G = 16, 12, 4
index = np.repeat([f"prompt-{i}" for i in range(n // G)], G)
mask = (torch.rand(n, T) > 0.2).float()
rewards = torch.zeros(n, T)
rewards[:, -1] = (torch.rand(n) > 0.6).float()
rewards[:G, -1] = 0.0  # a negative group: GRPO gives it no signal, LENS does
old_log_probs = -torch.rand(n, T) * 2
adv, _ = core_algos.get_adv_estimator_fn("lens")(
    token_level_rewards=rewards, response_mask=mask, index=index, old_log_probs=old_log_probs,
    config=OmegaConf.create({"lens_alpha": 0.25}))
log_prob = (old_log_probs + 0.1 * torch.randn(n, T)).requires_grad_(True)
actor = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_c": 3.0, "global_batch_info": {}})
loss, metrics = core_algos.get_policy_loss_fn("lens")(old_log_probs, log_prob, adv, mask,
                                                      loss_agg_mode="token-mean", config=actor)
loss.backward()
print("negative-group |A|:", float(adv[:G].abs().mean()), "loss:", float(loss), metrics)
