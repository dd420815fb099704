"""The CUDA sources on a machine without a GPU (docs/design.md, Testing without a GPU).

- nvcc compiles every kernel file for sm_80 and sm_90a, without warnings;
- the kernels stay torch-free (a .cu that includes torch takes minutes to compile);
- the per-token loss math of the fused kernel (csrc/loss_math.cuh, compiled for the CPU) matches
  torch_backend.token_coefficients / kl_and_grad, which the torch tests validate against reference.py;
- setup.py and the cuda backend say clearly what is missing.

Tests that need nvcc skip without it; GPU tests of the kernels are in test_cuda_gpu.py.
"""
import ast
import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from seeds import stable_seed

import lens_kernels as lk
from lens_kernels.backends import AUTO_PREFERENCE, BACKENDS, OPS
from lens_kernels.backends import torch as torch_backend
from lens_kernels.backends import cuda as cuda_backend
from lens_kernels.config import LossConfig
import backend_calls as calls  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_SOURCES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc") or (
    str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc is not installed")
GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]


def test_kernel_sources_exist_and_are_torch_free():
    names = {p.name for p in KERNEL_SOURCES}
    assert {"token_logprobs.cu", "policy_loss.cu"} <= names
    for path in KERNEL_SOURCES + sorted(CSRC.glob("*.cuh")) + [CSRC / "lens_kernels.h"]:
        text = path.read_text()
        for banned in ("#include <torch", "#include <ATen", "#include <c10"):
            assert banned not in text, f"{path.name} includes torch headers ({banned}): keep kernels torch-free"


@needs_nvcc
@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles_for_sm80_and_sm90a(source, tmp_path):
    out = tmp_path / (source.stem + ".o")
    # --threads 2: the two targets compile side by side
    cmd = [NVCC, "-std=c++17", "-O3", "--use_fast_math", "--threads", "2", "-I", str(CSRC), *GENCODE, "-c", str(source),
           "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stderr[-4000:]
    assert out.stat().st_size > 0


def _ptx_entries(source, tmp_path):
    """{kernel name: its PTX} of ``source`` for compute_90a (no ptxas: seconds)."""
    out = tmp_path / (source.stem + ".ptx")
    cmd = [NVCC, "-std=c++17", "-O3", "--use_fast_math", "-I", str(CSRC), "-arch=compute_90a", "-ptx", str(source),
           "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    parts = out.read_text().split(".visible .entry ")[1:]
    return {part.split("(", 1)[0]: part for part in parts}


@needs_nvcc
def test_row_kernels_use_16_byte_accesses_and_the_cluster_exchange(tmp_path):
    kernels = {**_ptx_entries(CSRC / "policy_loss.cu", tmp_path), **_ptx_entries(CSRC / "token_logprobs.cu", tmp_path)}
    fused = {name: ptx for name, ptx in kernels.items() if "fused_loss" in name}
    assert len(fused) == 9, sorted(kernels)  # stream, smem-row and cluster variants of 3 dtypes
    for name, ptx in kernels.items():
        assert re.search(r"ld\.global(\.\w+)*\.v4", ptx), f"{name}: no 16-byte global loads"
        assert "__local_depot" not in ptx, f"{name}: a register array went to local memory"
        if "bwd" in name or "fused_loss" in name:
            assert re.search(r"st\.global(\.\w+)*\.v4", ptx), f"{name}: no 16-byte global stores"
    for name, ptx in fused.items():
        cached = "cluster" in name or "Lb1E" in name  # the row (or its segment) held in shared memory
        assert bool(re.search(r"ld\.shared\.v4", ptx)) == cached, f"{name}: shared-memory row cache"
        exchanges = "mapa" in ptx and "barrier.cluster" in ptx  # distributed shared memory + cluster barrier
        assert exchanges == ("cluster" in name), f"{name}: cluster exchange"


@needs_nvcc
def test_online_softmax_and_gradient_math_on_the_cpu(tmp_path):
    """common.cuh's SoftmaxState and GradCoefficients, driven as the kernels drive them (threads,
    fragments, butterfly merge, one-hot added once), against float64 on -inf, NaN, +inf and bad
    targets (csrc/test/softmax_host.cu)."""
    exe = tmp_path / "softmax_host"
    cmd = [NVCC, "-std=c++17", "-O2", "-I", str(CSRC), "-gencode=arch=compute_80,code=sm_80",
           str(CSRC / "test" / "softmax_host.cu"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "PASSED" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.count(" ok") >= 30, run.stdout


def _cuobjdump():
    found = shutil.which("cuobjdump") or (str(Path(os.environ["CUDA_HOME"]) / "bin" / "cuobjdump")
                                          if os.environ.get("CUDA_HOME") else None)
    if found and os.path.exists(found):
        return found
    try:  # the copy Triton ships
        import triton
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(path) if path.exists() else None
    except ImportError:
        return None


@needs_nvcc
def test_online_softmax_loop_is_branch_free_in_sass(tmp_path):
    """The vocab loop of the log-prob forward (bf16, sm_90a) has no branch but its own back edge and
    about 7.7 instructions per element (the branchy version had 32 BRA + 32 BSSY per 32 elements and
    ~11.9 per element on its common path, 21.9 in all)."""
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump")
    cubin = tmp_path / "token_logprobs.cubin"
    cmd = [NVCC, "-std=c++17", "-O3", "--use_fast_math", "-I", str(CSRC), "-gencode=arch=compute_90a,code=sm_90a",
           "-cubin", str(CSRC / "token_logprobs.cu"), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = subprocess.run([sys.executable, str(CSRC / "test" / "sass_loop_stats.py"), str(cubin),
                            "token_logprobs_fwd_kernelI13__nv_bfloat16", "32", "--cuobjdump", cuobjdump],
                           capture_output=True, text=True, timeout=120)
    assert stats.returncode == 0, stats.stderr
    first = stats.stdout.splitlines()[0]  # pass 1's unrolled main loop
    per_element = float(re.search(r"\(([\d.]+)/element\)", first).group(1))
    assert re.search(r"BRA 1, BSSY 0", first), first
    assert per_element <= 8.5, first


# ---------------------------------------------------------------------------------------------
# loss_math.cuh on the CPU against the torch backend
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_terms_lib(tmp_path_factory):
    if NVCC is None or not os.path.exists(NVCC):
        pytest.skip("nvcc is not installed")
    lib = tmp_path_factory.mktemp("token_terms") / "token_terms.so"
    # nvcc as the host-compiler driver: it knows where cuda_runtime.h lives
    cmd = [NVCC, "-x", "c++", "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "-I", str(CSRC),
           str(CSRC / "test" / "token_terms_host.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(lib))


CONFIGS = {
    "ppo_default": LossConfig(),
    "ppo_dual_clip_clamp_k3": LossConfig(epsilon_high=0.28, dual_clip=3.0, log_ratio_clamp=0.5, beta=0.04,
                                         kl_estimator="k3", kl_clamp=0.8),
    "ppo_delta_k1": LossConfig(delta=1.5, beta=0.1, kl_estimator="k1"),
    "cispo_k2": LossConfig(policy_loss="cispo", cispo_ratio_cap=1.3, beta=0.02, kl_estimator="k2", kl_clamp=0.3),
    "sapo": LossConfig(policy_loss="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
}


def _expected_terms(l, l_old, l_ref, A, w, isw, cfg):
    """loss and dL/dl per token in float64, by the torch backend's own formulas."""
    as_row = lambda x: x.double().unsqueeze(0)  # noqa: E731
    l64, old64, A64, w64 = as_row(l), as_row(l_old), as_row(A), as_row(w)
    f, df, direct, rho, drho = torch_backend.token_coefficients(l64, old64, A64, torch.ones_like(l64), cfg,
                                                            is_weights=as_row(isw))
    loss = w64 * f
    g_l = w64 * df * drho + (0.0 if direct is None else w64 * direct)
    if cfg.beta != 0.0:
        kl, dkl = torch_backend.kl_and_grad(l64, as_row(l_ref), cfg)
        loss = loss + cfg.beta * w64 * kl
        g_l = g_l + cfg.beta * w64 * dkl
    return loss[0], g_l[0], rho[0]


@needs_nvcc
@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_kernel_token_math_matches_torch_backend(token_terms_lib, name, on_policy):
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(stable_seed(name, on_policy))
    n = 4096
    l = -3.0 * torch.rand(n, generator=gen)
    l_old = l.clone() if on_policy else l + 0.4 * torch.randn(n, generator=gen)
    l_ref = l + 0.5 * torch.randn(n, generator=gen)
    A = torch.randn(n, generator=gen)
    w = torch.rand(n, generator=gen)
    isw = 0.5 + torch.rand(n, generator=gen)
    out = [torch.full((n,), float("nan")) for _ in range(3)]  # poisoned: every element must be written
    fptr = lambda t: ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))  # noqa: E731
    params = torch.tensor(cuda_backend._loss_params(cfg, 1.0), dtype=torch.float64)
    token_terms_lib.lens_token_terms(
        ctypes.c_long(n), fptr(l), fptr(l_old), ctypes.c_int(0 if on_policy else 1), fptr(l_ref), fptr(A), fptr(w),
        fptr(isw), ctypes.cast(params.data_ptr(), ctypes.POINTER(ctypes.c_double)), fptr(out[0]), fptr(out[1]),
        fptr(out[2]))
    loss, g_l, rho = out
    e_loss, e_g, e_rho = _expected_terms(l, l_old, l_ref, A, w, isw, cfg)
    for got, want, what in ((loss, e_loss, "loss"), (g_l, e_g, "dL/dl"), (rho, e_rho, "rho")):
        assert not torch.isnan(got).any(), f"{what}: NaN (unwritten or invalid)"
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")
    assert (g_l != 0).any(), "a dL/dl of all zeros tests nothing"


# ---------------------------------------------------------------------------------------------
# packaging and dispatch without the extension
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_forced_cuda_build_with_cpu_torch_fails_clearly():
    env = dict(os.environ, LENS_KERNELS_BUILD_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "LENS_KERNELS_BUILD_CUDA=1" in proc.stderr and "CPU build" in proc.stderr, proc.stderr[-2000:]


def test_pure_build_when_disabled():
    env = dict(os.environ, LENS_KERNELS_BUILD_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lens-kernels" in proc.stdout


def test_setup_names_its_targets_through_torch_arch_list(monkeypatch):
    # torch's cpp_extension drops TORCH_CUDA_ARCH_LIST as soon as one nvcc flag mentions "arch": the
    # flags setup.py passes, with its default list, must give sm_80, sm_90a and sm_90 with its PTX
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    text = (ROOT / "setup.py").read_text()
    default = re.search(r'^DEFAULT_CUDA_ARCH_LIST = "([^"]+)"$', text, re.M).group(1)
    nvcc_flags = ast.literal_eval(re.search(r"^    nvcc_flags = (\[.*\])$", text, re.M).group(1))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", default)
    assert set(_get_cuda_arch_flags(nvcc_flags)) == {
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"}
    assert "gencode" not in text


@pytest.mark.skipif(lk.HAS_CUDA_EXT, reason="the CUDA extension is built here")
def test_cuda_backend_names_what_is_missing():
    reason = cuda_backend.unavailable_reason()
    assert "lens_kernels._C" in reason and "LENS_KERNELS_BUILD_CUDA=1" in reason and "CUDA build of torch" in reason
    with pytest.raises(RuntimeError, match="lens_kernels._C"):
        cuda_backend.token_logprobs_forward(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), None, 1.0)


def test_auto_preference_is_one_table_over_known_backends():
    assert set(AUTO_PREFERENCE) == set(OPS)
    for op, order in AUTO_PREFERENCE.items():
        assert len(set(order)) == len(order) and set(order) <= set(BACKENDS), op
        assert order[-1] == "torch", f"{op}: torch must stay the last resort"


# ---------------------------------------------------------------------------------------------
# The autograd glue of the cuda backend (in-place writes, version bumps, grad-scale rescale, empty
# work) on the CPU: the kernels are replaced by a float64 torch stand-in with their contract
# (same op names, arguments and in-place behaviour), so that what runs is cuda.py's own code.
# ---------------------------------------------------------------------------------------------
class _StandInOps:
    """torch.ops.lens_kernels_cuda as the kernels define it, in float64 on CPU tensors."""

    @staticmethod
    def _rows(logits, targets, keep, tau_rows, tau):
        z = logits.reshape(-1, logits.shape[-1]).double()
        tau_t = tau_rows.double().unsqueeze(-1) if tau_rows is not None else tau
        y = z / tau_t
        lse = torch.logsumexp(y, -1)
        logp_all = y - lse.unsqueeze(-1)
        p = logp_all.exp()
        logp = logp_all.gather(-1, targets.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        entropy = -(p * logp_all).sum(-1)
        kept = torch.ones_like(lse, dtype=torch.bool) if keep is None else keep
        return z, tau_t, lse, logp_all, p, torch.where(kept, logp, 0.0), torch.where(kept, entropy, 0.0), kept

    def token_logprobs_fwd(self, logits, targets, keep, tau_rows, tau):
        _, _, lse, _, _, logp, entropy, _ = self._rows(logits, targets, keep, tau_rows, tau)
        return logp.float(), entropy.float(), lse.float()

    def _grad(self, logits, targets, keep, tau_rows, tau, g_l, g_h):
        _, tau_t, _, logp_all, p, _, entropy, kept = self._rows(logits, targets, keep, tau_rows, tau)
        onehot = torch.nn.functional.one_hot(targets.clamp(0, logits.shape[-1] - 1), logits.shape[-1]).double()
        g_h = torch.zeros_like(g_l) if g_h is None else g_h
        g = (g_l.double().unsqueeze(-1) * (onehot - p)
             - g_h.double().unsqueeze(-1) * p * (logp_all + entropy.unsqueeze(-1))) / tau_t
        return torch.where(kept.unsqueeze(-1), g, 0.0).view(logits.shape).to(logits.dtype)

    def token_logprobs_bwd(self, logits, targets, keep, tau_rows, tau, lse, entropy, g_l, g_h):
        return self._grad(logits, targets, keep, tau_rows, tau, g_l, g_h)

    # writes through .data: like the C++ kernels, a stand-in write does not bump the version counter
    def token_logprobs_bwd_(self, logits, targets, keep, tau_rows, tau, lse, entropy, g_l, g_h):
        logits.data.copy_(self._grad(logits, targets, keep, tau_rows, tau, g_l, g_h))

    def fused_policy_loss(self, logits, targets, keep, tau_rows, tau, adv, w, ew, old, ref, isw, params, path):
        # a stand-in dL/dl of -w * A (on-policy PPO inside the clip range), scaled by grad_scale
        logp, entropy, _ = self.token_logprobs_fwd(logits, targets, keep, tau_rows, tau)
        g_l = -(w * adv)
        grad = self._grad(logits, targets, keep, tau_rows, tau, g_l * params[12], None)
        return grad, logp, entropy, g_l

    def fused_policy_loss_(self, logits, *args):
        grad, logp, entropy, g_l = self.fused_policy_loss(logits, *args)
        logits.data.copy_(grad)
        return logp, entropy, g_l

    def rescale_grad_(self, grad, ratio):
        grad.data.mul_(ratio.to(grad.dtype))


@pytest.fixture
def stand_in_ops(monkeypatch):
    ops = _StandInOps()
    monkeypatch.setattr(cuda_backend, "_ops", lambda: ops)
    return ops


def _glue_batch(B=2, T=3, V=11, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -1] = False
    return logits, targets, mask, gen


def test_cuda_glue_inplace_backward_writes_the_buffer_and_bumps_its_version(stand_in_ops):
    logits, targets, mask, gen = _glue_batch()
    x = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    calls.token_logprobs("cuda", ref, targets, mask)[0].sum().backward()
    logp, _ = calls.token_logprobs("cuda", x, targets, mask, inplace_grad=True)
    version = x._version
    logp.sum().backward()
    assert x._version > version, "the in-place backward must bump the buffer's version"
    assert x.grad.data_ptr() == x.data_ptr(), "dL/dlogits must live in the logits buffer"
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=0)
    # the buffer was saved by another op (tanh saves its output): autograd must refuse, not compute a
    # gradient from the overwritten values
    h = logits.clone().requires_grad_(True)
    y = torch.tanh(h)
    logp, _ = calls.token_logprobs("cuda", y, targets, mask, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def test_cuda_glue_fused_inplace_bumps_the_version_and_rescales(stand_in_ops):
    logits, targets, mask, gen = _glue_batch()
    adv = torch.randn(2, generator=gen)
    cfg = LossConfig()
    x = logits.clone().requires_grad_(True)
    version = x._version
    loss, _ = calls.policy_loss_from_logits("cuda", x, targets, mask, adv, config=cfg, grad_scale=0.5, inplace=True)
    assert x._version > version, "the in-place forward must bump the logits' version"
    (0.25 * loss).backward()
    assert x.grad.data_ptr() == x.data_ptr()
    y = logits.clone().requires_grad_(True)
    loss_y, _ = calls.policy_loss_from_logits("cuda", y, targets, mask, adv, config=cfg)
    (0.25 * loss_y).backward()  # declared scale 1: rescaled by 0.25 on the "device"
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=0)
    assert (y.grad[~mask] == 0).all() and (y.grad != 0).any()
    h = logits.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z = torch.tanh(h)
        loss, _ = calls.policy_loss_from_logits("cuda", z, targets, mask, adv, config=cfg, inplace=True)
        loss.backward()
