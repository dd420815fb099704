"""The ``triton`` backend: one op per file in this package (kernels, then their launchers); the op's
autograd and validation are in ``lens_kernels.logprobs`` / ``lens_kernels.loss``.

- ``token_logprobs``: forward log-probs + entropy in one read of the logits, backward one read and
  one write.
- ``policy_loss_from_logits``: the fused loss head; token-level ratios compute dL/dlogits in forward
  (2 passes of HBM with the split variant on a GPU).
- ``linear_token_logprobs`` and ``policy_loss_from_hidden``: the same from hidden states and the
  lm_head weight, never materializing [N, V] (the fast mode's row step here, its chunk loop shared
  with the torch backend).
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

    from .._launchers import Launchers
    from . import linear_token_logprobs as _linear
    from . import policy_loss as _loss
    from . import policy_loss_from_hidden as _hidden
    from . import token_logprobs as _logprobs
    from ._common import empty_grad_like
    from .vocab_shard import vocab_shard_grad, vocab_shard_partials  # noqa: F401

    # dtypes of the logits the kernels take (the dispatcher reads this for backend="auto")
    DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    token_logprobs = Launchers(forward=_logprobs.launch_forward, backward=_logprobs.launch_backward,
                               empty_grad=empty_grad_like, stats_rows=2)
    linear_token_logprobs = Launchers(variant=_linear.launch_variant, forward=_linear.launch_forward,
                                      backward=_linear.launch_backward, stats_rows=2)
    policy_loss_from_logits = Launchers(forward=_loss.launch_fused_forward, rescale_=_loss.rescale_grad_,
                                        empty_grad=empty_grad_like)
    policy_loss_from_hidden = Launchers(forward=_hidden.launch_fast_forward)
except ImportError as exc:  # triton missing (e.g. macOS / Windows): the backend reports why
    _IMPORT_ERROR = f"triton cannot be imported ({exc})"


def unavailable_reason():
    return _IMPORT_ERROR
