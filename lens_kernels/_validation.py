"""Boundary checks of the public ops (SPEC section 7, docs/inputs.md).

Shape, dtype, stride and Python-number checks read only metadata, so they are free and always on.
Checks that read tensor values (target range, 0/1 mask, binary rewards, NaN, tensor-valued scalars,
temperature values) cost a device-to-host sync on a GPU: they always run for CPU tensors, for GPU
tensors only with ``LENS_KERNELS_CHECK=1``, and never while ``torch.compile`` traces.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
MASK_DTYPES = (torch.bool,) + FLOAT_DTYPES + INDEX_DTYPES


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether checks that read values (and so sync a GPU) run for this tensor: always for a CPU
    tensor, for a GPU tensor only with ``LENS_KERNELS_CHECK=1``, and never while ``torch.compile``
    traces (``torch.compiler.is_compiling()``): a value check is a data-dependent branch, which would
    break the graph (and ``fullgraph=True`` compilation); eager calls still check."""
    if _is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("LENS_KERNELS_CHECK", "0") == "1"


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


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
    """A finite float > 0, or a float tensor of shape [], [B], [B, 1] or [B, T] for [B, T] targets
    ([] or [N] for [N] targets): one meaning per shape, so a per-sequence [B] is never applied along
    T when B == T. Returns a float, or the tensor as a view that broadcasts against ``targets``
    ([B] becomes [B, 1]); its values (finite, > 0) are checked when values are checked."""
    if torch.is_tensor(temperature):
        if temperature.dtype not in FLOAT_DTYPES:
            raise TypeError(f"temperature must be a float tensor, got {temperature.dtype}")
        shape = tuple(temperature.shape)
        if targets.dim() == 2:
            B, T = targets.shape
            allowed, expected = ((), (B,), (B, 1), (B, T)), f"[], [B] or [B, 1] (per sequence) or [B, T] = {[B, T]}"
        else:
            N = targets.shape[0]
            allowed, expected = ((), (N,)), f"[] or [N] = {[N]}"
        if shape not in allowed:
            raise ValueError(f"temperature must be a float or a tensor of shape {expected}, got {list(shape)}")
        if value_checks_enabled(temperature) and temperature.numel() > 0:
            bad = ~(torch.isfinite(temperature) & (temperature > 0))
            if bool(bad.any()):
                raise ValueError(f"temperature must be finite and > 0 everywhere, got {temperature[bad][0].item()}")
        if targets.dim() == 2 and shape == (targets.shape[0],):
            temperature = temperature.unsqueeze(-1)
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def check_mask(mask, shape, name: str = "mask", expected: str = "[B, T]") -> None:
    """Dtype and shape always; the values 0/1 (a mask selects, it does not weigh) when values are
    checked."""
    check_tensor(name, mask, dtypes=MASK_DTYPES)
    check_shape(name, mask, shape, expected)
    if mask.dtype != torch.bool and mask.numel() > 0 and value_checks_enabled(mask):
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            first = bad.nonzero()[0].tolist()
            raise ValueError(f"{name} must hold 0 or 1 (a selection, not a weight: per-token weights go in "
                             f"is_weights); {name}{first} = {mask[tuple(first)].item()}")


def check_positive_scalar(name: str, value, allow_tensor: bool = True):
    """A finite number > 0 (a Python number, always checked), or with ``allow_tensor`` a 1-element
    tensor (returned as a 0-d view; its value checked when values are checked). None passes."""
    if value is None:
        return None
    if torch.is_tensor(value) and allow_tensor:
        if value.numel() != 1 or not (value.dtype.is_floating_point or value.dtype in (torch.int64, torch.int32)):
            raise ValueError(f"{name} must be a finite number > 0 or a 1-element tensor, got a {value.dtype} "
                             f"tensor of shape {list(value.shape)}")
        value = value.reshape(())
        if value_checks_enabled(value):
            v = value.item()
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got tensor({v})")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        what = "a finite number > 0" + (" or a 1-element tensor" if allow_tensor else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_finite_number(name: str, value, low: float = None) -> float:
    """A finite Python number (>= low when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            low is not None and value < low):
        bound = "" if low is None else f" >= {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return value


def check_inplace_buffer(name: str, t: torch.Tensor) -> None:
    """A buffer the gradient is written into must not alias itself: an expanded (stride-0) view or a
    self-overlapping one would receive several rows' gradients in one place. Metadata only."""
    if t.numel() <= 1:
        return
    if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)) or _self_overlapping(t):
        raise ValueError(
            f"{name} cannot take the gradient in place: it is an expanded or self-overlapping view (shape "
            f"{list(t.shape)}, strides {list(t.stride())}); pass a tensor with its own storage (.contiguous()) "
            "or inplace=False / inplace_backward=False")


def _self_overlapping(t: torch.Tensor) -> bool:
    flag = torch._debug_has_internal_overlap(t)  # 0 no, 1 yes, 2 cannot tell (e.g. a slice)
    if flag != 2:
        return flag == 1
    # sufficient test for no overlap: sorted by stride, each dimension steps over all the earlier ones
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    reach = 0
    for st, sz in dims:
        if st <= reach:
            return True
        reach += st * (sz - 1)
    return False


def check_backend_name(backend) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
