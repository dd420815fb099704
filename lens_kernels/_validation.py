"""Boundary checks of the public ops (SPEC section 7).

Shape, dtype and stride checks read only metadata, so they are free and always on. Checks that read
tensor values (target range, binary rewards, NaN) cost a device-to-host sync on a GPU: they always
run for CPU tensors, and for GPU tensors only with ``LENS_KERNELS_CHECK=1``.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
MASK_DTYPES = (torch.bool,) + FLOAT_DTYPES + INDEX_DTYPES


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether checks that read values (and so sync a GPU) run for this tensor."""
    if torch.compiler.is_compiling():  # a host read of a traced value would break the graph
        return False
    return t.device.type == "cpu" or os.environ.get("LENS_KERNELS_CHECK", "0") == "1"


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(name: str, t, *, dtypes: Sequence[torch.dtype] = None, ndim: Sequence[int] = None,
                 expected: str = "") -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor{(' ' + expected) if expected else ''}, "
                        f"got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() not in ndim:
        want = expected or " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{name} must be {want}, got shape {_shape(t)}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int], expected: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {expected} = {list(shape)}, got {_shape(t)}")


def check_same_device(pairs) -> None:
    ref_name, ref = pairs[0]
    for name, t in pairs[1:]:
        if t is not None and torch.is_tensor(t) and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")


def check_vocab_stride(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have stride 1 along the vocabulary (last) dimension, got strides {tuple(t.stride())}; "
            f"slices such as logits[:, :-1] are fine, a transposed tensor is not (call .contiguous())"
        )


def check_targets(targets: torch.Tensor, vocab: int, mask: Optional[torch.Tensor], name: str = "targets") -> None:
    """Targets must lie in [0, V) wherever the mask keeps the token (padding ids such as -100 may sit
    under the mask)."""
    if not value_checks_enabled(targets):
        return
    bad = (targets < 0) | (targets >= vocab)
    if mask is not None:
        bad = bad & mask.to(torch.bool)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{name} must lie in [0, V={vocab}) at unmasked positions; {name}{first} = {int(targets[tuple(first)])}"
        )


def check_temperature(temperature, targets: torch.Tensor):
    """A positive float, or a tensor broadcastable to targets' shape. Returns it unchanged."""
    if torch.is_tensor(temperature):
        if temperature.dtype not in FLOAT_DTYPES:
            raise TypeError(f"temperature must be a float tensor, got {temperature.dtype}")
        try:
            torch.broadcast_shapes(temperature.shape, targets.shape)
        except RuntimeError:
            raise ValueError(
                f"temperature must be a float or a tensor broadcastable to targets {list(targets.shape)}, "
                f"got shape {list(temperature.shape)}"
            ) from None
        if value_checks_enabled(temperature) and bool((temperature <= 0).any()):
            raise ValueError("temperature must be > 0 everywhere")
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def check_mask(mask, shape, name: str = "mask", expected: str = "[B, T]") -> None:
    check_tensor(name, mask, dtypes=MASK_DTYPES)
    check_shape(name, mask, shape, expected)


def check_backend_name(backend) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
