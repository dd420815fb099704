"""GPU tests of the triton backend at real sizes (skipped without CUDA; run by the device script).

Real vocabularies (Qwen 151936, Llama-3 128256, GPT-2 50257: rows at every 16-byte phase, peeled),
the split-row cooperative variant against the row variant and the float64 reference, a 70000-token
sequence (Liger's (B, L) grid fails at L >= 65536), logits of +-1e4, and bitwise-identical results
run to run.
"""
import importlib

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

import lens_kernels as lk  # noqa: E402
from lens_kernels import LossConfig, reference  # noqa: E402

GRAD_REL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def _pl():
    return importlib.import_module("lens_kernels.backends.triton.policy_loss")


def _inputs(B, T, V, dtype, seed, scale=2.0, pad=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    base = (torch.randn(B, T + pad, V, generator=g, device="cuda") * scale).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g, device="cuda")
    mask = torch.rand(B, T, generator=g, device="cuda") > 0.2
    old = -torch.rand(B, T, generator=g, device="cuda") * 8
    return base, targets, mask, old


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30)).item()


def _reference_rows(view, targets, mask, adv, old, cfg, rows=64):
    """Float64 reference of the first ``rows`` tokens' sequences (keeps the reference's [.., V] fp64 small)."""
    b = max(1, rows // view.shape[1])
    z = view[:b].detach().double().requires_grad_(True)
    loss, metrics = reference.policy_loss_from_logits(z, targets[:b], mask[:b], adv[:b], old_logps=old[:b],
                                                      config=cfg, num_tokens=mask.sum(), num_sequences=view.shape[0])
    loss.backward()
    return z.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("V", [151936, 128256, 50257])
@pytest.mark.parametrize("variant", ["split", "row"])
def test_real_vocab_both_variants(monkeypatch, dtype, V, variant):
    monkeypatch.setenv("LENS_KERNELS_TRITON_VARIANT", variant)
    B, T = 4, 64
    base, targets, mask, old = _inputs(B, T, V, dtype, seed=V)
    adv = torch.randn(B, device="cuda")
    cfg = LossConfig(epsilon_high=0.28, dual_clip=3.0, beta=0.0, entropy_coef=0.01)
    ref_grad = _reference_rows(base[:, :-1], targets, mask, adv, old, cfg, rows=T)
    base.requires_grad_(True)
    loss, metrics = lk.policy_loss_from_logits(base[:, :-1], targets, mask, adv, old_logps=old, config=cfg,
                                               num_tokens=mask.sum(), num_sequences=B, backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert _rel_err(base.grad[:1, :-1], ref_grad) <= GRAD_REL[dtype]
    assert (base.grad[:, :-1][~mask] == 0).all()
    torch_loss, _ = lk.policy_loss_from_logits(base.detach()[:, :-1].float(), targets, mask, adv, old_logps=old,
                                               config=cfg, num_tokens=mask.sum(), num_sequences=B, backend="torch")
    assert abs(loss.item() - torch_loss.item()) <= 1e-4 * max(1.0, abs(torch_loss.item()))


def test_split_and_row_variants_agree(monkeypatch):
    base, targets, mask, old = _inputs(2, 256, 151936, torch.bfloat16, seed=1, pad=0)
    adv = torch.randn(2, device="cuda")
    grads = {}
    for variant in ("split", "row"):
        monkeypatch.setenv("LENS_KERNELS_TRITON_VARIANT", variant)
        z = base.clone().requires_grad_(True)
        loss, _ = lk.policy_loss_from_logits(z, targets, mask, adv, old_logps=old, backend="triton")
        loss.backward()
        grads[variant] = (loss.detach(), z.grad)
    assert abs(grads["split"][0] - grads["row"][0]) <= 1e-5 * max(1.0, abs(grads["row"][0].item()))
    assert _rel_err(grads["split"][1].float(), grads["row"][1].float()) <= 1e-2


def test_one_sequence_of_70000_tokens():
    B, T, V = 1, 70000, 4096
    base, targets, mask, old = _inputs(B, T, V, torch.bfloat16, seed=2, pad=0)
    adv = torch.randn(B, device="cuda")
    z = base.clone().requires_grad_(True)
    loss, metrics = lk.policy_loss_from_logits(z, targets, mask, adv, old_logps=old, backend="triton")
    loss.backward()
    logp, entropy = lk.token_logprobs(base, targets, mask=mask, return_entropy=True, backend="triton")
    ref_logp, ref_entropy = lk.token_logprobs(base[:, -8:].float(), targets[:, -8:], mask=mask[:, -8:],
                                              return_entropy=True, backend="torch")
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert (logp[:, -8:] - ref_logp).abs().max() < 1e-4 and (entropy[:, -8:] - ref_entropy).abs().max() < 1e-3
    assert (z.grad[~mask] == 0).all()


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_logits_of_1e4(scale):
    V = 151936
    g = torch.Generator(device="cuda").manual_seed(3)
    base = ((torch.rand(2, 8, V, generator=g, device="cuda") * 2 - 1) * scale).to(torch.bfloat16)
    targets = torch.randint(0, V, (2, 8), generator=g, device="cuda")
    mask = torch.ones(2, 8, dtype=torch.bool, device="cuda")
    adv = torch.randn(2, device="cuda")
    z = base.clone().requires_grad_(True)
    loss, _ = lk.policy_loss_from_logits(z, targets, mask, adv, config=LossConfig(entropy_coef=0.01),
                                         backend="triton")
    loss.backward()
    ref = base[:1].double().requires_grad_(True)
    ref_loss, _ = reference.policy_loss_from_logits(ref, targets[:1], mask[:1], adv[:1],
                                                    config=LossConfig(entropy_coef=0.01), num_sequences=2,
                                                    num_tokens=16)
    ref_loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad.float()).all()
    assert _rel_err(z.grad[:1].float(), ref.grad) <= 2e-2
    logp, _ = lk.token_logprobs(base, targets, backend="triton")
    assert (logp <= 0).all()


def test_bitwise_identical_run_to_run():
    base, targets, mask, old = _inputs(8, 512, 151936, torch.bfloat16, seed=4, pad=0)
    adv = torch.randn(8, device="cuda")
    cfg = LossConfig(beta=0.01, entropy_coef=0.01)
    runs = []
    for _ in range(3):
        z = base.clone().requires_grad_(True)
        loss, metrics = lk.policy_loss_from_logits(z, targets, mask, adv, old_logps=old, ref_logps=old, config=cfg,
                                                   backend="triton")
        loss.backward()
        logp, entropy = lk.token_logprobs(base, targets, mask=mask, return_entropy=True, backend="triton")
        runs.append((loss.detach(), torch.stack(list(metrics.values())), z.grad, logp, entropy))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_auto_prefers_triton_on_cuda_and_torch_for_fp64():
    x = torch.zeros(2, 3, 10, device="cuda")
    assert lk.backend_for("policy_loss_from_logits", x) in ("triton", "cuda")
    assert lk.backend_for("policy_loss_from_logits", x.double()) == "torch"


# The split variant's tests carry "split" in their names: the device script runs them last, on their
# own, under `timeout -k` (``pytest -k split``), so that a hang there cannot take the other results.
@pytest.mark.parametrize("V", [151936, 50257])
def test_split_in_place_equals_row_out_of_place(monkeypatch, V):
    """In place, a block's gradient may land on the target logit before another block of the row has
    read it: every program must read the target logit before it publishes its arrival. At V = 50257
    the rows are peeled: block 0 also owns the head and tail of its row."""
    base, targets, mask, old = _inputs(4, 128, V, torch.float32, seed=5, pad=0)
    adv = torch.randn(4, device="cuda")
    cfg = LossConfig(entropy_coef=0.01, beta=0.02)
    results = {}
    for variant, inplace in (("split", True), ("row", False)):
        monkeypatch.setenv("LENS_KERNELS_TRITON_VARIANT", variant)
        z = base.clone().requires_grad_(True)
        loss, metrics = lk.policy_loss_from_logits(z, targets, mask, adv, old_logps=old, ref_logps=old, config=cfg,
                                                   backend="triton", inplace=inplace)
        loss.backward()
        results[variant] = (loss.detach(), torch.stack(list(metrics.values())), z.grad if not inplace else z.detach())
    assert _rel_err(results["split"][0], results["row"][0]) <= 1e-5
    assert _rel_err(results["split"][1], results["row"][1]) <= 1e-5
    assert _rel_err(results["split"][2], results["row"][2]) <= 1e-5


def test_split_choice_checks_resident_capacity():
    pl = _pl()
    capacity = pl.resident_programs(torch.device("cuda"), pl.split_reg_budget(torch.bfloat16),
                                    pl.SPLIT_NUM_WARPS)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert sms <= capacity <= 16 * sms
    assert pl.split_fits(151936, torch.device("cuda"), torch.bfloat16) == (19 <= capacity // 2)
    # after a launch, the compiled kernel's own register count replaces the budget
    base, targets, mask, old = _inputs(1, 4, 151936, torch.bfloat16, seed=7, pad=0)
    pl.fused_policy_loss_forward(base, None, targets, mask, torch.ones(1, device="cuda"), old, None, None, 1.0,
                                 LossConfig(), None, None, 1.0, variant="split")
    regs = pl._SPLIT_REGS.get((torch.cuda.current_device(), torch.bfloat16))
    assert regs is not None and 0 < regs <= pl.split_reg_budget(torch.bfloat16)


def test_logits_past_2_31_elements():
    """More than 2^31 logits in one tensor: every row offset past 2^31 elements must be int64."""
    V = 151936
    T = 2 ** 31 // V + 8  # 14142 + 8 rows: the last rows start past element 2^31
    g = torch.Generator(device="cuda").manual_seed(6)
    base = torch.randn(1, T, V, generator=g, device="cuda", dtype=torch.bfloat16)
    assert base.numel() > 2 ** 31
    targets = torch.randint(0, V, (1, T), generator=g, device="cuda")
    mask = torch.ones(1, T, dtype=torch.bool, device="cuda")
    tail = slice(T - 8, T)
    want = torch.log_softmax(base[0, tail].double(), -1).gather(-1, targets[0, tail, None])[:, 0]
    logp, _ = lk.token_logprobs(base, targets, mask=mask, backend="triton")
    assert (logp[0, tail].double() - want).abs().max() < 1e-4 * want.abs().max()
    adv = torch.randn(1, device="cuda")
    ref = base[:, tail].double().requires_grad_(True)
    ref_loss, _ = reference.policy_loss_from_logits(ref, targets[:, tail], mask[:, tail], adv, num_tokens=T,
                                                    num_sequences=1)
    ref_loss.backward()
    z = base.requires_grad_(True)  # in place: the gradient overwrites the 4.3 GB of logits
    loss, _ = lk.policy_loss_from_logits(z, targets, mask, adv, backend="triton", inplace=True)
    loss.backward()
    assert _rel_err(z.grad[:, tail].float(), ref.grad) <= GRAD_REL[torch.bfloat16]
