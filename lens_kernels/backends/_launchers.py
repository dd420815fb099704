"""What a backend supplies for an op: plain launchers (no autograd, no validation), gathered under the
op's name in the backend's module, so that one dispatch decision picks all of an op's launchers.

token_logprobs:          forward(logits, targets, mask, temperature) -> (logp [N], entropy [N], stats)
                         backward(logits, targets, mask, temperature, stats, entropy, g_logp, g_entropy, out)
                         -> the gradient: written into out (logits itself for in place), or into a buffer
                         of the backend's when out is None
                         empty_grad(logits) -> a buffer for dL/dlogits, or None (the kernels allocate)
linear_token_logprobs:   variant(hidden) -> str (a backend option decided at forward, kept for backward)
                         forward(hidden, weight, bias, targets, mask, temperature, variant) -> (logp, entropy, stats)
                         backward(..., stats, entropy, g_logp, g_entropy, needs, variant) -> (d_hidden, d_weight, d_bias)
policy_loss_from_logits: forward(logits, out, targets, mask, advantages, old_logps, ref_logps, is_weights,
                                 temperature, config, num_tokens, num_sequences, grad_scale)
                         -> (logp, entropy, gradient): dL/dlogits for the upstream gradient grad_scale,
                         token-level ratios, into out as backward does
                         rescale_(grad, ratio): grad *= ratio ([1] tensor, on the device)
                         empty_grad(logits)
policy_loss_from_hidden: forward(hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps,
                                 is_weights, temperature, config, num_tokens, num_sequences, grad_scale, needs)
                         -> (logp, entropy, (d_hidden, d_weight, d_bias)) (the fast mode, token-level ratios)

Optional, both log-prob ops: forward_no_grad(<forward's inputs, without variant>, want_entropy) ->
(logp, entropy or None) shaped as targets, for a call no gradient follows (no stats kept).

logp and entropy are flat [N] in the compute dtype (fp32; fp64 on the torch backend for fp64 input);
``stats`` is the backend's own [..., N] tensor of what its backward needs. Masked tokens give 0 and an
exact-zero gradient row; g_logp / g_entropy may be None (no gradient through that output).
"""
from types import SimpleNamespace as Launchers  # noqa: F401
