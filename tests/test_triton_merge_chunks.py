"""The split lean forward's merge walks the slices' partials in chunks (registers bounded at any split
count): with chunks of 2 slices, 5 and 7 slices take 3 and 4 steps, the last one partial, and at 7
slices a whole step holds only the -inf-bias slices and another only empty ones. Values against the
float64 reference, under the Triton interpreter on CPU (or on the GPU when there is one)."""
import pytest
import torch

pytest.importorskip("triton")

import test_triton_hidden as hidden_tests  # noqa: E402  (sets up the interpreter before the kernels load)
import backend_calls as calls  # noqa: E402
from seeds import stable_seed  # noqa: E402

linear_op = hidden_tests.linear_op


@pytest.mark.parametrize("splits", [5, 7])
def test_merge_in_chunks_matches_reference(splits, monkeypatch):
    monkeypatch.setattr(linear_op, "MERGE_SPLITS_CHUNK", 2)
    chunks = []
    real_merge = linear_op._linear_logprobs_merge_kernel

    class Spy:
        def __getitem__(self, grid):
            launch = real_merge[grid]

            def run(*args, **kwargs):
                chunks.append(kwargs["SPLITS_CHUNK"])
                return launch(*args, **kwargs)
            return run

    monkeypatch.setattr(linear_op, "_linear_logprobs_merge_kernel", Spy())
    case = hidden_tests._split_case(stable_seed("merge-chunks", splits))
    zeros = torch.zeros(case["targets"].shape, dtype=torch.float64)
    want_logp, want_entropy, *_ = hidden_tests._reference(case, zeros, zeros)
    hidden_tests._poisoned_empty(monkeypatch)
    args = [case[k].to(hidden_tests.DEVICE) for k in ("hidden", "weight", "targets", "bias", "mask", "tau")]
    logp, entropy = calls.linear_token_logprobs("triton", *args, return_entropy=True, vocab_splits=splits)
    assert chunks == [2], "the merge did not run in chunks of 2 slices"
    mask = case["mask"].to(hidden_tests.DEVICE)
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()
    tol = hidden_tests.TOL_TRITON[torch.float32]
    hidden_tests.assert_close_scaled(logp, want_logp, tol, "logp")
    hidden_tests.assert_close_scaled(entropy, want_entropy, tol, "entropy")
