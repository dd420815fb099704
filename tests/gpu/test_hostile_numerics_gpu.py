"""tests/test_hostile_numerics.py on CUDA tensors: the triton and cuda backends compiled for the GPU
(and the torch backend on the GPU), fp32 and bf16, through every entry point: overflowing and
underflowing importance ratios for every loss type and both ratio levels, KL beyond its clamp,
finite logits near the fp32 maximum. Each case equals the float64 reference as the CPU module
defines it (the reference rounded to the result's dtype; non-finite only where that overflows).
Also: no host sync while the public ops run forward on these inputs. Skipped without CUDA."""
import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the CPU module

import lens_kernels as lk  # noqa: E402
import test_hostile_numerics as Hn  # noqa: E402
from lens_kernels import reference as ref  # noqa: E402
from seeds import stable_seed  # noqa: E402

LOGITS_BACKENDS = ["torch", "triton"] + (["cuda"] if lk.HAS_CUDA_EXT else [])
ENTRIES = ([("logps", "torch", torch.float32)]
           + [("logits", b, d) for b in LOGITS_BACKENDS for d in (torch.float32, torch.bfloat16)]
           + [("hidden", b, d) for b in ("torch", "triton") for d in (torch.float32, torch.bfloat16)])
# hidden path on the GPU: fp32 GEMMs as in tests/test_triton_hidden.py; bf16 inputs rounded once
HIDDEN_REL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _supported(entry):
    name, backend, _ = entry
    if backend != "cuda":
        return True
    try:
        lk.backend_for("policy_loss_from_logits" if name == "logits" else "policy_loss_from_hidden",
                       torch.empty(1, device="cuda"), backend)
    except RuntimeError:
        return False
    return True


def _run(entry, inputs, cfg, **kwargs):
    if not _supported(entry):
        pytest.skip(f"the {entry[1]} backend does not serve {entry[0]}")
    ours, want = Hn.run(entry, inputs, cfg, device="cuda", **kwargs)
    Hn.check_all(ours, want, entry, hidden_rel=HIDDEN_REL[entry[2]])


@pytest.mark.parametrize("entry", ENTRIES, ids=Hn.entry_id)
@pytest.mark.parametrize("log_ratio", list(Hn.LOG_RATIOS))
@pytest.mark.parametrize("loss", list(Hn.LOSSES))
def test_extreme_importance_ratio_gpu(entry, log_ratio, loss):
    inputs = Hn.make_inputs(entry, stable_seed("ratio_gpu", Hn.entry_id(entry), log_ratio, loss))
    old = Hn.under_mask_nan((inputs["logps64"] - Hn.LOG_RATIOS[log_ratio]).float(), inputs["mask"])
    _run(entry, inputs, Hn.LOSSES[loss], old_logps=old)


@pytest.mark.parametrize("entry", ENTRIES, ids=Hn.entry_id)
@pytest.mark.parametrize("diff", list(Hn.KL_DIFFS))
@pytest.mark.parametrize("kl", list(Hn.KL_CONFIGS))
def test_kl_beyond_the_clamp_gpu(entry, diff, kl):
    inputs = Hn.make_inputs(entry, stable_seed("kl_gpu", Hn.entry_id(entry), diff, kl))
    ref_logps = Hn.under_mask_nan((inputs["logps64"] + Hn.KL_DIFFS[diff]).float(), inputs["mask"])
    _run(entry, inputs, Hn.KL_CONFIGS[kl], ref_logps=ref_logps)


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_extreme_finite_logits_policy_loss_gpu(backend, entropy_coef):
    z, targets = Hn.extreme_logits(stable_seed("extreme_gpu", backend))
    mask = torch.ones(Hn.B, Hn.T, dtype=torch.bool)
    lp, _ = ref.token_logprobs(z, targets)
    inputs = dict(logits=z, targets=targets, mask=mask, advantages=torch.tensor([0.7, -1.2]), logps64=lp)
    cfg = Hn.LossConfig(entropy_coef=entropy_coef, beta=0.1, kl_clamp=10.0)
    _run(("logits", backend, torch.float32), inputs, cfg, old_logps=(lp - 0.1).float(), ref_logps=(lp + 0.2).float())


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_overflowing_ratios_run_without_host_sync(backend):
    entry = ("logits", backend, torch.float32)
    if not _supported(entry):
        pytest.skip(f"the {backend} backend does not serve logits")
    inputs = Hn.make_inputs(entry, stable_seed("sync_gpu", backend))
    x = inputs["logits"].cuda().requires_grad_()
    old = (inputs["logps64"] - 300.0).float().cuda()
    args = (inputs["targets"].cuda(), inputs["mask"].cuda().float(), inputs["advantages"].cuda())
    cfg = Hn.LossConfig(dual_clip=3.0, beta=0.1, kl_clamp=5.0)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = lk.policy_loss_from_logits(x, *args, old_logps=old, ref_logps=old + 400.0, config=cfg,
                                             num_tokens=torch.tensor(7.0, device="cuda"), backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    loss.backward()
    assert torch.isfinite(x.grad).all()
