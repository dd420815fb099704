"""The CUDA kernels (lens_kernels._C) on a GPU, against the float64 reference.

Fresh random inputs, outputs that must be written (NaN poison in the standalone binary; here every
value is compared), bf16/fp16/fp32 with per-dtype tolerances, odd V, strided logits[:, :-1] views,
masked rows and a fully masked sequence, every fused-loss kernel variant the device runs, ``auto`` at
the production shapes with the cluster size that ran asserted (8; the non-portable 16) and its
occupancy fallback, in place (with the version bump), the grad-scale contract, GSPO's 3-pass path,
-inf logits, kept targets outside [0, V), NaN under the mask, empty work, the per-sequence sums,
and torch.compile.
Skipped without a CUDA GPU and the built extension (benchmarks/device_check.sh runs them).
"""
import pytest
import torch
from seeds import stable_seed

import lens_kernels as lk
from lens_kernels import reference
from lens_kernels.backends import cuda as cuda_backend
from lens_kernels.config import LossConfig
import backend_calls as calls  # noqa: E402


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and lk.HAS_CUDA_EXT),
                       reason="needs a CUDA GPU and the built extension lens_kernels._C"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# log-prob / entropy: fp32 accumulation over V terms; gradient: rounding of the output dtype,
# relative to the largest gradient element
LOGP_TOL = dict(rtol=1e-5, atol=3e-4)
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
SHAPES = [(2, 5, 7), (3, 9, 1000), (2, 6, 4099), (1, 3, 151936)]


def _batch(B, T, V, dtype, strided, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    buf = 3.0 * torch.randn(B, T + 1, V, device="cuda", generator=gen)
    logits = (buf if strided else buf[:, :T].contiguous()).to(dtype)
    logits = logits[:, :T] if strided else logits
    targets = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    mask = torch.rand(B, T, device="cuda", generator=gen) > 0.2
    mask[-1] = False if B > 1 else mask[-1]  # a fully masked sequence
    targets = torch.where(mask, targets, torch.full_like(targets, -100))  # padding ids under the mask
    return logits, targets, mask, gen


def _grad_close(got, want, dtype):
    assert not torch.isnan(got).any()
    err = (got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)
    assert err <= GRAD_TOL[dtype], f"relative gradient error {err:.3e} > {GRAD_TOL[dtype]}"


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_forward_backward(dtype, shape, strided):
    logits, targets, mask, gen = _batch(*shape, dtype, strided, seed=stable_seed(str(dtype), shape, strided))
    temperature = 0.5 + torch.rand(shape[:2], device="cuda", generator=gen)
    x = logits.detach().requires_grad_(True)
    logp, entropy = lk.token_logprobs(x, targets, mask=mask, temperature=temperature, return_entropy=True,
                                      backend="cuda")
    x64 = logits.detach().double().requires_grad_(True)
    ref_logp, ref_entropy = reference.token_logprobs(x64, targets, temperature.double(), mask)
    assert logp.dtype == torch.float32 and (logp <= 0).all() and not torch.isnan(logp).any()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **LOGP_TOL)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **LOGP_TOL)
    g_l, g_h = torch.randn(shape[:2], device="cuda", generator=gen), torch.randn(shape[:2], device="cuda", generator=gen)
    (logp * g_l + entropy * g_h).sum().backward()
    (ref_logp * g_l + ref_entropy * g_h).sum().backward()
    _grad_close(x.grad, x64.grad, dtype)
    assert (x.grad[~mask] == 0).all(), "masked rows must get an exact-zero gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_inplace_backward(dtype):
    logits, targets, mask, gen = _batch(2, 7, 4099, dtype, False, seed=7)
    x64 = logits.double().requires_grad_(True)
    ref_logp, _ = reference.token_logprobs(x64, targets, 1.0, mask)
    ref_logp.sum().backward()
    x = logits.clone().requires_grad_(True)
    buf = x.detach()
    logp, _ = lk.token_logprobs(x, targets, mask=mask, inplace=True, backend="cuda")
    logp.sum().backward()
    _grad_close(x.grad, x64.grad, dtype)
    assert x.grad.data_ptr() == buf.data_ptr(), "inplace_backward must write dL/dlogits into the logits buffer"


def test_forward_op_on_strided_rows():
    logits, targets, mask, _ = _batch(3, 11, 1003, torch.bfloat16, True, seed=3)
    t, keep = targets.reshape(-1).contiguous(), mask.reshape(-1).contiguous()
    logp, entropy, _ = torch.ops.lens_kernels_cuda.token_logprobs_fwd(logits, t, keep, None, 1.0)
    ref_logp, ref_entropy = reference.token_logprobs(logits, targets, 1.0, mask)
    torch.testing.assert_close(logp.view(targets.shape).double(), ref_logp, **LOGP_TOL)
    torch.testing.assert_close(entropy.view(targets.shape).double(), ref_entropy, **LOGP_TOL)


CONFIGS = {
    "grpo": LossConfig(loss_agg_mode="seq-mean-token-mean"),
    "dapo_dual_clip_kl": LossConfig(epsilon_high=0.28, dual_clip=3.0, log_ratio_clamp=20.0, beta=0.04,
                                    kl_clamp=10.0),
    "delta_entropy_token_sum": LossConfig(delta=2.0, entropy_coef=0.01, loss_agg_mode="token-sum"),
    "cispo_k2": LossConfig(policy_loss="cispo", cispo_ratio_cap=2.0, beta=0.02, kl_estimator="k2"),
    "sapo_dr_grpo": LossConfig(policy_loss="sapo", loss_agg_mode="seq-mean-token-sum-norm", loss_norm_length=16),
    "gspo_3pass": LossConfig(ratio_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4),
}


@pytest.mark.parametrize("path", ["stream", "smem_row", "cluster"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_policy_loss_matches_reference(name, dtype, path):
    cfg = CONFIGS[name]
    V = 151936 if path == "cluster" else 4099
    if cuda_backend.fused_loss_path(V, dtype, path) != path:
        pytest.skip(f"the {path} variant does not run V={V} {dtype} on this device")
    B, T = 2, 6
    logits, targets, mask, gen = _batch(B, T, V, dtype, True, seed=stable_seed(name, str(dtype), path))
    adv = torch.randn(B, device="cuda", generator=gen)
    ref_lp, _ = reference.token_logprobs(logits, targets, 1.0, mask)
    old = (ref_lp + 0.3 * torch.randn(B, T, device="cuda", generator=gen, dtype=torch.float64)).float()
    ref = (ref_lp + 0.3 * torch.randn(B, T, device="cuda", generator=gen, dtype=torch.float64)).float()
    isw = 0.5 + torch.rand(B, T, device="cuda", generator=gen)
    kwargs = dict(old_logps=old, ref_logps=ref, is_weights=isw, config=cfg)
    x = logits.detach().requires_grad_(True)
    loss, metrics = calls.policy_loss_from_logits("cuda", x, targets, mask, adv, path=path, **kwargs)
    loss.backward()
    x64 = logits.detach().double().requires_grad_(True)
    ref_loss, ref_metrics = reference.policy_loss_from_logits(x64, targets, mask, adv, **kwargs)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-4, atol=1e-6)
    for key in ("policy_loss", "clip_frac", "ratio_mean", "ratio_max", "entropy"):
        torch.testing.assert_close(metrics[key].double(), ref_metrics[key].double(), rtol=1e-3, atol=1e-5)
    _grad_close(x.grad, x64.grad, dtype)
    assert (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_policy_loss_in_place_and_grad_scale(dtype):
    logits, targets, mask, gen = _batch(2, 5, 1001, dtype, False, seed=11)
    adv = torch.randn(2, device="cuda", generator=gen)
    cfg = LossConfig(entropy_coef=0.01)
    x64 = logits.double().requires_grad_(True)
    ref_loss, _ = reference.policy_loss_from_logits(x64, targets, mask, adv, config=cfg)
    (0.25 * ref_loss).backward()
    # the declared scale: dL/dz written once in forward, into the logits buffer
    x = logits.clone().requires_grad_(True)
    buf = x.detach()
    loss, _ = calls.policy_loss_from_logits("cuda", x, targets, mask, adv, config=cfg, grad_scale=0.25, inplace=True)
    (0.25 * loss).backward(retain_graph=True)
    assert x.grad.data_ptr() == buf.data_ptr()
    _grad_close(x.grad, x64.grad, dtype)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()
    # an undeclared scale: rescaled exactly on the device
    y = logits.clone().requires_grad_(True)
    loss, _ = calls.policy_loss_from_logits("cuda", y, targets, mask, adv, config=cfg)
    (0.25 * loss).backward()
    _grad_close(y.grad, x64.grad, dtype)


def test_ops_trace_under_torch_compile():
    logits, targets, mask, _ = _batch(2, 4, 1000, torch.bfloat16, False, seed=1)
    t, keep = targets.reshape(-1).contiguous(), mask.reshape(-1).contiguous()

    def f(z):
        logp, entropy, _ = torch.ops.lens_kernels_cuda.token_logprobs_fwd(z, t, keep, None, 1.0)
        return logp.sum() + entropy.sum()

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(logits), f(logits))


def test_backend_selection():
    logits, targets, mask, _ = _batch(1, 2, 11, torch.float32, False, seed=2)
    assert lk.backend_for("token_logprobs", logits, "cuda") == "cuda"
    assert lk.backend_for("token_logprobs", logits) in ("triton", "cuda")


# ---------------------------------------------------------------------------------------------
# auto at the production shapes: the cluster size that ran, the non-portable 16, the fallback
# ---------------------------------------------------------------------------------------------
PRODUCTION = [(torch.bfloat16, 151936, 8), (torch.float16, 262144, 16), (torch.float32, 151936, 16)]


def _sm90_cluster_build():
    return torch.cuda.get_device_capability()[0] >= 9 and cuda_backend.fused_loss_path(4099, torch.float32,
                                                                                        "cluster") == "cluster"


@pytest.mark.parametrize("fallback", [False, True], ids=["auto", "no_cluster_occupancy"])
@pytest.mark.parametrize("dtype,V,cluster", PRODUCTION, ids=lambda v: str(v))
def test_fused_loss_auto_at_production_shapes(dtype, V, cluster, fallback):
    B, T = 2, 3
    logits, targets, mask, gen = _batch(B, T, V, dtype, True, seed=stable_seed("production", str(dtype), V, fallback))
    adv = torch.randn(B, device="cuda", generator=gen)
    cfg = LossConfig(entropy_coef=0.01)
    ops = torch.ops.lens_kernels_cuda
    ops.set_debug_flags(1 if fallback else 0)  # lens::kDebugNoClusterOccupancy
    try:
        planned = cuda_backend._plan(ops.fused_loss_plan(B * T, V, cuda_backend._DTYPE_CODES[dtype], -1,
                                                         1 if fallback else 0))
        x = logits.detach().requires_grad_(True)
        loss, _ = calls.policy_loss_from_logits("cuda", x, targets, mask, adv, config=cfg)
        ran = cuda_backend.last_fused_loss_launch()
        loss.backward()
    finally:
        ops.set_debug_flags(0)
    assert ran == planned, (ran, planned)
    if _sm90_cluster_build():
        if fallback:
            assert ran["path"] != "cluster", ran
        else:
            assert ran["path"] == "cluster" and ran["cluster_size"] == cluster, ran
    if not fallback:
        assert cuda_backend.fused_loss_plan(V, dtype, rows=B * T) == planned
    x64 = logits.detach().double().requires_grad_(True)
    ref_loss, _ = reference.policy_loss_from_logits(x64, targets, mask, adv, config=cfg)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-4, atol=1e-6)
    _grad_close(x.grad, x64.grad, dtype)


# ---------------------------------------------------------------------------------------------
# docs/inputs.md on the device
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["stream", "smem_row", "cluster"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_logits_are_exact(dtype, path):
    V = 151936 if path == "cluster" else 4099
    if cuda_backend.fused_loss_path(V, dtype, path) != path:
        pytest.skip(f"the {path} variant does not run V={V} {dtype} on this device")
    B, T = 2, 4
    logits, targets, mask, gen = _batch(B, T, V, dtype, False, seed=stable_seed("-inf", str(dtype), path))
    logits[..., ::8] = float("-inf")  # the first element of every 16-byte vector (every thread's first)
    logits[0, :, : min(V - 1, 20000)] = float("-inf")  # whole fragments
    targets = torch.where(targets % 8 == 0, targets + 1, targets).clamp(max=V - 1)
    targets[0] = V - 1
    logits[0, :, V - 1] = 2.0
    adv = torch.randn(B, device="cuda", generator=gen)
    cfg = LossConfig(entropy_coef=0.01)
    x = logits.detach().requires_grad_(True)
    loss, metrics = calls.policy_loss_from_logits("cuda", x, targets, mask, adv, config=cfg, path=path)
    loss.backward()
    x64 = logits.detach().double().requires_grad_(True)
    ref_loss, ref_metrics = reference.policy_loss_from_logits(x64, targets, mask, adv, config=cfg)
    ref_loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(metrics["entropy"])
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(metrics["entropy"].double(), ref_metrics["entropy"].double(), rtol=1e-4, atol=1e-5)
    _grad_close(x.grad, x64.grad, dtype)
    assert (x.grad[logits == float("-inf")] == 0).all(), "a -inf logit has gradient exactly 0"
    logp, entropy = lk.token_logprobs(logits, targets, mask=mask, return_entropy=True, backend="cuda")
    ref_logp, ref_entropy = reference.token_logprobs(logits.double(), targets, 1.0, mask)
    torch.testing.assert_close(logp.double(), ref_logp, **LOGP_TOL)
    torch.testing.assert_close(entropy.double(), ref_entropy, **LOGP_TOL)


@pytest.mark.parametrize("path", ["stream", "smem_row", "cluster"])
def test_kept_target_outside_vocab_is_nan_never_probability_one(path):
    V = 151936 if path == "cluster" else 1000
    if cuda_backend.fused_loss_path(V, torch.bfloat16, path) != path:
        pytest.skip(f"the {path} variant does not run V={V} on this device")
    logits, targets, mask, gen = _batch(2, 3, V, torch.bfloat16, False, seed=stable_seed("bad target", path))
    mask[:] = True
    targets[0, 1], targets[1, 2] = V, -100  # kept, outside [0, V)
    logp, _ = calls.token_logprobs("cuda", logits, targets, mask)
    bad = torch.zeros_like(mask)
    bad[0, 1] = bad[1, 2] = True
    assert torch.isnan(logp[bad]).all() and not torch.isnan(logp[~bad]).any()
    x = logits.detach().requires_grad_(True)
    adv = torch.randn(2, device="cuda", generator=gen)
    loss, _ = calls.policy_loss_from_logits("cuda", x, targets, mask, adv, path=path)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(x.grad[bad]).all(), "a kept bad target gives a NaN gradient row"


def test_masked_positions_influence_nothing():
    logits, targets, mask, gen = _batch(2, 5, 1001, torch.bfloat16, False, seed=stable_seed("masked garbage"))
    poisoned = logits.clone()
    poisoned[~mask] = float("nan")
    adv = torch.randn(2, device="cuda", generator=gen)
    out = []
    for z in (logits, poisoned):
        x = z.detach().requires_grad_(True)
        loss, _ = calls.policy_loss_from_logits("cuda", x, targets, mask, adv)
        loss.backward()
        out.append((loss, x.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=0)
    assert (out[1][1][~mask] == 0).all()


@pytest.mark.parametrize("shape", [(0, 5, 11), (3, 0, 11)], ids=["B0", "T0"])
def test_empty_work_launches_nothing(shape):
    logits = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.zeros(shape[:2], dtype=torch.long, device="cuda")
    mask = torch.ones(shape[:2], dtype=torch.bool, device="cuda")
    logp, entropy = lk.token_logprobs(logits, targets, mask=mask, return_entropy=True, backend="cuda")
    assert logp.shape == shape[:2] and entropy.shape == shape[:2]
    loss, _ = calls.policy_loss_from_logits("cuda", logits, targets, mask, torch.zeros(shape[0], device="cuda"))
    loss.backward()
    assert float(loss) == 0.0 and logits.grad.shape == logits.shape


def test_in_place_write_bumps_the_version_of_a_saved_buffer():
    logits, targets, mask, gen = _batch(2, 3, 1001, torch.float32, False, seed=stable_seed("tanh"))
    h = logits.detach().requires_grad_(True)
    y = torch.tanh(h)  # saves its output for backward
    adv = torch.randn(2, device="cuda", generator=gen)
    loss, _ = calls.policy_loss_from_logits("cuda", y, targets, mask, adv, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
