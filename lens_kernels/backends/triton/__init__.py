"""The ``triton`` backend: one op per file in this package (kernel, launcher, autograd.Function).

- ``token_logprobs``: forward log-probs + entropy in one read of the logits, with its own backward.
- ``policy_loss_from_logits``: the fused loss head; token-level ratios compute dL/dlogits in forward
  (2 passes of HBM with the split variant on a GPU), sequence-level ratios (GSPO) take 3 passes.
- ``linear_token_logprobs`` and ``policy_loss_from_hidden``: the same from hidden states and the
  lm_head weight, never materializing [N, V] (modes ``fast`` and ``lean``).
- ``vocab_shard_partials`` and ``vocab_shard_grad``: the local ops of vocabulary parallelism on a
  logits shard (``lens_kernels.distributed`` combines them). The hidden-path shard ops stay with
  ``torch``.

The kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before this package is imported), which is how CI tests them. fp64 is
not served: ``backend="auto"`` sends it to ``torch`` (see ``DTYPES``).
"""
from __future__ import annotations

import os

DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET", "0") == "1" else ("cuda",)

_IMPORT_ERROR = None
try:
    import torch

    # dtypes of the logits the kernels take (the dispatcher reads this for backend="auto")
    DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    from .policy_loss import policy_loss_from_logits  # noqa: F401
    from .token_logprobs import token_logprobs, token_logprobs_with_sequence_sums  # noqa: F401
    # the hidden-state path
    from .linear_token_logprobs import linear_token_logprobs, linear_token_logprobs_with_sequence_sums  # noqa: F401
    from .policy_loss_from_hidden import policy_loss_from_hidden  # noqa: F401
    # vocabulary parallelism: the local ops of a logits shard
    from .vocab_shard import vocab_shard_grad, vocab_shard_partials  # noqa: F401
except ImportError as exc:  # triton missing (e.g. macOS / Windows): the backend reports why
    _IMPORT_ERROR = f"triton cannot be imported ({exc})"


def unavailable_reason():
    return _IMPORT_ERROR
