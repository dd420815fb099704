"""Hostile numerics against the float64 reference, on every backend that runs here (torch; triton under
the interpreter; the CUDA kernels' per-token math compiled for the CPU), through every entry point of
the loss (``lk.policy_loss`` on log-probs, ``policy_loss_from_logits``, ``policy_loss_from_hidden``):

- importance ratios that overflow fp32 (a per-token or sequence log-ratio of +100 or +300 nats: stale
  or mismatched old log-probs) or underflow it (-100 nats), for every loss type and both ratio levels;
- KL estimates beyond their clamp (k1, k2, k3 at a log-ratio of +-100 to the reference model), and an
  unclamped k3 that overflows;
- finite logits near the fp32 maximum, of both signs, in one row;
- numpy scalars wherever a Python number is taken, and bad ones rejected by name.

Each case equals the reference's number. The reference is float64, where none of these values
overflows (exp(300) ~ 2e130); a result in fp32 is compared with the reference rounded to fp32: where
that rounding overflows (an unbounded term, e.g. PPO without dual clip at A < 0 and rho ~ 1e43), the
result must be non-finite too (the loss the same +inf; a gradient row not finite), and everywhere
else finite and within the suite's per-dtype tolerances (tests/tolerances.py). A gate (clip, cap,
saturated sigmoid, KL clamp) gives exactly the reference's 0 gradient, never 0 * inf = NaN.

The GPU variants (triton and cuda on CUDA tensors, bf16 too) are tests/gpu/test_hostile_numerics_gpu.py.
"""
from triton_interp import DEVICE as TRITON_DEVICE  # noqa: I001  (sets TRITON_INTERPRET first)

import ctypes
import os
import shutil
import subprocess
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lens_kernels as lk
from lens_kernels import LossConfig
from lens_kernels import reference as ref
from lens_kernels import _validation
from seeds import stable_seed
from tolerances import assert_grad_close, assert_value_close

F64 = torch.float64
B, T, V, H_DIM = 2, 4, 24, 8

LOSSES = {
    "ppo": LossConfig(),
    "dual_clip": LossConfig(dual_clip=3.0),
    "delta": LossConfig(delta=4.0),
    "cispo": LossConfig(policy_loss="cispo"),
    "sapo": LossConfig(policy_loss="sapo"),
    "gspo_sequence": LossConfig(ratio_level="sequence"),
    "gspo_sequence_token": LossConfig(ratio_level="sequence_token"),
}
LOG_RATIOS = {"above_100": 100.0, "above_300": 300.0, "below_100": -100.0}
KL_CONFIGS = {
    "k1_clamp": LossConfig(beta=0.5, kl_estimator="k1", kl_clamp=5.0),
    "k2_clamp": LossConfig(beta=0.5, kl_estimator="k2", kl_clamp=5.0),
    "k3_clamp": LossConfig(beta=0.5, kl_estimator="k3", kl_clamp=5.0),
    "k3_unclamped": LossConfig(beta=0.5, kl_estimator="k3"),
}
KL_DIFFS = {"ref_above_100": 100.0, "ref_below_100": -100.0}
# (entry point, backend, dtype): log-probs go through the torch formulas whatever the backend
ENTRIES = [
    ("logps", "torch", torch.float32), ("logps", "torch", F64),
    ("logits", "torch", torch.float32), ("logits", "torch", F64), ("logits", "triton", torch.float32),
    ("hidden", "torch", torch.float32), ("hidden", "triton", torch.float32),
]
# the hidden path's fp32 GEMMs: measured ~1e-6 of the gradient's scale on these small, O(1) inputs
HIDDEN_REL = 2e-5


def entry_id(entry):
    name, backend, dtype = entry
    return f"{name}-{backend}-{str(dtype).replace('torch.', '')}"


def device_for(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


# ---------------------------------------------------------------------------------------------
# inputs and the two runs (ours, the reference's)
# ---------------------------------------------------------------------------------------------
def make_inputs(entry, seed):
    """Float64 logits (or hidden and weight), targets, a mask with one masked token (its old and
    reference log-probs NaN: never read) and the reference's own log-probs of the inputs as rounded
    to the case's dtype, from which the hostile old and reference log-probs are built."""
    name, _, dtype = entry
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -1] = False
    out = dict(targets=targets, mask=mask, advantages=torch.tensor([1.0, -1.0]))
    if name == "hidden":
        out["hidden"] = torch.randn(B, T, H_DIM, generator=g, dtype=F64).to(dtype)
        out["weight"] = (torch.randn(V, H_DIM, generator=g, dtype=F64) * 0.5).to(dtype)
        lp, _ = ref.linear_token_logprobs(out["hidden"], out["weight"], targets, mask=mask)
    else:
        out["logits"] = (2.0 * torch.randn(B, T, V, generator=g, dtype=F64)).to(dtype)
        lp, _ = ref.token_logprobs(out["logits"], targets, mask=mask)
    out["logps"] = lp.to(dtype)
    out["logps64"] = lp
    return out


def under_mask_nan(x, mask):
    return torch.where(mask, x, torch.full((), float("nan"), dtype=x.dtype))


def run(entry, inputs, cfg, old_logps=None, ref_logps=None, temperature=1.0, num_tokens=None, device=None,
        backend=None, **kwargs):
    """(ours, want): dicts of loss, metrics and the gradients of the differentiable inputs."""
    name, entry_backend, dtype = entry
    backend = backend or entry_backend
    device = device or device_for(backend)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    common = dict(old_logps=to(old_logps), ref_logps=to(ref_logps), config=cfg, num_tokens=num_tokens)
    common.update(kwargs)
    want_common = dict(old_logps=old_logps, ref_logps=ref_logps, config=cfg,
                       num_tokens=None if num_tokens is None else float(num_tokens))
    targets, mask, adv = to(inputs["targets"]), to(inputs["mask"]), to(inputs["advantages"])
    if name == "logps":
        x = inputs["logps"].detach().clone().to(device).requires_grad_()
        loss, metrics = lk.policy_loss(x, adv, mask, **common)
        x64 = inputs["logps64"].detach().clone().requires_grad_()
        want_loss, want_metrics = ref.policy_loss(x64, inputs["advantages"], inputs["mask"], **want_common)
        leaves, want_leaves = {"logps": x}, {"logps": x64}
    elif name == "logits":
        x = inputs["logits"].detach().clone().to(device).requires_grad_()
        loss, metrics = lk.policy_loss_from_logits(x, targets, mask, adv, temperature=temperature, backend=backend,
                                                   **common)
        x64 = inputs["logits"].detach().to(F64, copy=True).requires_grad_()
        want_loss, want_metrics = ref.policy_loss_from_logits(x64, inputs["targets"], inputs["mask"],
                                                              inputs["advantages"], temperature=float(temperature),
                                                              **want_common)
        leaves, want_leaves = {"logits": x}, {"logits": x64}
    else:
        h = inputs["hidden"].detach().clone().to(device).requires_grad_()
        w = inputs["weight"].detach().clone().to(device).requires_grad_()
        loss, metrics = lk.policy_loss_from_hidden(h, w, targets, mask, adv, temperature=temperature,
                                                   backend=backend, **common)
        h64 = inputs["hidden"].detach().to(F64, copy=True).requires_grad_()
        w64 = inputs["weight"].detach().to(F64, copy=True).requires_grad_()
        want_loss, want_metrics = ref.policy_loss_from_hidden(h64, w64, inputs["targets"], inputs["mask"],
                                                              inputs["advantages"], temperature=float(temperature),
                                                              **want_common)
        leaves, want_leaves = {"hidden": h, "weight": w}, {"hidden": h64, "weight": w64}
    loss.backward()
    want_loss.backward()
    ours = dict(loss=loss, metrics=metrics, grads={k: v.grad for k, v in leaves.items()})
    want = dict(loss=want_loss, metrics=want_metrics, grads={k: v.grad for k, v in want_leaves.items()})
    return ours, want


# ---------------------------------------------------------------------------------------------
# comparison with the reference rounded to the result's dtype
# ---------------------------------------------------------------------------------------------
def check_value(got, want, dtype, name):
    got = got.detach().double().cpu()
    rounded = want.detach().to(dtype).double()
    if torch.isnan(rounded):
        assert torch.isnan(got), f"{name}: {got.item()} where the reference is NaN"
    elif torch.isinf(rounded):
        assert got == rounded, f"{name}: {got.item()}, the reference {want.item():.4g} rounds to {rounded.item()}"
    else:
        assert torch.isfinite(got), f"{name}: {got.item()} where the reference is {want.item():.6g}"
        assert_value_close(got, want, dtype, name)


def check_grad(got, want, dtype, name, rel=None):
    """Rows (a token's dL/dz or dL/dh; a log-prob gradient element by element; dL/dW whole) whose
    reference overflows in ``dtype`` must not be finite; every other row is finite and close."""
    assert got is not None, f"{name}: no gradient"
    got, want = got.detach().double().cpu(), want.detach().cpu()
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if name in ("logits", "hidden"):
        got_rows, want_rows = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    elif name == "weight":
        got_rows, want_rows = got.reshape(1, -1), want.reshape(1, -1)
    else:
        got_rows, want_rows = got.reshape(-1, 1), want.reshape(-1, 1)
    assert not torch.isnan(want_rows).any(), f"{name}: the reference itself is NaN"
    overflow = ~torch.isfinite(want_rows.to(dtype)).all(-1)
    for row in overflow.nonzero().flatten().tolist():
        assert not torch.isfinite(got_rows[row]).all(), \
            f"{name}: row {row} finite where the reference ({want_rows[row].abs().max():.3g}) overflows {dtype}"
    keep = ~overflow
    if keep.any():
        if rel is None:
            assert_grad_close(got_rows[keep], want_rows[keep], dtype, name)
        else:
            g, w = got_rows[keep], want_rows[keep]
            assert torch.isfinite(g).all(), f"{name}: non-finite values"
            scale = max(w.abs().max().item(), 1e-30)
            err = (g - w).abs().max().item()
            assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} x {scale:.3g}"


def check_all(ours, want, entry, hidden_rel=HIDDEN_REL):
    """Loss and metrics (computed in fp32 from inputs of any float dtype, fp64 for fp64 inputs) and the
    gradients (in the inputs' dtype) against the reference."""
    name, _, dtype = entry
    value_dtype = F64 if dtype == F64 else torch.float32
    check_value(ours["loss"], want["loss"], value_dtype, "loss")
    for metric, value in want["metrics"].items():
        check_value(ours["metrics"][metric], value, value_dtype, metric)
    for leaf, grad in want["grads"].items():
        check_grad(ours["grads"][leaf], grad, dtype, leaf, rel=hidden_rel if name == "hidden" else None)


# ---------------------------------------------------------------------------------------------
# the reference itself: finite, and exactly 0 where a gate closes
# ---------------------------------------------------------------------------------------------
# tokens of A > 0 (row 0) / A < 0 (row 1) whose ratio term is gated (gradient exactly 0) at +log-ratio
GATED_ABOVE = {"ppo": (True, False), "dual_clip": (True, True), "delta": (True, True), "cispo": (False, False),
               "sapo": (True, True), "gspo_sequence": (True, False), "gspo_sequence_token": (True, False)}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_reference_gradient_is_finite_and_exactly_zero_when_gated(loss):
    cfg = LOSSES[loss]
    inputs = make_inputs(("logps", "torch", F64), stable_seed("reference", loss))
    for log_ratio in LOG_RATIOS.values():
        x = inputs["logps64"].clone().requires_grad_()
        old = under_mask_nan(inputs["logps64"] - log_ratio, inputs["mask"])
        ref.policy_loss(x, inputs["advantages"], inputs["mask"], old_logps=old, config=cfg)[0].backward()
        assert torch.isfinite(x.grad).all(), (loss, log_ratio, x.grad)
        if log_ratio > 0:
            for row, gated in enumerate(GATED_ABOVE[loss]):
                if gated:
                    assert (x.grad[row] == 0).all(), (loss, row, x.grad[row])
                else:
                    assert (x.grad[row][inputs["mask"][row]] != 0).all(), (loss, row, x.grad[row])


# ---------------------------------------------------------------------------------------------
# overflowing and underflowing importance ratios
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
@pytest.mark.parametrize("log_ratio", list(LOG_RATIOS))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_extreme_importance_ratio(entry, log_ratio, loss):
    inputs = make_inputs(entry, stable_seed("ratio", entry_id(entry), log_ratio, loss))
    old = under_mask_nan((inputs["logps64"] - LOG_RATIOS[log_ratio]).to(entry[2]), inputs["mask"])
    ours, want = run(entry, inputs, LOSSES[loss], old_logps=old)
    check_all(ours, want, entry)
    # a gated token's gradient is the reference's exact 0 (dL/dz of its row all zeros)
    grad = ours["grads"].get("logits", ours["grads"].get("logps"))
    if grad is not None and LOG_RATIOS[log_ratio] > 0 and loss in ("dual_clip", "delta", "sapo"):
        assert (grad.detach().cpu()[inputs["mask"]] == 0).all()


# ---------------------------------------------------------------------------------------------
# KL beyond its clamp
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
@pytest.mark.parametrize("diff", list(KL_DIFFS))
@pytest.mark.parametrize("kl", list(KL_CONFIGS))
def test_kl_beyond_the_clamp(entry, diff, kl):
    inputs = make_inputs(entry, stable_seed("kl", entry_id(entry), diff, kl))
    ref_logps = under_mask_nan((inputs["logps64"] + KL_DIFFS[diff]).to(entry[2]), inputs["mask"])
    ours, want = run(entry, inputs, KL_CONFIGS[kl], ref_logps=ref_logps)
    check_all(ours, want, entry)


# ---------------------------------------------------------------------------------------------
# finite logits near the fp32 maximum, both signs in one row
# ---------------------------------------------------------------------------------------------
EXTREME_V = 300  # several lanes and the peeled edge of a row


def extreme_logits(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, EXTREME_V, generator=g, dtype=F64)
    targets = torch.randint(0, EXTREME_V, (B, T), generator=g)
    z[0, 0, :5] = torch.tensor([3e38, -3e38, 3.3e38, -3.4e38, 1e38], dtype=F64)
    targets[0, 0] = 2
    z[0, 1, 100:200] = -3.0e38  # a lane's first values far below, its later one far above
    z[0, 1, 250] = 3.0e38
    targets[0, 1] = 250
    z[0, 2, 0:50] = -3.4e38  # two equal maxima: p = 1/2 each, H = log 2
    z[0, 2, 7] = z[0, 2, 260] = 3.0e38
    targets[0, 2] = 7
    z[1, 2] = torch.linspace(-3.4e38, 3.4e38, EXTREME_V, dtype=F64)
    targets[1, 2] = EXTREME_V - 1
    z[1, 3, 3] = -3.4e38  # one extreme value in an otherwise ordinary row
    return z.float(), targets




@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_entropy", [True, False], ids=["entropy", "no_entropy"])
def test_extreme_finite_logits_token_logprobs(backend, with_entropy):
    z, targets = extreme_logits(stable_seed("extreme", "token_logprobs"))
    device = device_for(backend)
    x = z.detach().clone().to(device).requires_grad_()
    logp, entropy = lk.token_logprobs(x, targets.to(device), return_entropy=with_entropy, backend=backend)
    x64 = z.detach().double().requires_grad_()
    want_logp, want_entropy = ref.token_logprobs(x64, targets)
    total = logp.sum() + (entropy.sum() if with_entropy else 0.0)
    want_total = want_logp.sum() + (want_entropy.sum() if with_entropy else 0.0)
    total.backward()
    want_total.backward()
    check_grad(logp.detach().reshape(-1, 1), want_logp.detach().reshape(-1, 1), torch.float32, "logp")
    if with_entropy:
        assert_grad_close(entropy.cpu(), want_entropy, torch.float32, "entropy")
        assert abs(entropy[0, 2].item() - np.log(2.0)) < 1e-6
    check_grad(x.grad, x64.grad, torch.float32, "logits")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_extreme_finite_logits_policy_loss(backend, entropy_coef):
    z, targets = extreme_logits(stable_seed("extreme", "policy_loss"))
    mask = torch.ones(B, T, dtype=torch.bool)
    lp, _ = ref.token_logprobs(z, targets)
    inputs = dict(logits=z, targets=targets, mask=mask, advantages=torch.tensor([0.7, -1.2]), logps64=lp)
    cfg = LossConfig(entropy_coef=entropy_coef, beta=0.1, kl_clamp=10.0)
    entry = ("logits", backend, torch.float32)
    ours, want = run(entry, inputs, cfg, old_logps=(lp - 0.1).float(), ref_logps=(lp + 0.2).float())
    check_all(ours, want, entry)


# ---------------------------------------------------------------------------------------------
# numpy scalars: accepted as the Python numbers they are, rejected by name when bad
# ---------------------------------------------------------------------------------------------
NUMPY_CASES = {
    "temperature_float32": dict(temperature=np.float32(0.75)),
    "num_tokens_int64": dict(num_tokens=np.int64(9)),
    "config_float32": dict(config=LossConfig(epsilon_low=np.float32(0.2), epsilon_high=np.float64(0.28),
                                             beta=np.float32(0.05), kl_clamp=np.int64(3))),
}


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e[2] == torch.float32], ids=entry_id)
@pytest.mark.parametrize("case", list(NUMPY_CASES))
def test_numpy_scalars_are_numbers(entry, case):
    kwargs = dict(NUMPY_CASES[case])
    if entry[0] == "logps" and "temperature" in kwargs:
        pytest.skip("log-prob input takes no temperature")
    inputs = make_inputs(entry, stable_seed("numpy", entry_id(entry), case))
    cfg = kwargs.pop("config", LossConfig(beta=0.05))
    if "temperature" in kwargs:  # the reference log-probs at this temperature
        source = inputs.get("logits")
        lp = ref.token_logprobs(source, inputs["targets"], float(kwargs["temperature"]), inputs["mask"])[0] \
            if source is not None else ref.linear_token_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"],
                                                                  temperature=float(kwargs["temperature"]),
                                                                  mask=inputs["mask"])[0]
        inputs["logps64"] = lp
    old = (inputs["logps64"] - 0.3).to(entry[2])
    ours, want = run(entry, inputs, cfg, old_logps=old, ref_logps=(inputs["logps64"] + 0.4).to(entry[2]), **kwargs)
    check_all(ours, want, entry)
    assert all(type(getattr(cfg, f)) is float for f in ("epsilon_low", "beta"))


def _trl(**fields):
    return types.SimpleNamespace(**fields)


BAD_NUMBERS = {
    "temperature_negative": (lambda x, t, m, a: lk.token_logprobs(x, t, temperature=np.float32(-1.0)),
                             ValueError, "temperature"),
    "temperature_nan": (lambda x, t, m, a: lk.token_logprobs(x, t, temperature=np.float64("nan")),
                        ValueError, "temperature"),
    "temperature_bool": (lambda x, t, m, a: lk.token_logprobs(x, t, temperature=np.bool_(True)),
                         TypeError, "temperature"),
    "num_tokens_zero": (lambda x, t, m, a: lk.policy_loss_from_logits(x, t, m, a, num_tokens=np.int64(0)),
                        ValueError, "num_tokens"),
    "num_sequences_inf": (lambda x, t, m, a: lk.policy_loss_from_logits(x, t, m, a, num_sequences=np.float32("inf")),
                          ValueError, "num_sequences"),
    "grad_scale_negative": (lambda x, t, m, a: lk.policy_loss_from_logits(x, t, m, a, grad_scale=np.float32(-2.0)),
                            ValueError, "grad_scale"),
    "config_nan": (lambda *_: LossConfig(epsilon_low=np.float32("nan")), ValueError, "epsilon_low"),
    "config_bool": (lambda *_: LossConfig(beta=np.bool_(True)), TypeError, "beta"),
    "verl_clip_ratio_high": (lambda *_: LossConfig.from_verl(_trl(clip_ratio_high=-0.1)), ValueError,
                             "actor_cfg.clip_ratio_high"),
    "verl_clip_ratio": (lambda *_: LossConfig.from_verl(_trl(clip_ratio=1.5)), ValueError, "actor_cfg.clip_ratio"),
    "verl_clip_ratio_c": (lambda *_: LossConfig.from_verl(_trl(clip_ratio_c=0.5)), ValueError,
                          "actor_cfg.clip_ratio_c"),
    "trl_epsilon_high": (lambda *_: LossConfig.from_trl(_trl(epsilon_high=-1.0)), ValueError, "args.epsilon_high"),
    "trl_beta": (lambda *_: LossConfig.from_trl(_trl(beta=-0.5)), ValueError, "args.beta"),
    "openrlhf_eps_clip": (lambda *_: LossConfig.from_openrlhf(_trl(eps_clip=1.5)), ValueError, "args.eps_clip"),
    "openrlhf_pair": (lambda *_: LossConfig.from_openrlhf(_trl(eps_clip_low_high=(0.2, -0.3))), ValueError,
                      r"args.eps_clip_low_high\[1\]"),
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_bad_numbers_are_named(case):
    call, error, name = BAD_NUMBERS[case]
    g = torch.Generator().manual_seed(stable_seed("bad", case))
    x = torch.randn(B, T, V, generator=g, requires_grad=True)
    t = torch.randint(0, V, (B, T), generator=g)
    with pytest.raises(error, match=name):
        call(x, t, torch.ones(B, T), torch.ones(B))


def test_an_override_keeps_the_loss_config_name():
    with pytest.raises(ValueError, match="^epsilon_high must be >= 0"):
        LossConfig.from_verl(_trl(), epsilon_high=-1.0)


# ---------------------------------------------------------------------------------------------
# inputs that get no gradient: one warning per process and argument name
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argument", list(_validation.NO_GRAD_INPUTS))
def test_gradient_less_inputs_warn_once(argument, monkeypatch):
    monkeypatch.setattr(_validation, "_NO_GRAD_WARNED", set())
    g = torch.Generator().manual_seed(stable_seed("no_grad", argument))
    x = torch.randn(B, T, V, generator=g, requires_grad=True)
    t = torch.randint(0, V, (B, T), generator=g)
    lp = torch.log_softmax(x.detach(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    values = dict(old_logps=lp - 0.1, ref_logps=lp + 0.1, is_weights=torch.rand(B, T, generator=g) + 0.5,
                  temperature=torch.tensor(0.9))
    kwargs = {argument: values[argument].clone().requires_grad_()}
    cfg = LossConfig(beta=0.1)
    kwargs.setdefault("ref_logps", values["ref_logps"])
    for attempt in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, _ = lk.policy_loss_from_logits(x, t, torch.ones(B, T), torch.ones(B), config=cfg, **kwargs)
            loss.backward()
        mine = [w for w in caught if "receives no gradient" in str(w.message)]
        assert len(mine) == (1 if attempt == 0 else 0), [str(w.message) for w in caught]
        if attempt == 0:
            assert argument in str(mine[0].message)
            assert mine[0].filename == __file__  # it points at the caller's line
        assert kwargs[argument].grad is None


# ---------------------------------------------------------------------------------------------
# the CUDA kernels' per-token math (csrc/loss_math.cuh), compiled for the CPU
# ---------------------------------------------------------------------------------------------
CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
TOKEN_LOSSES = [name for name, cfg in LOSSES.items() if cfg.ratio_level == "token"]


@pytest.fixture(scope="module")
def token_terms_lib(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    lib = tmp_path_factory.mktemp("hostile_token_terms") / "token_terms.so"
    cmd = [NVCC, "-x", "c++", "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "-I", str(CSRC),
           str(CSRC / "test" / "token_terms_host.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(lib))


def cuda_token_terms(lib, cfg, l, l_old, l_ref, A, w, isw):
    from lens_kernels.backends import cuda as cuda_backend
    n = l.numel()
    out = [torch.full((n,), float("nan")) for _ in range(3)]
    fptr = lambda t: ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))  # noqa: E731
    params = torch.tensor(cuda_backend._loss_params(cfg, 1.0), dtype=F64)
    lib.lens_token_terms(ctypes.c_long(n), fptr(l), fptr(l_old), ctypes.c_int(1), fptr(l_ref), fptr(A), fptr(w),
                         fptr(isw), ctypes.cast(params.data_ptr(), ctypes.POINTER(ctypes.c_double)), fptr(out[0]),
                         fptr(out[1]), fptr(out[2]))
    return out


def reference_token_terms(cfg, l, l_old, l_ref, A, w, isw):
    """Per token: w (f + beta kl) and its derivative in l, by autograd of the reference (float64)."""
    l64 = l.double().unsqueeze(0).requires_grad_()
    keep = torch.ones_like(l64, dtype=torch.bool)
    f, rho = ref.per_token_policy_loss(l64, l_old.double().unsqueeze(0), A.double().unsqueeze(0), keep, cfg,
                                       isw.double().unsqueeze(0))
    loss = w.double() * f[0]
    if cfg.beta != 0.0:
        loss = loss + cfg.beta * w.double() * ref.kl_estimate(l64, l_ref.double().unsqueeze(0), cfg)[0]
    loss.sum().backward()
    return loss.detach(), l64.grad[0], rho.detach()[0]


@pytest.mark.parametrize("case", [f"{loss}-{lr}" for loss in TOKEN_LOSSES for lr in LOG_RATIOS]
                         + [f"{kl}-{d}" for kl in KL_CONFIGS for d in KL_DIFFS])
def test_cuda_token_math_on_hostile_ratios(token_terms_lib, case):
    name, level = case.split("-")
    g = torch.Generator().manual_seed(stable_seed("cuda_terms", case))
    n = 64
    l = -3.0 * torch.rand(n, generator=g)
    A = torch.randn(n, generator=g)
    A[::7] = 0.0  # zero advantages: 0 x inf must not appear either
    w = torch.rand(n, generator=g) + 0.1
    isw = torch.rand(n, generator=g) + 0.5
    isw[::5] = 0.0
    if name in LOSSES:
        cfg, l_old, l_ref = LOSSES[name], l - LOG_RATIOS[level], l
    else:
        cfg, l_old, l_ref = KL_CONFIGS[name], l, l + KL_DIFFS[level]
    loss, g_l, rho = cuda_token_terms(token_terms_lib, cfg, l, l_old, l_ref, A, w, isw)
    want_loss, want_g, want_rho = reference_token_terms(cfg, l, l_old, l_ref, A, w, isw)
    for got, want, what in ((loss, want_loss, "loss"), (g_l, want_g, "dL/dl"), (rho, want_rho, "rho")):
        rounded = want.float()
        overflow = ~torch.isfinite(rounded)
        assert not torch.isnan(got).any(), f"{what}: NaN"
        assert (got[overflow] == rounded[overflow]).all(), f"{what}: overflow differs from the rounded reference"
        finite = ~overflow
        torch.testing.assert_close(got[finite].double(), want[finite], rtol=2e-5, atol=2e-6,
                                   msg=lambda m: f"{what}: {m}")
