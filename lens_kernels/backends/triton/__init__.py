"""The ``triton`` backend: one op per file in this package (kernel, launcher, autograd.Function)."""
from __future__ import annotations

DEVICES = ("cuda",)


def unavailable_reason():
    return "the Triton kernels are not implemented yet"

# the hidden-state path (issue 5): one op per file, like the rest of this package
try:
    from .linear_token_logprobs import linear_token_logprobs, linear_token_logprobs_with_sequence_sums  # noqa: E402,F401
    from .policy_loss_from_hidden import policy_loss_from_hidden  # noqa: E402,F401
except ImportError:  # triton missing: the backend reports it through unavailable_reason()
    pass
