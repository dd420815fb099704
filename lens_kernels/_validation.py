"""Boundary checks of the public ops (docs/design.md, Inputs, errors and special values; docs/inputs.md).

Shape, dtype, stride and Python-number checks read only metadata, so they are free and always on.
Checks that read tensor values (target range, 0/1 mask, binary rewards, NaN, tensor-valued scalars,
temperature values) cost a device-to-host sync on a GPU: they always run for CPU tensors, for GPU
tensors only with ``LENS_KERNELS_CHECK=1``, and never while ``torch.compile`` traces.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
MASK_DTYPES = (torch.bool,) + FLOAT_DTYPES + INDEX_DTYPES


def is_real_number(value) -> bool:
    """A plain real number: a Python int or float, or any ``numbers.Real`` such as a numpy scalar
    (np.float32, np.int64), but not a bool and not a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor)) and not (
        type(value).__module__ == "numpy" and type(value).__name__ == "bool_")


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
    if name in NO_GRAD_INPUTS:
        warn_no_grad(name, t)


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
        warn_no_grad("temperature", temperature)
        if targets.dim() == 2 and shape == (targets.shape[0],):
            temperature = temperature.unsqueeze(-1)
        return temperature
    if not is_real_number(temperature):
        raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return temperature


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
    if not is_real_number(value) or not (math.isfinite(float(value)) and float(value) > 0):
        what = "a finite number > 0" + (" or a 1-element tensor" if allow_tensor else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_finite_number(name: str, value, low: float = None) -> float:
    """A finite real number (a Python or numpy scalar; >= low when given), as a float."""
    if not is_real_number(value) or not math.isfinite(float(value)) or (low is not None and float(value) < low):
        bound = "" if low is None else f" >= {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_inplace_buffer(name: str, t: torch.Tensor) -> None:
    """A buffer the gradient is written into must not alias itself: an expanded (stride-0) view or a
    self-overlapping one would receive several rows' gradients in one place. Metadata only."""
    if t.numel() <= 1:
        return
    if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)) or _self_overlapping(t):
        raise ValueError(
            f"{name} cannot take the gradient in place: it is an expanded or self-overlapping view (shape "
            f"{list(t.shape)}, strides {list(t.stride())}); pass a tensor with its own storage (.contiguous()) "
            "or inplace=False")


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


# Inputs the ops treat as constants: a tensor passed with requires_grad=True gets no gradient.
NO_GRAD_INPUTS = ("old_logps", "ref_logps", "is_weights", "temperature")
_NO_GRAD_WARNED = set()


def warn_no_grad(name: str, value) -> None:
    """Warn once per process and argument name when an input the ops treat as a constant (one of
    ``NO_GRAD_INPUTS``) has requires_grad=True: nothing flows back to it, which a caller who set
    requires_grad on purpose would otherwise not learn. Reads metadata only (no sync)."""
    if name in _NO_GRAD_WARNED or not torch.is_tensor(value) or not value.requires_grad:
        return
    _NO_GRAD_WARNED.add(name)
    warnings.warn(f"lens_kernels: {name} has requires_grad=True but receives no gradient (the ops treat it as a "
                  "constant); detach it to silence this warning", UserWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package, so that a warning names the
    caller's line whichever public op led here."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def refuse_create_graph(op: str) -> None:
    """Raise in a backward run with ``create_graph=True`` (grad mode is on exactly then), except while
    torch.compile traces the backward graph."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"lens_kernels.{op} does not support higher-order gradients: its backward is a kernel, not a "
            "differentiable expression, and a backward with create_graph=True would return a wrong "
            "second derivative. Call backward without create_graph=True, or compute the log-probs with "
            "torch.log_softmax for a Hessian-vector product (lens_kernels.policy_loss on those log-probs "
            "supports create_graph=True).")


def renamed_arguments(given: dict, renames: dict, op: str) -> dict:
    """Keyword arguments under the names of an earlier release, mapped to today's (with one
    DeprecationWarning each); any other unexpected keyword is a TypeError, as Python would raise."""
    import warnings

    unknown = set(given) - set(renames)
    if unknown:
        raise TypeError(f"{op}() got unexpected keyword argument(s) {sorted(unknown)}")
    out = {}
    for old, value in given.items():
        new = renames[old]
        warnings.warn(f"lens_kernels.{op}: {old}= is deprecated and will be removed in the next release; "
                      f"use {new}=", DeprecationWarning, stacklevel=3)
        out[new] = value
    return out
