"""Providers: who computes a case. Ours (one per backend, discovered), and the peers side by side.

A provider turns (case, inputs) into a callable that runs the op once and returns its outputs:
``(loss, grads)`` for the forward + backward paths, ``(logps,)`` for the forward-only paths and
``(advantages,)`` for ``advantages``. Building it raises ``Unavailable`` when the provider cannot
run here (a package that is not installed, a GPU-only kernel on CPU); the runner reports that in the
provider's row and goes on.

Every provider computes the same loss: the token-level PPO-clip GRPO loss with eps_low = eps_high =
0.2, no KL, token-mean over the loss mask (TRL's ``bnpo``, Liger's ``bnpo``), at the case's
temperature, against old log-probs.

Same work: ours and the TRL-style providers take ``logits_kept``, a [B, T, V] leaf that aliases the
``[:, :-1]`` view of the [B, T + 1, V] buffer (what a user gets by applying the lm_head to
``hidden[:, :-1]`` or with ``logits_to_keep``: no ``slice_backward`` copy); Liger takes the whole
buffer, as its API asks. The row ``ours-<backend>:slice-copy`` shows what the slice costs a user who
takes the gradient through ``logits[:, :-1]`` of the whole buffer instead (autograd's ``slice_backward``
zero-fills and copies a buffer-sized gradient). Every headline row sends an upstream gradient equal to
``grad_scale`` (1.0), our best case; ``ours-<backend>:go=1/8`` sends 1/8 (a trainer that divides the
loss by 8 accumulation steps without telling ``grad_scale``), which costs a rescale of the gradient.
Neither library runs in place here (ours ``inplace=False``, Liger ``inplace=False``): the inputs are
shared by every provider and every timed repetition.

The ``lens-step`` path is the whole on-policy LENS step from logits and binary rewards: the same loss
against the current log-probs (rho = 1, with its gradient), with LENS advantages computed from them.
Its providers: ours (``lens_policy_loss_from_logits``, one call), our bare fused loss fed precomputed
advantages (kind ``bare``, the issue's "<= 1.1x of the bare loss" comparison: its ``vs ours`` should
be >= 0.91x), the user's baseline today with Liger (a forward for old log-probs, torch LENS advantages,
``triton_grpo_loss``: its ``vs ours`` should be >= 1.3x), and the eager TRL-style two-stage step.
"""
from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch._dynamo
import torch.nn.functional as F

from .. import (
    AdvantageConfig,
    LossConfig,
    available_backends,
    backend_for,
    group_advantages,
    lens_policy_loss_from_logits,
    linear_token_logprobs,
    policy_loss_from_hidden,
    policy_loss_from_logits,
    token_logprobs,
)
from .cases import CLIP_EPS, Case

LOSS_CONFIG = LossConfig(policy_loss="ppo", epsilon_low=CLIP_EPS, loss_agg_mode="token-mean")
LENS_ADVANTAGES = AdvantageConfig(estimator="lens")

OPS_OF_PATH = {
    "logits": "policy_loss_from_logits",
    "logits-fwd": "token_logprobs",
    "hidden": "policy_loss_from_hidden",
    "hidden-fwd": "linear_token_logprobs",
    "advantages": None,  # group_advantages has no backend choice (yet)
    "lens-step": "token_logprobs",  # on-policy, the step's passes are token_logprobs and its backward
}


class Unavailable(Exception):
    """The provider cannot run this case here; the message says why."""


@dataclass
class Provider:
    name: str
    kind: str  # "ours", "bare" (our bare loss on the lens-step path), "variant" (ours, another setup) or "peer"
    paths: Tuple[str, ...]
    build: Callable[[Case, Dict[str, torch.Tensor]], Callable[[], tuple]]
    needs_cuda: bool = False
    note: str = ""
    inplace: str = "-"  # which in-place mode ran (the memory column says it)
    default: bool = True  # False: runs only when asked for by name (--providers)
    tolerance: str = "ours"  # the tolerance family of its correctness check (runner.TOLERANCES)


def grad_leaves(case: Case, inputs: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    """Every tensor whose gradient some forward + backward provider returns: the [B, T, V] leaf
    ``logits_kept`` (ours, TRL-style) and the whole [B, T + 1, V] buffer (Liger, the slice-copy
    row); X and W on the hidden path. The caller makes them require grad."""
    if case.from_logits and case.fwd_bwd:
        return [inputs["logits_kept"], inputs["logits"]]
    if case.path == "hidden":
        return [inputs["hidden"], inputs["weight"]]
    return []


def _leaves(case, inputs, whole_buffer: bool = False) -> List[torch.Tensor]:
    if case.from_logits:
        return [inputs["logits"] if whole_buffer else inputs["logits_kept"]]
    return [inputs["hidden"], inputs["weight"]]


def _with_grads(case, inputs, loss_fn, whole_buffer: bool = False, upstream: Optional[float] = None):
    """run() -> (loss, grads): ``loss_fn()`` and its gradients with respect to the provider's leaves,
    for an upstream gradient of ``upstream`` (1.0 when None). ``run.upstream`` tells the check to
    divide the gradients by it (outside the timed region)."""
    leaves = _leaves(case, inputs, whole_buffer)
    seed_grad = None
    if upstream is not None:
        device = leaves[0].device
        seed_grad = torch.tensor(upstream, dtype=torch.float32, device=device)

    def run():
        loss = loss_fn()
        grad_out = None if seed_grad is None else seed_grad.to(loss.dtype)
        return loss, torch.autograd.grad(loss, leaves, grad_outputs=grad_out)

    run.forward = loss_fn  # the loss call alone (ours: it also writes dL/dlogits), timed as "loss call ms"
    run.upstream = 1.0 if upstream is None else upstream
    return run


def lens_advantages(case: Case, inp: Dict[str, torch.Tensor], old_logps: torch.Tensor, **kwargs) -> torch.Tensor:
    """LENS advantages of the case's groups (torch), from ``old_logps`` as the confidence."""
    rewards = inp["rewards"]
    return group_advantages(rewards, group_size=case.group_size, estimator="lens", old_logps=old_logps,
                            mask=inp["mask"], **kwargs)[0]


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


# -------------------------------------------------------------------------------------------------
# Ours: one provider per backend that loads here; the public ops with backend=name.
# -------------------------------------------------------------------------------------------------
def _probe(op: str, tensor: torch.Tensor, backend: str) -> None:
    try:
        backend_for(op, tensor, backend)
    except RuntimeError as exc:
        raise Unavailable(str(exc)) from None


def _ours(backend: str, name: Optional[str] = None, env: Optional[Dict[str, str]] = None,
          default: bool = True,
          note: str = "fwd paths: log-probs only, the eager row's work (return_entropy=False)") -> Provider:
    def build(case, inp):
        op = OPS_OF_PATH[case.path]
        if op is None:
            kwargs = {"backend": backend} if "backend" in inspect.signature(group_advantages).parameters else {}
            if kwargs == {} and backend != "torch":
                raise Unavailable("group_advantages takes no backend argument: reported once, as ours-torch")
            return _no_grad(lambda: (lens_advantages(case, inp, inp["old_logps"], **kwargs),))
        _probe(op, inp["logits"] if case.from_logits else inp["hidden"], backend)
        tau = case.temperature
        if case.path == "lens-step":
            return _with_grads(case, inp, lambda: lens_policy_loss_from_logits(
                inp["logits_kept"], inp["targets"], inp["mask"], inp["rewards"], group_size=case.group_size,
                advantage_config=LENS_ADVANTAGES, temperature=tau, config=LOSS_CONFIG, backend=backend)[0])
        common = dict(old_logps=inp.get("old_logps"), temperature=tau, config=LOSS_CONFIG, backend=backend)
        if case.path == "logits":
            return _with_grads(case, inp, lambda: policy_loss_from_logits(
                inp["logits_kept"], inp["targets"], inp["mask"], inp["advantages"], **common)[0])
        if case.path == "hidden":
            return _with_grads(case, inp, lambda: policy_loss_from_hidden(
                inp["hidden"], inp["weight"], inp["targets"], inp["mask"], inp["advantages"], **common)[0])
        if case.path == "logits-fwd":
            return _no_grad(lambda: token_logprobs(inp["logits_kept"], inp["targets"], temperature=tau,
                                                   mask=inp["mask"], backend=backend))
        return _no_grad(lambda: linear_token_logprobs(inp["hidden"], inp["weight"], inp["targets"],
                                                      temperature=tau, mask=inp["mask"],
                                                      backend=backend))

    if env:
        build = _in_env(build, env)
    return Provider(name or f"ours-{backend}", "ours", tuple(OPS_OF_PATH), build, note=note,
                    inplace="off (inplace=False)", default=default)


def _in_env(build, env: Dict[str, str]):
    """``build`` whose calls run with the environment switches ``env`` set (e.g. the triton kernel's
    variant, read at each call), and restored after each call."""
    def set_env():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        return saved

    def restore(saved):
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def wrap(fn):
        def run():
            saved = set_env()
            try:
                return fn()
            finally:
                restore(saved)
        for attr in ("upstream",):
            if hasattr(fn, attr):
                setattr(run, attr, getattr(fn, attr))
        if getattr(fn, "forward", None) is not None:
            run.forward = wrap(fn.forward)
        return run

    def wrapped(case, inp):
        saved = set_env()
        try:
            return wrap(build(case, inp))
        finally:
            restore(saved)

    return wrapped


def _ours_slice_copy(backend: str) -> Provider:
    """Ours on ``logits[:, :-1]`` with the gradient taken for the whole [B, T + 1, V] buffer: what a
    user pays who slices the model's logits (autograd's ``slice_backward`` zero-fills a buffer-sized
    gradient and copies ours into it). Not the headline: the recipe in docs/benchmarks.md avoids it."""
    def build(case, inp):
        _probe("policy_loss_from_logits", inp["logits"], backend)
        return _with_grads(case, inp, lambda: policy_loss_from_logits(
            inp["logits"][:, :-1], inp["targets"], inp["mask"], inp["advantages"], old_logps=inp["old_logps"],
            temperature=case.temperature, config=LOSS_CONFIG, backend=backend)[0], whole_buffer=True)

    return Provider(f"ours-{backend}:slice-copy", "variant", ("logits",), build, inplace="off (inplace=False)",
                    note="gradient through logits[:, :-1] of the whole buffer: pays slice_backward's copy")


UPSTREAM_MISMATCH = 0.125


def _ours_upstream(backend: str) -> Provider:
    """Ours with an upstream gradient of 1/8 while ``grad_scale`` is left at 1.0: a trainer that divides
    the loss by 8 accumulation steps. The fused backward then rescales the gradient (extra passes)."""
    def build(case, inp):
        _probe("policy_loss_from_logits", inp["logits"], backend)
        return _with_grads(case, inp, lambda: policy_loss_from_logits(
            inp["logits_kept"], inp["targets"], inp["mask"], inp["advantages"], old_logps=inp["old_logps"],
            temperature=case.temperature, config=LOSS_CONFIG, backend=backend)[0], upstream=UPSTREAM_MISMATCH)

    return Provider(f"ours-{backend}:go=1/8", "variant", ("logits",), build, inplace="off (inplace=False)",
                    note="upstream gradient 1/8 != grad_scale 1.0: the gradient is rescaled")


def _ours_bare(backend: str) -> Provider:
    """Our fused loss alone on the LENS step's inputs, the advantages and old log-probs (the current
    ones: rho = 1, the on-policy gradient) computed before timing: the 2-pass design of the loss head."""
    def build(case, inp):
        _probe("policy_loss_from_logits", inp["logits"], backend)
        view, tau = inp["logits_kept"], case.temperature
        with torch.no_grad():
            current, _ = token_logprobs(view, inp["targets"], temperature=tau, mask=inp["mask"], backend=backend)
        advantages = lens_advantages(case, inp, current)
        return _with_grads(case, inp, lambda: policy_loss_from_logits(
            view, inp["targets"], inp["mask"], advantages, old_logps=current, temperature=tau, config=LOSS_CONFIG,
            backend=backend)[0])

    return Provider(f"ours-bare-{backend}", "bare", ("lens-step",), build, inplace="off (inplace=False)",
                    note="policy_loss_from_logits, advantages precomputed (untimed)")


# -------------------------------------------------------------------------------------------------
# Eager torch as TRL computes it, and torch.compile of the same functions.
# -------------------------------------------------------------------------------------------------
def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax``: gather minus logsumexp in fp32/fp64; in bf16/fp16 a
    log_softmax per row (sequence), in the logits dtype, to bound the memory of the upcast."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    rows = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = F.log_softmax(row_logits, dim=-1)
        rows.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def trl_clipped_loss(logps, old_logps, advantages, mask):
    """TRL's token-level PPO-clip loss, aggregated over the loss tokens (``bnpo``)."""
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - CLIP_EPS, 1 + CLIP_EPS)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def eager_logits_loss(logits, targets, old_logps, advantages, mask, temperature: float):
    """From the [B, T, V] logits of the completion tokens (TRL slices the model's output first)."""
    return trl_clipped_loss(trl_selective_log_softmax(logits / temperature, targets), old_logps, advantages, mask)


def eager_logits_logps(logits, targets, temperature: float):
    return trl_selective_log_softmax(logits / temperature, targets)


def eager_hidden_loss(hidden, weight, targets, old_logps, advantages, mask, temperature: float):
    logits = (hidden @ weight.T) / temperature
    return trl_clipped_loss(trl_selective_log_softmax(logits, targets), old_logps, advantages, mask)


def eager_hidden_logps(hidden, weight, targets, temperature: float):
    return trl_selective_log_softmax((hidden @ weight.T) / temperature, targets)


def _torch_provider(name: str, compiled: bool, paths: Tuple[str, ...]) -> Provider:
    def build(case, inp):
        fns = (eager_logits_loss, eager_logits_logps, eager_hidden_loss, eager_hidden_logps)
        if compiled:
            torch._dynamo.reset()  # each case compiles afresh, so its row shows its own compile time
            fns = tuple(_compile(fn) for fn in fns)
        loss_logits, logps_logits, loss_hidden, logps_hidden = fns
        tau = case.temperature
        if case.path == "lens-step":
            def two_stage():
                # TRL today: a forward without grad for the old log-probs, advantages, then the loss.
                with torch.no_grad():
                    old_logps = logps_logits(inp["logits_kept"], inp["targets"], tau)
                advantages = lens_advantages(case, inp, old_logps)
                return loss_logits(inp["logits_kept"], inp["targets"], old_logps, advantages, inp["mask"], tau)

            return _with_grads(case, inp, two_stage)
        if case.path == "logits":
            return _with_grads(case, inp, lambda: loss_logits(inp["logits_kept"], inp["targets"], inp["old_logps"],
                                                              inp["advantages"], inp["mask"], tau))
        if case.path == "hidden":
            return _with_grads(case, inp, lambda: loss_hidden(inp["hidden"], inp["weight"], inp["targets"],
                                                              inp["old_logps"], inp["advantages"], inp["mask"], tau))
        if case.path == "logits-fwd":
            return _no_grad(lambda: (logps_logits(inp["logits_kept"], inp["targets"], tau),))
        return _no_grad(lambda: (logps_hidden(inp["hidden"], inp["weight"], inp["targets"], tau),))

    note = "TRL-style: logits / T, per-row log_softmax + gather in the input dtype, then the clipped loss"
    if compiled:
        note = "torch.compile of the eager functions; the first call's compile time is in the row"
    return Provider(name, "peer", paths, build, note=note, tolerance=name)


def _compile(fn):
    # The grid has more shapes than dynamo's default recompile limit, past which it would silently
    # run eager and the row would lie.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    return torch.compile(fn, dynamic=False)


# -------------------------------------------------------------------------------------------------
# Liger-Kernel and Cut-Cross-Entropy (optional; Triton kernels, CUDA only)
# -------------------------------------------------------------------------------------------------
def _import(module: str, what: str):
    try:
        return __import__(module, fromlist=[what])
    except Exception as exc:  # not installed, or broken against this torch/triton
        raise Unavailable(f"{module} not importable ({type(exc).__name__}: {exc})") from None


def _liger(case, inp):
    tau = case.temperature
    if case.path == "lens-step":
        grpo = _import("liger_kernel.transformers.grpo_loss", "triton_grpo_loss")
        ops = _import("liger_kernel.ops.grpo_loss", "fused_selective_log_softmax")
        mask_int = inp["mask"].to(torch.int64)  # Liger indexes the mask with the targets' strides

        def two_stage():
            old_logps = ops.fused_selective_log_softmax(inp["logits"], inp["targets"], temperature=tau, mask=mask_int)
            advantages = lens_advantages(case, inp, old_logps)
            return _liger_loss(grpo, inp, old_logps, advantages, tau)

        return _with_grads(case, inp, two_stage, whole_buffer=True)
    if case.path == "logits":
        grpo = _import("liger_kernel.transformers.grpo_loss", "triton_grpo_loss")
        return _with_grads(case, inp, lambda: _liger_loss(grpo, inp, inp["old_logps"], inp["advantages"], tau),
                           whole_buffer=True)
    if case.path == "logits-fwd":
        ops = _import("liger_kernel.ops.grpo_loss", "fused_selective_log_softmax")
        return _no_grad(lambda: (ops.fused_selective_log_softmax(inp["logits"], inp["targets"], tau,
                                                                 inp["mask"].to(torch.int64)),))
    if case.path == "hidden":
        chunked = _import("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
        module = chunked.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=CLIP_EPS,
                                                  epsilon_high=CLIP_EPS, loss_type="bnpo", temperature=tau)
        return _with_grads(case, inp, lambda: module(inp["hidden"], inp["weight"], inp["targets"], inp["mask"],
                                                     inp["advantages"], old_per_token_logps=inp["old_logps"])[0])
    raise Unavailable("Liger has no public hidden-states log-prob op")


def _liger_loss(grpo, inp, old_logps, advantages, tau):
    # inplace=False: the logits are the shared inputs of every provider and every timed run.
    return grpo.triton_grpo_loss(inp["logits"], old_logps, None, inp["targets"], advantages,
                                 completion_mask=inp["mask"], temperature=tau, beta=0.0, eps_low=CLIP_EPS,
                                 eps_high=CLIP_EPS, inplace=False, loss_type="bnpo", reduce=True)[0]


CCE_IGNORE_INDEX = -100


def _cce_build(filter_eps):
    def build(case, inp):
        if case.path not in ("hidden", "hidden-fwd"):
            raise Unavailable("CCE computes from hidden states only")
        cce = _import("cut_cross_entropy", "linear_cross_entropy")
        tau = case.temperature
        # The mask as CCE expects it: masked targets are its ignore_index, so it skips those tokens.
        targets = torch.where(inp["mask"], inp["targets"], torch.full_like(inp["targets"], CCE_IGNORE_INDEX))
        kwargs = dict(ignore_index=CCE_IGNORE_INDEX, reduction="none")
        if filter_eps != "auto":
            kwargs["filter_eps"] = filter_eps

        def logps():
            # (X / T) W^T = logits / T; CCE's per-token cross-entropy is minus the log-prob (0 where ignored).
            return -cce.linear_cross_entropy(inp["hidden"] / tau, inp["weight"], targets, **kwargs)

        if case.path == "hidden":
            return _with_grads(case, inp, lambda: trl_clipped_loss(logps(), inp["old_logps"], inp["advantages"],
                                                                   inp["mask"]))
        return _no_grad(lambda: (logps(),))

    return build


LOSS_HEAD_PATHS = ("logits", "logits-fwd", "hidden", "hidden-fwd")
PEERS = (
    _torch_provider("eager", compiled=False, paths=LOSS_HEAD_PATHS + ("lens-step",)),
    Provider("liger", "peer", ("logits", "logits-fwd", "hidden", "lens-step"), _liger, needs_cuda=True,
             note="triton_grpo_loss (logits, whole [B, T+1, V] buffer), fused_selective_log_softmax (no "
                  "entropy), LigerFusedLinearGRPOLoss (hidden, chunked); lens-step: fused_selective_log_softmax, "
                  "torch LENS, triton_grpo_loss", inplace="off (inplace=False)", tolerance="liger"),
    Provider("cce", "peer", ("hidden", "hidden-fwd"), _cce_build("auto"), needs_cuda=True,
             note="linear_cross_entropy(reduction='none', ignore_index=mask), default gradient filter "
                  "(filter_eps='auto'): its d grad is the filter's error against float64", tolerance="cce"),
    Provider("cce-exact", "peer", ("hidden", "hidden-fwd"), _cce_build(None), needs_cuda=True,
             note="linear_cross_entropy(filter_eps=None): no gradient filtering", tolerance="cce-exact"),
    # Last: its first call compiles, so a run cut short by a time limit loses this row first.
    # Not on lens-step: the baselines are Liger and eager TRL.
    _torch_provider("compile", compiled=True, paths=LOSS_HEAD_PATHS),
)


TRITON_VARIANTS = ("row", "split")


def providers_for(device: torch.device, only: Optional[List[str]] = None,
                  exclude: Optional[List[str]] = None) -> List[Provider]:
    """Ours (one per available backend that runs some op on ``device``), our variants, then the peers.
    On CPU the CUDA-only peers are left out. ``only`` takes names or kinds ("ours" = every backend,
    "bare", "variant", "peer"); providers that are not on by default (the triton kernel's row and split
    variants as rows of their own, ``ours-triton-row`` and ``ours-triton-split``) run only when named."""
    backends = [name for name in available_backends() if _runs_on(name, device)]
    found = [_ours(name) for name in backends] + [_ours_bare(name) for name in backends]
    found += [_ours_slice_copy(name) for name in backends] + [_ours_upstream(name) for name in backends]
    if "triton" in backends:
        found += [_ours("triton", name=f"ours-triton-{v}", env={"LENS_KERNELS_TRITON_VARIANT": v}, default=False,
                        note=f"LENS_KERNELS_TRITON_VARIANT={v} (where it applies; row elsewhere)")
                  for v in TRITON_VARIANTS]
    found += [p for p in PEERS if device.type == "cuda" or not p.needs_cuda]
    if only:
        found = [p for p in found if p.name in only or (p.kind in only and p.default)]
    else:
        found = [p for p in found if p.default]
    if exclude:
        found = [p for p in found if p.name not in exclude and p.kind not in exclude]
    return found


def _runs_on(backend: str, device: torch.device) -> bool:
    try:
        probe = torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # CUDA asked for on a machine without it: list them all
        return True
    for op in OPS_OF_PATH.values():
        if op is None:
            continue
        try:
            backend_for(op, probe, backend)
            return True
        except RuntimeError:
            pass
    return False


def case_provider_pairs(device: torch.device, cases: List[Case]) -> List[Tuple[Case, Provider]]:
    """Every (case, provider) that applies on ``device``, in run order."""
    providers = providers_for(device)
    return [(case, p) for case in cases for p in providers if case.path in p.paths]


def timed_first_call(fn) -> Tuple[tuple, float]:
    """Run once (this includes any compile or autotune) and return (outputs, seconds)."""
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
