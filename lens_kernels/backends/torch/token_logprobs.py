"""token_logprobs on the torch backend: forward keeps lse and entropy per token; backward recomputes
the softmax chunk by chunk (``vocab_shard_grad``), optionally in place into the logits buffer."""
from __future__ import annotations

from typing import Optional, Tuple

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
    """Under torch.compile: the custom ops (``token_logprobs_op``), where ``inplace_grad`` is a
    hint that is not taken (the traced graph owns its buffers). Eager: ``TokenLogprobsFunction``."""
    if torch.compiler.is_compiling():
        logp, entropy = token_logprobs_op(logits, targets, mask, temperature)
    else:
        logp, entropy = TokenLogprobsFunction.apply(logits, targets, mask, temperature, inplace_grad)
    return logp, (entropy if return_entropy else None)


# ---------------------------------------------------------------------------------------------
# The same op as a torch.library custom op, for torch.compile: the graph holds one opaque node per
# direction (the chunk loop, its host-side flags and its buffers stay out of the trace), with a fake
# implementation for shapes and the backward registered as its autograd formula.
# ---------------------------------------------------------------------------------------------
def split_temperature(temperature):
    """(float, tensor or None): a custom op's schema takes the two forms as two arguments."""
    return (1.0, temperature) if torch.is_tensor(temperature) else (float(temperature), None)


def _cdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("lens_kernels::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor], tau: float,
                       tau_t: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [...], entropy [...], lse [N]) of ``token_logprobs`` (see ``TokenLogprobsFunction``)."""
    t, keep, bad = flat_keep(targets, mask, logits.shape[-1])
    logp, lse, entropy = logprob_stats(logits, t, keep, bad, tau if tau_t is None else tau_t)
    lead = logits.shape[:-1]
    return logp.view(lead).clone(), entropy.view(lead).clone(), lse


@token_logprobs_fwd.register_fake
def _(logits, targets, mask, tau, tau_t):
    cdt = _cdt(logits.dtype)
    lead = logits.shape[:-1]
    return (logits.new_empty(lead, dtype=cdt), logits.new_empty(lead, dtype=cdt),
            logits.new_empty((targets.numel(),), dtype=cdt))


@torch.library.custom_op("lens_kernels::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor], tau: float,
                       tau_t: Optional[torch.Tensor], lse: torch.Tensor, entropy: torch.Tensor,
                       g_logp: torch.Tensor, g_entropy: torch.Tensor) -> torch.Tensor:
    """dL/dlogits (contiguous, the logits' dtype) for upstream gradients g_logp and g_entropy."""
    t, keep, bad = flat_keep(targets, mask, logits.shape[-1])
    g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep, bad)
    return vocab_shard_grad(logits, t, tau if tau_t is None else tau_t, lse, entropy.reshape(-1).to(lse.dtype),
                            g_l, g_h)


@token_logprobs_bwd.register_fake
def _(logits, targets, mask, tau, tau_t, lse, entropy, g_logp, g_entropy):
    return logits.new_empty(logits.shape)


def _fwd_setup(ctx, inputs, output):
    logits, targets, mask, tau, tau_t = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, mask, tau_t, lse, entropy)
    ctx.tau = tau


def _fwd_backward(ctx, g_logp, g_entropy, _g_lse):
    logits, targets, mask, tau_t, lse, entropy = ctx.saved_tensors
    if g_logp is None:
        g_logp = torch.zeros_like(entropy)
    if g_entropy is None:
        g_entropy = torch.zeros_like(entropy)
    grad = token_logprobs_bwd(logits, targets, mask, ctx.tau, tau_t, lse, entropy, g_logp, g_entropy)
    return grad, None, None, None, None


token_logprobs_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def token_logprobs_op(logits, targets, mask=None, temperature=1.0):
    """``token_logprobs`` through the custom ops (the traceable form; never in place)."""
    tau, tau_t = split_temperature(temperature)
    logp, entropy, _ = token_logprobs_fwd(logits, targets, mask, tau, tau_t)
    return logp, entropy
