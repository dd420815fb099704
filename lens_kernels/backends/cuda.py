"""The ``cuda`` backend: launchers of the C++/CUDA kernels of the optional extension ``lens_kernels._C``
(csrc/). The extension registers its kernels in a namespace of its own, ``torch.ops.lens_kernels_cuda``,
behind the ops that ``lens_kernels`` defines once (``lens_kernels::*``, with their autograd): it never
redefines an op name of the package.

The import never fails without the extension: ``HAS_CUDA_EXT`` says whether it was built, and asking
for the backend explains what is missing.

- ``token_logprobs``: one read of the logits forward (log-prob, entropy, lse), one read and one
  write backward (into the logits for in place).
- ``policy_loss_from_logits``: for token-level ratios the 2-pass fused kernel writes dL/dlogits in
  forward; ``rescale_`` is the kernel of the grad-scale correction (rows leave at once when the ratio
  is 1: no extra pass, no host sync).

fp16/bf16/fp32 only (``DTYPES``): ``backend="auto"`` sends fp64 to ``torch``. The backend is opt-in
until a GPU has measured it (``AUTO_PREFERENCE`` in ``lens_kernels.backends``). The extension's
kernels have fake implementations here, so they also trace under ``torch.compile``; it loads before
or after ``import lens_kernels`` alike (csrc/README.md).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import LossConfig
from . import torch as torch_backend
from ._launchers import Launchers

DEVICES = ("cuda",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:  # built by setup.py only when a CUDA toolkit and a CUDA build of torch are present
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.lens_kernels_cuda)

    HAS_CUDA_EXT = True
    _IMPORT_ERROR = None
except ImportError as exc:  # the pure-Python install
    HAS_CUDA_EXT = False
    _IMPORT_ERROR = str(exc)

# Row-kernel variants of the fused loss (csrc/lens_kernels.h RowPath): -1 lets the launcher choose.
PATHS = {"auto": -1, "stream": 0, "smem_row": 1, "cluster": 2}
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_POLICY_CODES = {"ppo": 0, "cispo": 1, "sapo": 2}
_KL_CODES = {"k1": 0, "k2": 1, "k3": 2}


def unavailable_reason() -> Optional[str]:
    if not HAS_CUDA_EXT:
        return ("the CUDA extension lens_kernels._C is not built (" + str(_IMPORT_ERROR) + "); build it with a CUDA "
                "toolkit (CUDA_HOME or nvcc on PATH) and a CUDA build of torch: LENS_KERNELS_BUILD_CUDA=1 "
                "pip install --no-build-isolation .")
    return None


def _ops():
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"backend 'cuda' is not available: {reason}")
    return torch.ops.lens_kernels_cuda


if HAS_CUDA_EXT:  # shapes of the outputs, for torch.compile and meta tensors
    def _rows(logits):
        return logits.numel() // logits.shape[-1] if logits.shape[-1] else 0

    @torch.library.register_fake("lens_kernels_cuda::token_logprobs_fwd")
    def _(logits, targets, mask, tau_rows, tau):
        vec = logits.new_empty((_rows(logits),), dtype=torch.float32)
        return vec, torch.empty_like(vec), torch.empty_like(vec)

    @torch.library.register_fake("lens_kernels_cuda::token_logprobs_bwd")
    def _(logits, targets, mask, tau_rows, tau, lse, entropy, g_logp, g_entropy):
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    @torch.library.register_fake("lens_kernels_cuda::token_logprobs_bwd_")
    def _(logits, targets, mask, tau_rows, tau, lse, entropy, g_logp, g_entropy):
        return None

    @torch.library.register_fake("lens_kernels_cuda::fused_policy_loss")
    def _(logits, targets, mask, tau_rows, tau, advantages, loss_weight, entropy_weight, old_logp, ref_logp,
          is_weights, params, path):
        vec = logits.new_empty((_rows(logits),), dtype=torch.float32)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        return grad, vec, torch.empty_like(vec), torch.empty_like(vec)

    @torch.library.register_fake("lens_kernels_cuda::fused_policy_loss_")
    def _(logits, targets, mask, tau_rows, tau, advantages, loss_weight, entropy_weight, old_logp, ref_logp,
          is_weights, params, path):
        vec = logits.new_empty((_rows(logits),), dtype=torch.float32)
        return vec, torch.empty_like(vec), torch.empty_like(vec)

    @torch.library.register_fake("lens_kernels_cuda::rescale_grad_")
    def _(grad, ratio):
        return None


# ---------------------------------------------------------------------------------------------
# Per-row inputs in the form the kernels take: flat, contiguous, fp32 / int64 / bool.
# ---------------------------------------------------------------------------------------------
def _flat(x: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if x is None else x.reshape(-1).to(dtype).contiguous()


def _row_inputs(targets, mask, temperature):
    """(targets int64 [N], keep bool [N] or None, tau_rows fp32 [N] or None, tau float)."""
    t = _flat(targets, torch.long)
    keep = _flat(mask, torch.bool)
    if torch.is_tensor(temperature):
        tau_rows = temperature.to(device=targets.device, dtype=torch.float32).expand(targets.shape)
        return t, keep, tau_rows.reshape(-1).contiguous(), 1.0
    return t, keep, None, float(temperature)


def _per_token(x: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
    """[B] or [B, T] -> contiguous fp32 [B * T]."""
    return None if x is None else torch_backend.per_token(x, shape, torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------
def token_logprobs_forward(logits, targets, mask, temperature):
    """(logp [N], entropy [N], lse [N]) fp32."""
    t, keep, tau_rows, tau = _row_inputs(targets, mask, temperature)
    logp, entropy, lse = _ops().token_logprobs_fwd(logits, t, keep, tau_rows, tau)
    return logp, entropy, lse


def token_logprobs_backward(logits, targets, mask, temperature, lse, entropy, g_logp, g_entropy, out):
    t, keep, tau_rows, tau = _row_inputs(targets, mask, temperature)
    g_l = torch.zeros_like(lse) if g_logp is None else _flat(g_logp, torch.float32)
    args = (t, keep, tau_rows, tau, lse, entropy, g_l, _flat(g_entropy, torch.float32))
    if out is logits:
        _ops().token_logprobs_bwd_(logits, *args)
        return logits
    return _ops().token_logprobs_bwd(logits, *args)  # the kernel allocates its buffer (out is None)


def empty_grad(logits):
    """None: the kernels allocate the gradient buffer themselves."""
    return None


# ---------------------------------------------------------------------------------------------
# policy_loss_from_logits: the 2-pass fused kernel for token-level ratios
# ---------------------------------------------------------------------------------------------
def _loss_params(cfg: LossConfig, grad_scale: float) -> list:
    off = lambda v: -1.0 if v is None else float(v)  # noqa: E731  (<= 0 turns a bound off)
    return [float(_POLICY_CODES[cfg.policy_loss]), float(cfg.epsilon_low), float(cfg.eps_high), off(cfg.delta),
            off(cfg.dual_clip), float(cfg.cispo_ratio_cap), float(cfg.sapo_temperature_pos),
            float(cfg.sapo_temperature_neg), off(cfg.log_ratio_clamp), float(cfg.beta),
            float(_KL_CODES[cfg.kl_estimator]), off(cfg.kl_clamp), float(grad_scale)]


# The row-kernel variant of the fused loss; "auto" lets the launcher choose (tests force the others).
FUSED_LOSS_PATH = "auto"


def fused_logits_loss_forward(logits, out, targets, mask, advantages, old_logps, ref_logps, is_weights, temperature,
                              cfg, num_tokens, num_sequences, grad_scale):
    """dL/dz (upstream gradient ``grad_scale``) into ``logits`` itself when ``out is logits``, else into
    a buffer the kernel allocates; returns (logp [N], entropy [N], the gradient), fp32 [N]."""
    mask_f = (mask != 0).to(torch.float32)
    agg = dict(num_tokens=num_tokens, num_sequences=num_sequences, norm_length=cfg.loss_norm_length,
               dp_size=cfg.dp_size)
    w = torch_backend.aggregation_weights(mask_f, cfg.loss_agg_mode, **agg)
    entropy_weight = None
    if cfg.entropy_coef != 0.0:
        w_h = w if cfg.entropy_agg_mode in (None, cfg.loss_agg_mode) else torch_backend.aggregation_weights(
            mask_f, cfg.entropy_agg_mode, **agg)
        entropy_weight = _flat(-cfg.entropy_coef * w_h, torch.float32)
    t, keep, tau_rows, tau = _row_inputs(targets, mask, temperature)
    args = (t, keep, tau_rows, tau, _per_token(advantages, mask.shape), _flat(w, torch.float32), entropy_weight,
            _flat(old_logps, torch.float32), _flat(ref_logps, torch.float32), _per_token(is_weights, mask.shape),
            _loss_params(cfg, grad_scale), PATHS[FUSED_LOSS_PATH])
    if out is logits:
        logp, entropy, _ = _ops().fused_policy_loss_(logits, *args)
        return logp, entropy, logits
    grad, logp, entropy, _ = _ops().fused_policy_loss(logits, *args)  # the kernel allocates (out is None)
    return logp, entropy, grad


def rescale_grad_(grad, ratio) -> None:
    _ops().rescale_grad_(grad, ratio)


_PATH_NAMES = {v: k for k, v in PATHS.items()}


def _plan(values) -> dict:
    path, cluster_size, segment, smem_bytes = values
    return {"path": _PATH_NAMES[path], "cluster_size": cluster_size, "segment": segment, "smem_bytes": smem_bytes}


def fused_loss_path(vocab: int, dtype: torch.dtype, path: str = "auto") -> str:
    """The kernel variant the fused loss runs for rows of ``vocab`` ``dtype`` logits on the current
    device: "stream", "smem_row" or "cluster"."""
    return fused_loss_plan(vocab, dtype, path)["path"]


def fused_loss_plan(vocab: int, dtype: torch.dtype, path: str = "auto", rows: int = 1) -> dict:
    """What the fused loss launches for ``rows`` rows of ``vocab`` ``dtype`` logits on the current
    device, computed by the launcher's own function (occupancy fallback included): {"path",
    "cluster_size" (CTAs per row, 1 off the cluster path), "segment" (row elements per CTA),
    "smem_bytes" (dynamic shared memory per CTA)}."""
    return _plan(_ops().fused_loss_plan(int(rows), int(vocab), _DTYPE_CODES[dtype], PATHS[path], 0))


def last_fused_loss_launch() -> Optional[dict]:
    """The plan of the last fused-loss launch on this thread (as ``fused_loss_plan``), or None."""
    values = _ops().fused_loss_last_launch()
    return None if values[0] == PATHS["auto"] else _plan(values)


token_logprobs = Launchers(forward=token_logprobs_forward, backward=token_logprobs_backward, empty_grad=empty_grad)
policy_loss_from_logits = Launchers(forward=fused_logits_loss_forward, rescale_=rescale_grad_, empty_grad=empty_grad)
