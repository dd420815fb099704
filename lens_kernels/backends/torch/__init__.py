"""The torch backend: portable, chunked, and the CPU path. Plain launchers, one module per op, named as
in ``backends/triton/``; ``_common`` holds the row math they share. No autograd and no validation
here: both live once per op in ``lens_kernels.logprobs`` and ``lens_kernels.loss``."""
from __future__ import annotations

import torch

from .._launchers import Launchers
from ._common import flat_keep, per_token  # noqa: F401  (used by the other backends)
from .linear_token_logprobs import (linear_logprobs_no_grad, linear_token_logprobs_backward,
                                    linear_token_logprobs_forward, linear_vocab_shard_grad,
                                    linear_vocab_shard_partials)
from .policy_loss import (METRIC_NAMES, aggregation_weights, fused_logits_loss_forward, kl_and_grad, loss_terms,
                          rescale_grad_, token_coefficients)
from .policy_loss_from_hidden import fast_hidden_loss_forward
from .token_logprobs import logprobs_no_grad, token_logprobs_backward, token_logprobs_forward
from .vocab_shard import vocab_shard_grad, vocab_shard_partials

DEVICES = ("cpu", "cuda")


def empty_grad(logits: torch.Tensor) -> torch.Tensor:
    """A buffer for dL/dlogits (the chunk walk takes any layout)."""
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


token_logprobs = Launchers(forward=token_logprobs_forward, backward=token_logprobs_backward, empty_grad=empty_grad,
                           forward_no_grad=logprobs_no_grad, stats_rows=2)
linear_token_logprobs = Launchers(variant=lambda hidden: "", forward=linear_token_logprobs_forward,
                                  backward=linear_token_logprobs_backward, forward_no_grad=linear_logprobs_no_grad)
policy_loss_from_logits = Launchers(forward=fused_logits_loss_forward, rescale_=rescale_grad_, empty_grad=empty_grad)
policy_loss_from_hidden = Launchers(forward=fast_hidden_loss_forward)


__all__ = [
    "DEVICES", "METRIC_NAMES", "aggregation_weights", "empty_grad", "fast_hidden_loss_forward",
    "fused_logits_loss_forward", "kl_and_grad", "linear_token_logprobs_backward", "linear_token_logprobs_forward",
    "linear_token_logprobs", "policy_loss_from_hidden", "policy_loss_from_logits", "token_logprobs", "linear_vocab_shard_grad", "linear_vocab_shard_partials", "loss_terms",
    "rescale_grad_", "token_coefficients", "token_logprobs_backward", "token_logprobs_forward",
    "vocab_shard_grad", "vocab_shard_partials",
]
