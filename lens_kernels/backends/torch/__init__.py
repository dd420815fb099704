"""The torch backend: portable, chunked, and the CPU path (SPEC section 4). One module per op, named
as in ``backends/triton/``; ``_common`` holds the row math they share."""
from __future__ import annotations

from ._common import flat_keep, per_token  # noqa: F401  (used by the other backends)
from .linear_token_logprobs import linear_token_logprobs, linear_vocab_shard_grad, linear_vocab_shard_partials
from .policy_loss import (METRIC_NAMES, aggregation_weights, kl_and_grad, policy_loss, policy_loss_from_logits,
                          token_coefficients)
from .policy_loss_from_hidden import fast_mode_applies, fast_policy_loss_from_hidden, policy_loss_from_hidden
from .token_logprobs import token_logprobs
from .vocab_shard import vocab_shard_grad, vocab_shard_partials

DEVICES = ("cpu", "cuda")

__all__ = [
    "DEVICES", "METRIC_NAMES", "aggregation_weights", "fast_mode_applies", "fast_policy_loss_from_hidden",
    "kl_and_grad", "linear_token_logprobs", "linear_vocab_shard_grad", "linear_vocab_shard_partials",
    "policy_loss", "policy_loss_from_hidden", "policy_loss_from_logits", "token_coefficients", "token_logprobs",
    "vocab_shard_grad", "vocab_shard_partials",
]
