"""Special and bad inputs on the GPU backends (docs/inputs.md); skipped without CUDA.

The CPU module tests/test_special_inputs.py runs on the GPU too (its tensors go to triton_interp.DEVICE)
with LENS_KERNELS_CHECK=1. This module adds what only a GPU shows:

- the ``cuda`` backend (when the extension is built) next to ``triton`` and ``torch`` on CUDA tensors:
  -inf logits (a thread's first element, whole blocks), NaN and garbage under the mask, empty work,
  in-place aliasing, inputs never modified;
- the unchecked GPU path (no LENS_KERNELS_CHECK): a kept bad target gives a NaN log-prob, never an
  out-of-bounds read and never probability 1 (CUDA's fminf/fmaxf drop NaN);
- no host sync while the public ops validate and run their forward, with
  ``torch.cuda.set_sync_debug_mode("error")``.
"""
import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the CPU module

import lens_kernels as lk  # noqa: E402
import test_special_inputs as S  # noqa: E402
from seeds import stable_seed  # noqa: E402

GPU_BACKENDS = ["torch", "triton"] + (["cuda"] if lk.HAS_CUDA_EXT else [])


def ops_for(ops=S.BACKEND_OPS):
    return [pytest.param(op, b, id=f"{op}-{b}") for op in ops for b in GPU_BACKENDS]


def _skip_unimplemented(op, backend):
    """The cuda backend serves some ops only: an op it lacks is not a case for it."""
    inner = {"lens_policy_loss_from_logits": "token_logprobs", "lens_policy_loss_from_hidden": "linear_token_logprobs"}
    try:
        lk.backend_for(inner.get(op, op), torch.empty(1, device="cuda"), backend)
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def checked(monkeypatch):
    monkeypatch.setenv("LENS_KERNELS_CHECK", "1")


@pytest.fixture
def unchecked(monkeypatch):
    monkeypatch.delenv("LENS_KERNELS_CHECK", raising=False)


@pytest.mark.parametrize("cols", list(S.BANS))
@pytest.mark.parametrize("op,backend", ops_for())
def test_minus_inf_logits_gpu(op, backend, cols, checked):
    _skip_unimplemented(op, backend)
    kw = S._ban(S.make_inputs(stable_seed("gpu_ninf", op, cols)), op, S.BANS[cols])
    S.check_against_reference(op, kw, backend)


@pytest.mark.parametrize("op,backend", ops_for())
def test_nan_and_garbage_under_the_mask_gpu(op, backend, checked):
    _skip_unimplemented(op, backend)
    seed = stable_seed("gpu_under_mask", op)
    S.check_against_reference(op, S._poison_logits(S.make_inputs(seed), op, seed), backend)


@pytest.mark.parametrize("b,t", [(0, S.T), (4, 0)])
@pytest.mark.parametrize("op,backend", ops_for())
def test_empty_work_gpu(op, backend, b, t, checked):
    _skip_unimplemented(op, backend)
    outs, _ = S.check_against_reference(op, S.make_inputs(stable_seed("gpu_empty", op), b=b, t=t), backend)
    if op in S.LOSS_OPS:
        assert float(outs[0].detach()) == 0.0


@pytest.mark.parametrize("bad", [-100, S.V, S.V + 4096])
@pytest.mark.parametrize("op,backend", ops_for(["token_logprobs", "linear_token_logprobs", "policy_loss_from_logits",
                                                "policy_loss_from_hidden"]))
def test_unchecked_bad_target_is_nan_gpu(op, backend, bad, unchecked):
    _skip_unimplemented(op, backend)
    kw = S.make_inputs(stable_seed("gpu_bad_target", op, bad))
    kw["targets"][0, 0] = bad
    outs, _ = S.run_ours(op, kw, backend)
    torch.cuda.synchronize()  # an out-of-bounds read shows here as a CUDA error
    if op in ("token_logprobs", "linear_token_logprobs"):
        assert torch.isnan(outs[0][0, 0]), "a kept bad target must give a NaN log-prob (never 0 = probability 1)"
        want, _ = S.run_ref(op, kw)
        S.assert_same(outs[0], want[0], "logps")
    else:
        assert torch.isnan(outs[0])


@pytest.mark.parametrize("op,backend", ops_for(["token_logprobs", "policy_loss_from_logits"]))
def test_checked_bad_target_is_an_error_gpu(op, backend, checked):
    _skip_unimplemented(op, backend)
    kw = S.make_inputs(stable_seed("gpu_bad_target_checked", op))
    kw["targets"][0, 0] = -100
    with pytest.raises(ValueError, match="targets"):
        S.run_ours(op, kw, backend)


@pytest.mark.parametrize("op,backend", ops_for(["token_logprobs", "policy_loss_from_logits"]))
def test_inplace_saved_buffer_gpu(op, backend, checked):
    _skip_unimplemented(op, backend)
    S.test_inplace_into_a_buffer_saved_by_another_op(op, backend)


@pytest.mark.parametrize("op,backend", ops_for())
def test_inputs_are_not_modified_gpu(op, backend, checked):
    _skip_unimplemented(op, backend)
    S.test_inputs_are_not_modified(op, backend)


@pytest.mark.parametrize("op,backend", ops_for(["token_logprobs", "linear_token_logprobs", "policy_loss_from_logits",
                                                "policy_loss_from_hidden"]))
def test_no_host_sync_without_the_check_flag(op, backend, unchecked):
    """Validation and forward of the public ops never synchronize with the host (CUDA tensors, no
    LENS_KERNELS_CHECK): every check that reads values is off, the rest reads metadata only."""
    _skip_unimplemented(op, backend)
    kw = S.make_inputs(stable_seed("gpu_no_sync", op))
    kw = {k: v.cuda() for k, v in kw.items()}
    kw["mask"] = kw["mask"].float()
    extra = dict(temperature=torch.rand(S.B, device="cuda") + 0.5)
    if op.startswith("policy"):
        extra.update(num_tokens=torch.tensor(7.0, device="cuda"))
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        S._call(lk, op, kw, backend, **extra)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
