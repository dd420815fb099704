"""LENS advantages and the fused policy loss on random data: the library in 40 lines.

Run: python python/quickstart.py
"""
import torch

import lens_kernels as lk

torch.manual_seed(0)
prompts, G, T, V = 4, 8, 32, 1000  # 4 prompts x 8 samples, 32 completion tokens, vocab 1000
N = prompts * G

# A rollout batch: rewards (prompt 0 is a negative group: every sample wrong), a completion mask, and
# the sampling policy's token log-probs.
rewards = (torch.rand(N) < 0.4).float()
rewards[:G] = 0.0
mask = torch.ones(N, T, dtype=torch.bool)
mask[:, 24:] = torch.rand(N, 8) < 0.5
logits = torch.randn(N, T, V, requires_grad=True)
targets = torch.randint(0, V, (N, T))
with torch.no_grad():
    old_logps, _ = lk.token_logprobs(logits, targets, mask=mask)

# Stage A: advantages. GRPO gives the negative group zero; LENS turns it into signal.
grpo, _ = lk.group_advantages(rewards, group_size=G, estimator="grpo")
lens, stats = lk.group_advantages(rewards, group_size=G, estimator="lens", old_logps=old_logps, mask=mask)
print(f"negative groups: {stats['frac_negative_groups']:.2f}   mixed: {stats['frac_mixed_groups']:.2f}")
print("GRPO advantages, negative group:", [round(a, 3) for a in grpo[:G].tolist()])
print("LENS advantages, negative group:", [round(a, 3) for a in lens[:G].tolist()])

# Stage B: the fused loss head, from logits, with DAPO-style asymmetric clipping.
config = lk.LossConfig(epsilon_low=0.2, epsilon_high=0.28, loss_agg_mode="token-mean")
loss, metrics = lk.policy_loss_from_logits(logits, targets, mask, lens, old_logps=old_logps, config=config)
loss.backward()
print(f"loss {loss.item():+.5f}   entropy {metrics['entropy'].item():.3f}   "
      f"clip fraction {metrics['clip_frac'].item():.3f}   |grad| {logits.grad.norm().item():.4f}")
print("backend:", lk.backend_for("policy_loss_from_logits", logits))
