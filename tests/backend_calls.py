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
def _triton_vocab_splits(vocab_splits):
    """Forces the Triton lean forward's vocabulary slices (the launcher's heuristic, replaced)."""
    if vocab_splits is None:
        yield
        return
    lin = importlib.import_module("lens_kernels.backends.triton.linear_token_logprobs")
    lin.check_vocab_splits(vocab_splits)
    heuristic = lin.vocab_splits_for
    lin.vocab_splits_for = lambda *args, **kwargs: vocab_splits
    try:
        yield
    finally:
        lin.vocab_splits_for = heuristic


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


@contextlib.contextmanager
def _cuda_path(path):
    """Forces the CUDA fused loss's row-kernel variant."""
    if path is None:
        yield
        return
    cuda = importlib.import_module("lens_kernels.backends.cuda")
    if path not in cuda.PATHS:
        raise ValueError(f"path must be one of {list(cuda.PATHS)}, got {path!r}")
    before, cuda.FUSED_LOSS_PATH = cuda.FUSED_LOSS_PATH, path
    try:
        yield
    finally:
        cuda.FUSED_LOSS_PATH = before


def policy_loss_from_hidden(backend, hidden, weight, targets, mask, advantages, bias=None, old_logps=None,
                            ref_logps=None, is_weights=None, temperature=1.0, config=LossConfig(), num_tokens=None,
                            num_sequences=None, grad_scale=1.0, mode="fast", chunk_rows=None):
    with _triton_chunk_rows(chunk_rows):
        return policy_loss_from_hidden_op(hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps,
                                          is_weights, temperature, config, num_tokens, num_sequences, grad_scale,
                                          mode, backend)


@contextlib.contextmanager
def _triton_chunk_rows(chunk_rows):
    """Forces the Triton fast hidden mode's rows per chunk (chunk boundaries inside sequences)."""
    if chunk_rows is None:
        yield
        return
    plh = importlib.import_module("lens_kernels.backends.triton.policy_loss_from_hidden")
    heuristic = plh.fast_chunk_rows
    plh.fast_chunk_rows = lambda *args, **kwargs: chunk_rows
    try:
        yield
    finally:
        plh.fast_chunk_rows = heuristic
