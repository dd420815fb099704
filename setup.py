"""Build script: the pure-Python package always; the CUDA extension lens_kernels._C when it can.

LENS_KERNELS_BUILD_CUDA=1 forces the extension (and fails loudly if it cannot be built),
LENS_KERNELS_BUILD_CUDA=0 skips it, and unset builds it only when a CUDA toolkit, a CUDA build of torch
and the sources in csrc/ are all present. Build with `pip install --no-build-isolation .` so that the
installed torch is used. MAX_JOBS is honored.

Targets: TORCH_CUDA_ARCH_LIST, default DEFAULT_CUDA_ARCH_LIST below: sm_80 and sm_90a machine code, and
sm_90 machine code with its PTX, which the driver compiles for parts newer than Hopper. The targets are
named there only: torch's cpp_extension drops the whole list as soon as one nvcc flag of ours
mentions an "arch" (the build then carried sm_90a alone).
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# "9.0a": sm_90a machine code (torch spells it so); "+PTX": the PTX beside the machine code
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a;9.0+PTX"


def _cuda_extension():
    flag = os.environ.get("LENS_KERNELS_BUILD_CUDA", "").strip()
    if flag == "0":
        return None
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    reasons = []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        torch = None
        reasons.append("torch is not importable in the build environment (use --no-build-isolation)")
    if torch is not None:
        if torch.version.cuda is None:
            reasons.append(f"torch {torch.__version__} is a CPU build")
        if CUDA_HOME is None and shutil.which("nvcc") is None:
            reasons.append("no CUDA toolkit (set CUDA_HOME)")
    if not sources:
        reasons.append("no sources in csrc/")
    if reasons:
        if flag == "1":
            raise RuntimeError("LENS_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(reasons))
        print("lens_kernels: building the pure-Python package (" + "; ".join(reasons) + ")")
        return None
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    # No -std here: torch picks the standard its headers need (C++20 from torch 2.13 on); the
    # torch-free kernels compile as C++17 or later. No target flag here either (see the docstring).
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"]
    ext = CUDAExtension(
        name="lens_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return ext, BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


built = _cuda_extension()
if built is None:
    setup()
else:
    ext, build_ext = built
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
