"""token_logprobs on the torch backend: forward keeps lse and entropy per token; backward recomputes
the softmax chunk by chunk (``vocab_shard_grad``), optionally in place into the logits buffer."""
from __future__ import annotations

import torch

from ._common import check_inplace_target, finish_partials, flat_keep, grad_coefficients, mark_bad
from .vocab_shard import vocab_shard_grad, vocab_shard_partials


def logprob_stats(logits, t, keep, bad, temperature):
    """(logp, lse, entropy) flat [N]; masked tokens 0, a kept out-of-range target NaN."""
    logp, lse, entropy = finish_partials(*vocab_shard_partials(logits, t, temperature, keep))
    if keep is not None:
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp = torch.where(keep, logp, zero)
        entropy = torch.where(keep, entropy, zero)
    return mark_bad(logp, bad), lse, entropy


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, temperature, inplace_grad):
        lead = logits.shape[:-1]
        if inplace_grad:
            check_inplace_target(logits)
        t, keep, bad = flat_keep(targets, mask, logits.shape[-1])
        logp, lse, entropy = logprob_stats(logits, t, keep, bad, temperature)
        ctx.save_for_backward(logits, t, lse, entropy, keep if keep is not None else torch.empty(0), bad)
        ctx.has_keep = keep is not None
        ctx.temperature = temperature
        ctx.inplace_grad = inplace_grad
        ctx.set_materialize_grads(False)
        return logp.view(lead), entropy.view(lead)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, t, lse, entropy, keep, bad = ctx.saved_tensors
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None
        g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep if ctx.has_keep else None, bad)
        grad = vocab_shard_grad(logits, t, ctx.temperature, lse, entropy, g_l, g_h, inplace=ctx.inplace_grad)
        return grad, None, None, None, None


def token_logprobs(logits, targets, mask=None, temperature=1.0, return_entropy=False, inplace_grad=False):
    logp, entropy = TokenLogprobsFunction.apply(logits, targets, mask, temperature, inplace_grad)
    return logp, (entropy if return_entropy else None)
