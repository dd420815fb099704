"""token_logprobs on the torch backend: plain launchers (the op, its autograd and its validation are
``lens_kernels.logprobs``). Forward keeps the lse per token; backward recomputes the softmax chunk by
chunk (``vocab_shard_grad``), into a fresh buffer or into the logits themselves."""
from __future__ import annotations

from ._common import finish_partials, flat_keep, grad_coefficients, mark_bad
from .vocab_shard import vocab_shard_grad, vocab_shard_partials


def logprob_stats(logits, t, keep, bad, temperature):
    """(logp, lse, entropy) flat [N]; masked tokens 0, a kept out-of-range target NaN."""
    import torch

    logp, lse, entropy = finish_partials(*vocab_shard_partials(logits, t, temperature, keep))
    if keep is not None:
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp = torch.where(keep, logp, zero)
        entropy = torch.where(keep, entropy, zero)
    return mark_bad(logp, bad), lse, entropy


def token_logprobs_forward(logits, targets, mask, temperature):
    """(logp [N], entropy [N], lse [N]) in the compute dtype (fp32; fp64 for fp64 logits)."""
    t, keep, bad = flat_keep(targets, mask, logits.shape[-1])
    logp, lse, entropy = logprob_stats(logits, t, keep, bad, temperature)
    return logp, entropy, lse


def token_logprobs_backward(logits, targets, mask, temperature, lse, entropy, g_logp, g_entropy, out):
    """Writes dL/dlogits for the flat upstream gradients g_logp, g_entropy (either may be None) into
    ``out`` (shaped as logits; ``out is logits`` overwrites them in place) and returns it."""
    t, keep, bad = flat_keep(targets, mask, logits.shape[-1])
    g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep, bad)
    return vocab_shard_grad(logits, t, temperature, lse, entropy.reshape(-1).to(lse.dtype), g_l, g_h, out=out)
