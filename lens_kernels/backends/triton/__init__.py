"""The ``triton`` backend: one op per file in this package (kernel, launcher, autograd.Function)."""
from __future__ import annotations

DEVICES = ("cuda",)


def unavailable_reason():
    return "the Triton kernels are not implemented yet"
