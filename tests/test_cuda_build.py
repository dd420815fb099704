"""The CUDA sources on a machine without a GPU (SPEC 11, 12).

- nvcc compiles every kernel file for sm_80 and sm_90a, without warnings;
- the kernels stay torch-free (a .cu that includes torch takes minutes to compile);
- the per-token loss math of the fused kernel (csrc/loss_math.cuh, compiled for the CPU) matches
  torch_backend.token_coefficients / kl_and_grad, which the torch tests validate against reference.py;
- setup.py and the cuda backend say clearly what is missing.

Tests that need nvcc skip without it; GPU tests of the kernels are in test_cuda_gpu.py.
"""
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

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_SOURCES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc") or (
    str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc is not installed")
GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]


def test_kernel_sources_exist_and_are_torch_free():
    names = {p.name for p in KERNEL_SOURCES}
    assert {"token_logprobs.cu", "policy_loss.cu", "group_advantages.cu"} <= names
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


@pytest.mark.skipif(lk.HAS_CUDA_EXT, reason="the CUDA extension is built here")
def test_cuda_backend_names_what_is_missing():
    reason = cuda_backend.unavailable_reason()
    assert "lens_kernels._C" in reason and "LENS_KERNELS_BUILD_CUDA=1" in reason and "CUDA build of torch" in reason
    with pytest.raises(RuntimeError, match="lens_kernels._C"):
        cuda_backend.token_logprobs_with_sequence_sums(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long))


def test_auto_preference_is_one_table_over_known_backends():
    assert set(AUTO_PREFERENCE) == set(OPS)
    for op, order in AUTO_PREFERENCE.items():
        assert len(set(order)) == len(order) and set(order) <= set(BACKENDS), op
        assert order[-1] == "torch", f"{op}: torch must stay the last resort"
