"""Backend dispatch: one decision per op call.

A backend is a module that implements some of the ops named in ``OPS``. ``backend="auto"`` (or the
``LENS_KERNELS_BACKEND`` environment variable) picks, for each op, the first available backend in
``AUTO_PREFERENCE`` that implements it for the tensor's device; CPU tensors always go to ``torch``.
Asking explicitly for a backend that is missing, or that does not implement the op, is an error
that says why.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from types import ModuleType
from typing import Dict, Optional

from typing import TYPE_CHECKING

import torch as _torch  # the subpackage backends/torch shadows the name ``torch`` in this package

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("lens_kernels")

OPS = (
    "token_logprobs",
    "linear_token_logprobs",
    "policy_loss_from_logits",
    "policy_loss_from_hidden",
    # Local partials and gradients of a vocabulary shard; the collective combine lives in
    # lens_kernels.distributed (see its docstring for the contract a fused backend implements).
    "vocab_shard_partials",
    "vocab_shard_grad",
    "linear_vocab_shard_partials",
    "linear_vocab_shard_grad",
)
BACKENDS = ("torch", "triton", "cuda")

# auto: per op, the backends tried in order for CUDA tensors. One table, not scattered ifs: the
# benchmark decides the order, and a backend that lacks an op is skipped. The CUDA kernels are
# compile-checked but not yet measured against Triton on a GPU, so Triton comes first until a
# benchmark shows a CUDA kernel faster for an op.
AUTO_PREFERENCE: Dict[str, tuple] = {op: ("triton", "cuda", "torch") for op in OPS}

_MODULES = {
    "torch": "lens_kernels.backends.torch",
    "triton": "lens_kernels.backends.triton",
    "cuda": "lens_kernels.backends.cuda",
}
_loaded: Dict[str, Optional[ModuleType]] = {}
_load_errors: Dict[str, str] = {}


def _load(name: str) -> Optional[ModuleType]:
    """The backend's module (imported on first use; torch.compile cannot trace an import, so a
    backend is loaded by its first eager call, and the torch backend at import, see the end)."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            reason = getattr(module, "unavailable_reason", lambda: None)()
            if reason:
                raise ImportError(reason)
            _loaded[name] = module
        except ImportError as exc:  # a missing optional dependency, never a crash
            _loaded[name] = None
            _load_errors[name] = str(exc)
    return _loaded[name]


def available_backends() -> tuple:
    """The backends that load on this machine."""
    return tuple(name for name in BACKENDS if _load(name) is not None)


def _supports(module: ModuleType, op: str, tensor: torch.Tensor) -> bool:
    """Whether ``module`` runs ``op`` on ``tensor``: the op exists, and the tensor's device type is in
    the module's ``DEVICES`` and its dtype in ``DTYPES`` (when the module declares one)."""
    if not hasattr(module, op):
        return False
    devices = getattr(module, "DEVICES", ("cpu", "cuda"))
    dtypes = getattr(module, "DTYPES", None)
    return tensor.device.type in devices and (dtypes is None or tensor.dtype in dtypes)


def backend_for(op: str, tensor: torch.Tensor, backend: str = "auto") -> str:
    """The name of the backend that runs ``op`` on ``tensor`` for the ``backend`` request."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("LENS_KERNELS_BACKEND", "auto") or "auto"
    if backend == "auto":
        if tensor.device.type != "cuda":
            return "torch"
        for name in AUTO_PREFERENCE[op]:
            module = _load(name)
            if module is not None and _supports(module, op, tensor):
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    module = _load(backend)
    if module is None:
        raise RuntimeError(f"backend {backend!r} is not available: {_load_errors.get(backend, 'not installed')}")
    if not hasattr(module, op):
        raise RuntimeError(f"backend {backend!r} does not implement {op}; use backend='torch' or 'auto'")
    if not _supports(module, op, tensor):
        dtypes = getattr(module, "DTYPES", None)
        raise RuntimeError(
            f"backend {backend!r} cannot run {op} on {tensor.device} {str(tensor.dtype).replace('torch.', '')} "
            f"tensors (it supports devices {list(getattr(module, 'DEVICES', ()))}"
            + (f" and dtypes {[str(d).replace('torch.', '') for d in dtypes]})" if dtypes else ")")
            + "; use backend='auto' or 'torch'"
        )
    return backend


def get(op: str, tensor: torch.Tensor, backend: str = "auto"):
    """The implementation of ``op`` chosen for ``tensor``: for the public ops, the launchers the backend
    gathers under the op's name (see ``_launchers``); for the vocab-shard ops, a function."""
    return launchers(op, choose(op, tensor, backend))


def choose(op: str, tensor: torch.Tensor, backend: str = "auto") -> str:
    """The one dispatch decision of an op call: the backend's name (logged at DEBUG level)."""
    name = backend_for(op, tensor, backend)
    # a logging call breaks a torch.compile graph; the choice is fixed at trace time anyway
    if not _torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
        logger.debug("lens_kernels: %s -> %s backend", op, name)
    return name


def launchers(op: str, name: str):
    """What backend ``name`` (already chosen by ``choose``, so known to run here) supplies for ``op``."""
    return getattr(_load(name) or importlib.import_module(_MODULES[name]), op)


def device_guard(tensor: torch.Tensor):
    """Makes the tensor's GPU the current device for a launch (Triton launches on the current device
    and stream; with ``lm_head`` on cuda:1 under ``device_map="auto"`` that must be cuda:1). A no-op
    context on CPU or when the device is already current."""
    if tensor.device.type == "cuda" and tensor.device.index is not None:
        return _torch.cuda.device(tensor.device.index)
    return contextlib.nullcontext()


# The CPU path is always there: load it now, so that a torch.compile'd first call finds it loaded.
_load("torch")
