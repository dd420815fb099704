import torch
import lens_kernels as lk

G, B, T, V = 4, 8, 16, 100  # group size; 2 prompts x G completions of T tokens; vocabulary
rewards = torch.tensor([0.0, 0, 0, 0, 1, 0, 1, 0])  # a negative group (every sample wrong), a mixed one
targets, mask = torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.bool)  # completions, kept tokens
logits = torch.randn(B, T, V, requires_grad=True)  # the policy's logits at the completion positions

# Stage A, once per rollout batch (no grad): the sampling policy's log-probs, then LENS advantages
with torch.no_grad():
    old_logps, _ = lk.token_logprobs(logits, targets, mask=mask)
adv, stats = lk.group_advantages(rewards, group_size=G, estimator="lens", old_logps=old_logps, mask=mask)

# Stage B, per micro-batch: the fused loss head (lk.policy_loss_from_hidden takes hidden states + lm_head)
config = lk.LossConfig(epsilon_low=0.2, epsilon_high=0.28)  # or LossConfig.from_trl / from_verl / from_openrlhf
loss, metrics = lk.policy_loss_from_logits(logits, targets, mask, adv, old_logps=old_logps, config=config)
loss.backward()

# Or the whole on-policy LENS step in one call (whole groups per micro-batch): no old-log-prob forward
loss, metrics = lk.lens_policy_loss_from_logits(logits, targets, mask, rewards, group_size=G,
                                                advantage_config=lk.AdvantageConfig(estimator="lens"), config=config)
loss.backward()
print(f"LENS advantages {[round(a, 3) for a in adv.tolist()]}, loss {loss.item():+.4f}")
