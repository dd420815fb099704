"""The ops with an explicit backend and no boundary checks, in the argument order the backend tests
use: what a backend contributes is its launchers, and the op's one autograd runs on top of them. No
value is checked here (a kept out-of-range target reaches the kernels), as inside the library."""
from __future__ import annotations

import contextlib
import importlib

from lens_kernels.config import LossConfig
from lens_kernels.logprobs import linear_token_logprobs_op, token_logprobs_op
from lens_kernels.loss import policy_loss_from_hidden_op, policy_loss_from_logits_op, policy_loss_op


def token_logprobs(backend, logits, targets, mask=None, temperature=1.0, return_entropy=False, inplace_grad=False):
    logp, entropy = token_logprobs_op(logits, targets, mask, temperature, backend, inplace_grad)
    return logp, (entropy if return_entropy else None)


@contextlib.contextmanager
def _replaced(module_name, attribute, value):
    """``module.attribute = value`` for the duration (None: left as it is)."""
    if value is None:
        yield
        return
    module = importlib.import_module(module_name)
    before = getattr(module, attribute)
    setattr(module, attribute, value)
    try:
        yield
    finally:
        setattr(module, attribute, before)


def _triton_vocab_splits(vocab_splits):
    """Forces the Triton lean forward's vocabulary slices (the launcher's heuristic, replaced)."""
    if vocab_splits is not None:
        importlib.import_module("lens_kernels.backends.triton.linear_token_logprobs").check_vocab_splits(vocab_splits)
    return _replaced("lens_kernels.backends.triton.linear_token_logprobs", "vocab_splits_for",
                     None if vocab_splits is None else (lambda *args, **kwargs: vocab_splits))


def linear_token_logprobs(backend, hidden, weight, targets, bias=None, mask=None, temperature=1.0,
                          return_entropy=False, vocab_splits=None):
    with _triton_vocab_splits(vocab_splits):
        logp, entropy = linear_token_logprobs_op(hidden, weight, bias, targets, mask, temperature, backend)
    return logp, (entropy if return_entropy else None)


def policy_loss(logps, advantages, mask, old_logps=None, ref_logps=None, entropy=None, is_weights=None,
                config=LossConfig(), num_tokens=None, num_sequences=None):
    return policy_loss_op(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config, num_tokens,
                          num_sequences)


def policy_loss_from_logits(backend, logits, targets, mask, advantages, old_logps=None, ref_logps=None,
                            is_weights=None, temperature=1.0, config=LossConfig(), num_tokens=None, num_sequences=None,
                            grad_scale=1.0, inplace=False, path=None):
    with _cuda_path(path):
        return policy_loss_from_logits_op(logits, targets, mask, advantages, old_logps, ref_logps, is_weights,
                                          temperature, config, num_tokens, num_sequences, grad_scale, inplace, backend)


def _cuda_path(path):
    """Forces the CUDA fused loss's row-kernel variant."""
    if path is not None and path not in importlib.import_module("lens_kernels.backends.cuda").PATHS:
        raise ValueError(f"path {path!r} is not a row-kernel variant of the CUDA fused loss")
    return _replaced("lens_kernels.backends.cuda", "FUSED_LOSS_PATH", path)


def policy_loss_from_hidden(backend, hidden, weight, targets, mask, advantages, bias=None, old_logps=None,
                            ref_logps=None, is_weights=None, temperature=1.0, config=LossConfig(), num_tokens=None,
                            num_sequences=None, grad_scale=1.0, mode="fast", chunk_rows=None):
    with _triton_chunk_rows(chunk_rows):
        return policy_loss_from_hidden_op(hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps,
                                          is_weights, temperature, config, num_tokens, num_sequences, grad_scale,
                                          mode, backend)


def _triton_chunk_rows(chunk_rows):
    """Forces the Triton fast hidden mode's rows per chunk (chunk boundaries inside sequences)."""
    return _replaced("lens_kernels.backends.triton.policy_loss_from_hidden", "fast_chunk_rows",
                     None if chunk_rows is None else (lambda *args, **kwargs: chunk_rows))
