"""On the GPU, the lean forward's slice heuristic uses the programs per SM of the forward as this
machine's Triton compiled it (its registers differ by Triton version), reported by the first launch;
the split forward at the heuristic's largest split count (one row block) matches the unsplit one."""
import importlib

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

H, V = 256, 151936


def test_slices_follow_the_compiled_forward(monkeypatch):
    lin = importlib.import_module("lens_kernels.backends.triton.linear_token_logprobs")
    monkeypatch.setattr(lin, "_FWD_RESIDENT", {})
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(64, H, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
    targets = torch.randint(0, V, (64,), device="cuda", generator=g)
    block_n, block_v, _, warps, _ = lin.tile_config(hidden.device, torch.bfloat16, "tf32")
    cuda = hidden.device
    logp_one, ent_one = lin.linear_token_logprobs(hidden, weight, targets, return_entropy=True, vocab_splits=1)
    index = torch.cuda.current_device()
    resident = lin._FWD_RESIDENT.get((index, block_n, block_v))
    assert resident is not None and 1 <= resident <= 2048 // (32 * warps), "the launch reported no residency"
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    splits = lin.vocab_splits_for(64, V, cuda, block_n, block_v)
    assert splits == min(lin.FWD_WAVES * resident * sms, -(-V // block_v) // lin.MIN_TILES_PER_SLICE,
                         lin.MAX_VOCAB_SPLITS)
    print(f"lean forward bf16: {resident} program(s) per SM as compiled here; {splits} slices for one row block")
    logp, ent = lin.linear_token_logprobs(hidden, weight, targets, return_entropy=True)  # the heuristic's count
    assert torch.allclose(logp, logp_one, rtol=0, atol=1e-4) and torch.allclose(ent, ent_one, rtol=0, atol=1e-4)
