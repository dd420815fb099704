"""The ``cuda`` backend: C++/CUDA kernels of the optional extension ``lens_kernels._C``.

The import never fails without the extension: ``HAS_CUDA_EXT`` says whether it was built, and asking
for the backend explains what is missing.
"""
from __future__ import annotations

DEVICES = ("cuda",)

try:  # built by setup.py only when a CUDA toolkit and a CUDA build of torch are present
    from .. import _C  # noqa: F401

    HAS_CUDA_EXT = True
    _IMPORT_ERROR = None
except ImportError as exc:  # the pure-Python install
    HAS_CUDA_EXT = False
    _IMPORT_ERROR = str(exc)


def unavailable_reason():
    if not HAS_CUDA_EXT:
        return ("the CUDA extension lens_kernels._C is not built (install with a CUDA toolkit and a CUDA build of "
                "torch, LENS_KERNELS_BUILD_CUDA=1)")
    return "the CUDA extension is built but exposes no ops yet"
