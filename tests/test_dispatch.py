"""Backend selection: auto, explicit, the environment variable, and clear errors."""
import pytest
import torch

import lens_kernels as lk


def _inputs():
    logits = torch.randn(2, 3, 11)
    targets = torch.randint(0, 11, (2, 3))
    return logits, targets


def test_cpu_auto_is_torch():
    logits, _ = _inputs()
    assert lk.backend_for("token_logprobs", logits) == "torch"
    assert "torch" in lk.available_backends()


def test_environment_variable(monkeypatch):
    logits, targets = _inputs()
    monkeypatch.setenv("LENS_KERNELS_BACKEND", "torch")
    assert lk.backend_for("token_logprobs", logits) == "torch"
    monkeypatch.setenv("LENS_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        lk.token_logprobs(logits, targets)


def test_unknown_backend():
    logits, targets = _inputs()
    with pytest.raises(ValueError, match="backend must be"):
        lk.token_logprobs(logits, targets, backend="jax")
    with pytest.raises(TypeError, match="backend"):
        lk.token_logprobs(logits, targets, backend=3)


@pytest.mark.skipif(lk.HAS_CUDA_EXT, reason="the CUDA extension is built here")
def test_cuda_backend_unavailable_is_clear():
    logits, targets = _inputs()
    assert not lk.HAS_CUDA_EXT
    with pytest.raises(RuntimeError, match="cuda.*not available|not built"):
        lk.token_logprobs(logits, targets, backend="cuda")
