"""The lean forward's slice heuristic takes the programs per SM from the compiled kernel a launch
reports (registers and shared memory differ by Triton version and variant), not from a constant."""
import importlib
import types

import pytest
import torch

pytest.importorskip("triton")


class _Props:
    multi_processor_count = 132
    regs_per_multiprocessor = 65536
    max_threads_per_multi_processor = 2048
    shared_memory_per_multiprocessor = 233472


def _compiled(regs, shared):
    return types.SimpleNamespace(n_regs=regs, metadata=types.SimpleNamespace(shared=shared))


@pytest.fixture
def lin(monkeypatch):
    module = importlib.import_module("lens_kernels.backends.triton.linear_token_logprobs")
    monkeypatch.setattr(module.torch.cuda, "get_device_properties", lambda device: _Props())
    monkeypatch.setattr(module, "_sm_count", lambda index: 132)
    monkeypatch.setattr(module, "_FWD_RESIDENT", {})
    return module


def test_programs_per_sm_from_registers_shared_memory_and_threads(lin):
    cuda = torch.device("cuda", 0)
    assert lin.programs_per_sm(cuda, 128, 0, 8) == 2  # 128 x 256 threads: half the register file
    assert lin.programs_per_sm(cuda, 129, 0, 8) == 1  # rounds up to 136 per thread
    assert lin.programs_per_sm(cuda, 128, 73728, 8) == 2  # 3 by shared memory, 2 by registers
    assert lin.programs_per_sm(cuda, 64, 98304, 8) == 2  # 4 by registers, 2 by shared memory
    assert lin.programs_per_sm(cuda, 32, 0, 8) == 8  # thread limit
    assert lin.programs_per_sm(cuda, 128, 6144, 4) == 4  # the fp32 "ieee" forward within its cap


def test_vocab_splits_follow_the_compiled_forward(lin):
    cuda = torch.device("cuda", 0)
    # before any launch: FWD_PROGRAMS_PER_SM (2 waves of 2 programs per SM), 256 row blocks -> 3 slices
    assert lin.vocab_splits_for(16384, 151936, cuda, 64, 128) == 3
    lin.note_fwd_launch(_compiled(160, 73728), cuda, 64, 128, 8)  # as Triton 3.6 compiles it: 1 per SM
    assert lin._FWD_RESIDENT[(0, 64, 128)] == 1
    assert lin.vocab_splits_for(16384, 151936, cuda, 64, 128) == 2  # 2 waves of 132 programs
    assert lin.vocab_splits_for(64 * 264, 151936, cuda, 64, 128) == 1  # rows alone fill them
    lin.note_fwd_launch(_compiled(128, 73728), cuda, 64, 128, 8)  # a lighter variant: the fewest is kept
    assert lin._FWD_RESIDENT[(0, 64, 128)] == 1
    # other tiles (the fp32 "ieee" forward) are counted apart; CPU launches and the interpreter report nothing
    assert lin.vocab_splits_for(16384, 151936, cuda, 32, 64) == 2  # 512 row blocks, 4 x 132 wanted
    lin.note_fwd_launch(None, cuda, 32, 64, 4)
    lin.note_fwd_launch(_compiled(96, 0), torch.device("cpu"), 32, 64, 4)
    assert (0, 32, 64) not in lin._FWD_RESIDENT
    lin.note_fwd_launch(_compiled(128, 6144), cuda, 32, 64, 4)
    assert lin._FWD_RESIDENT[(0, 32, 64)] == 4
    assert lin.vocab_splits_for(16384, 151936, cuda, 32, 64) == 3  # 512 row blocks, 2 x 4 x 132 wanted
