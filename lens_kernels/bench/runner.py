"""Run cases x providers: check each provider against the baseline, then time it and take its memory.

The baseline of a case is the float64 reference (``lens_kernels.reference``) where it fits in a
modest amount of memory, else our torch backend. Each row records the max difference of the loss
and of the gradients (relative to the largest baseline gradient) or of the log-probs, so that a fast
wrong answer is visible next to its time.
"""
from __future__ import annotations

import gc
import os
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

from .. import reference
from .cases import Case, make_inputs
from .providers import LOSS_CONFIG, Provider, Unavailable, grad_leaves, timed_first_call
from .timing import extra_peak_gib, median_ms

# The reference runs in float64 on the case's device; beyond this many logits it is too big (the
# autograd graph holds several [N, V] fp64 tensors). LENS's reference reduces [B, T] old log-probs
# with torch and loops over completions in Python: 65536 x 1024 tokens (0.5 GB fp64) is fine.
REFERENCE_MAX_ELEMENTS = 2**23
REFERENCE_MAX_ADVANTAGE_TOKENS = 2**27
# The LENS step's reference runs one sequence at a time (a few fp64 copies of [T, V]: about 6 GB at
# T = 1024, V = 151936) and keeps its gradient in fp32 (N * V * 4 B: 10 GB at the headline).
REFERENCE_MAX_STEP_ELEMENTS = 2**32

# Tolerances of the "ok" column, per input dtype: |d loss|, max |d grad| / max |grad|, and |d logp|
# (advantages are compared like log-probs). bf16 peers that take log_softmax in bf16 (TRL) are
# expected near the edge of the bf16 bounds.
TOLERANCES = {
    "float32": dict(loss=1e-4, grad=1e-3, out=1e-4),
    "float16": dict(loss=1e-2, grad=2e-2, out=2e-2),
    "bfloat16": dict(loss=5e-2, grad=5e-2, out=1.5e-1),
}


def lens_step_reference(case: Case, inp: Dict[str, torch.Tensor]):
    """The float64 reference composition of the on-policy LENS step, one sequence at a time:
    ``reference.group_advantages`` on the reference token log-probs, then
    ``reference.policy_loss_from_logits`` (on-policy) of each sequence over the batch's token count,
    whose sum is the loss and whose gradients are the rows of dL/dlogits (stored in fp32)."""
    tau, mask, targets, buf = case.temperature, inp["mask"], inp["targets"], inp["logits"].detach()
    rows = range(case.B)
    with torch.no_grad():
        logps = torch.cat([reference.token_logprobs(buf[b:b + 1, :-1], targets[b:b + 1], tau, mask[b:b + 1])[0]
                           for b in rows])
    advantages = reference.group_advantages(inp["rewards"], group_size=case.group_size, estimator="lens",
                                            old_logps=logps, mask=mask).to(buf.device)
    num_tokens = mask.sum().clamp(min=1).double()
    loss, grad = torch.zeros((), dtype=torch.float64, device=buf.device), torch.empty_like(buf, dtype=torch.float32)
    for b in rows:
        x = buf[b:b + 1].double().requires_grad_(True)
        part, _ = reference.policy_loss_from_logits(x[:, :-1], targets[b:b + 1], mask[b:b + 1], advantages[b:b + 1],
                                                    temperature=tau, config=LOSS_CONFIG, num_tokens=num_tokens)
        grad[b:b + 1] = torch.autograd.grad(part, [x])[0]
        loss += part.detach()
    return loss, (grad,)


def reference_outputs(case: Case, inp: Dict[str, torch.Tensor]):
    tau, mask = case.temperature, inp["mask"]
    if case.path == "lens-step":
        return lens_step_reference(case, inp)
    if case.path == "advantages":
        out = reference.group_advantages(inp["rewards"], group_size=case.group_size, estimator="lens",
                                         old_logps=inp["old_logps"], mask=mask)
        return (out[0] if isinstance(out, tuple) else out,)
    if case.path in ("logits", "logits-fwd"):
        buf = inp["logits"].detach().double().requires_grad_(case.path == "logits")
        if case.path == "logits-fwd":
            return (reference.token_logprobs(buf[:, :-1], inp["targets"], tau, mask)[0],)
        loss, _ = reference.policy_loss_from_logits(buf[:, :-1], inp["targets"], mask, inp["advantages"],
                                                    temperature=tau, old_logps=inp["old_logps"], config=LOSS_CONFIG)
        return loss, torch.autograd.grad(loss, [buf])
    hidden = inp["hidden"].detach().double().requires_grad_(case.path == "hidden")
    weight = inp["weight"].detach().double().requires_grad_(case.path == "hidden")
    if case.path == "hidden-fwd":
        return (reference.linear_token_logprobs(hidden, weight, inp["targets"], temperature=tau, mask=mask)[0],)
    loss, _ = reference.policy_loss_from_hidden(hidden, weight, inp["targets"], mask, inp["advantages"],
                                                temperature=tau, old_logps=inp["old_logps"], config=LOSS_CONFIG)
    return loss, torch.autograd.grad(loss, [hidden, weight])


def reference_fits(case: Case) -> bool:
    if case.path == "advantages":
        return case.B * case.T <= REFERENCE_MAX_ADVANTAGE_TOKENS
    if case.path == "lens-step":
        return case.N * case.V <= REFERENCE_MAX_STEP_ELEMENTS
    return case.N * case.V <= REFERENCE_MAX_ELEMENTS


def compare(case: Case, out: tuple, base: tuple, mask: torch.Tensor) -> Dict[str, float]:
    """Max differences of ``out`` against ``base``: loss and relative gradient, or outputs at the
    kept tokens (all completions for advantages)."""
    if case.fwd_bwd:
        loss, grads = out
        base_loss, base_grads = base
        d_grad = 0.0
        for g, r in zip(grads, base_grads):
            scale = _max_abs(r).clamp_min(1e-30)
            d_grad = max(d_grad, (_max_abs(r, minus=g) / scale).item())
        d_loss = (loss.detach().double() - base_loss.detach().double()).abs().item()
        if not (torch.isfinite(loss).item() and all(torch.isfinite(g).all().item() for g in grads)):
            d_loss = float("nan")
        return {"d_loss": d_loss, "d_grad_rel": d_grad}
    value, base_value = out[0].detach().double(), base[0].detach().double()
    if case.path != "advantages":
        keep = mask.bool()
        value, base_value = value[keep], base_value[keep]
    diff = (value - base_value).abs().max().item() if value.numel() else 0.0
    if not torch.isfinite(value).all().item():
        diff = float("nan")
    return {"d_out": diff}


# Elements per float64 slice in ``_max_abs``: 128 MiB of temporaries, whatever the tensor's size.
COMPARE_CHUNK_ELEMENTS = 2**24


def _max_abs(t: torch.Tensor, minus: Optional[torch.Tensor] = None) -> torch.Tensor:
    """max |t - minus| (or max |t|) of a gradient in float64, slice by slice along dim 0: a float64
    copy of a headline gradient is 20 GB, several times over with the temporaries of the difference."""
    t = t.detach()
    rows = max(1, COMPARE_CHUNK_ELEMENTS // max(1, t[0].numel()))
    worst = torch.zeros((), dtype=torch.float64, device=t.device)
    for start in range(0, t.shape[0], rows):
        part = t[start:start + rows].double()
        if minus is not None:
            part = part - minus.detach()[start:start + rows].double()
        if part.numel():
            worst = torch.maximum(worst, part.abs().max())  # NaN propagates
    return worst


def within_tolerance(case: Case, diffs: Dict[str, float]) -> bool:
    tol = TOLERANCES[case.dtype]
    checks = [("d_loss", "loss"), ("d_grad_rel", "grad"), ("d_out", "out")]
    # NaN compares False, so a NaN never passes.
    return all(diffs[k] <= tol[t] for k, t in checks if k in diffs)


def _free(device: torch.device) -> None:
    # Only a GPU needs it: the next provider's peak memory must not count this one's leftovers
    # (and a full collection costs a third of a second on CPU once torch.compile is loaded).
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_case(case: Case, providers: List[Provider], device: torch.device, warmup_ms: float, rep_ms: float,
             log: Callable[[str], None] = print) -> List[Dict]:
    """All providers of one case on the same inputs; one row each."""
    inp = make_inputs(case, device)
    for leaf in grad_leaves(case, inp):
        leaf.requires_grad_(True)
    base, base_name = None, None
    if reference_fits(case):
        base, base_name = reference_outputs(case, inp), "reference-fp64"
    rows = []
    for provider in providers:
        if case.path not in provider.paths:
            continue
        row = dict(case=case.name, path=case.path, provider=provider.name, kind=provider.kind, status="ok",
                   reason="", note=provider.note, shape=dict(N=case.N, V=case.V, H=case.H, dtype=case.dtype))
        rows.append(row)
        fn = out = None
        try:
            fn = provider.build(case, inp)
            out, row["first_call_s"] = timed_first_call(fn)
            if base is None:  # no reference at this size: our first backend is the baseline
                base, base_name = out, provider.name
            row["baseline"] = base_name
            row.update(compare(case, out, base, inp["mask"]))
            row["within_tol"] = within_tolerance(case, row)
            del out
            row["extra_gib"] = extra_peak_gib(fn, device)
            row["ms"] = median_ms(fn, device, warmup_ms, rep_ms)
            if getattr(fn, "forward", None) is not None:
                row["fwd_ms"] = median_ms(fn.forward, device, warmup_ms, rep_ms)
        except Unavailable as exc:
            row.update(status="unavailable", reason=str(exc))
        except Exception as exc:  # a failing provider is a row, never a crash
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            row.update(status="failed", reason=f"{type(exc).__name__}: {first_line}")
            row["traceback"] = traceback.format_exc(limit=4)
        finally:
            fn = out = None
            _free(device)
        log(_progress(row))
    _rate(case, rows)
    del inp
    _free(device)
    return rows


def _progress(row: Dict) -> str:
    if row["status"] != "ok":
        return f"  {row['provider']:<16} {row['status']}: {row['reason']}"
    return f"  {row['provider']:<16} {row['ms']:.3f} ms"


def _rate(case: Case, rows: List[Dict]) -> None:
    """Throughput and the ratio against our fastest backend in this case."""
    work, unit = case.work()
    ours = [r["ms"] for r in rows if r["kind"] == "ours" and r["status"] == "ok"]
    best = min(ours) if ours else None
    for r in rows:
        r["work"], r["work_unit"] = work, unit
        if r["status"] != "ok":
            continue
        r["throughput"] = work / (r["ms"] / 1e3)  # bytes/s or FLOP/s
        r["vs_ours"] = r["ms"] / best if best else None


def apply_floor(rows: List[Dict], floor: Dict[str, float]) -> None:
    """The fraction of the measured floor: copy bandwidth for bytes, matmul throughput for FLOPs."""
    for r in rows:
        if "throughput" not in r:
            continue
        ceiling = floor["copy_bytes_per_s"] if r["work_unit"] == "bytes" else floor["matmul_flops_per_s"]
        r["pct_floor"] = 100.0 * r["throughput"] / ceiling


def run_all(cases: List[Case], providers: List[Provider], device: torch.device, warmup_ms: float,
            rep_ms: float, log: Callable[[str], None] = print,
            after_case: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Every case in turn; ``after_case(rows)`` sees the rows of each finished case, so that a run
    cut short by a time limit still leaves its results behind."""
    rows = []
    for case in cases:
        log(f"{case.name}")
        start = time.perf_counter()
        case_rows = run_case(case, providers, device, warmup_ms, rep_ms, log)
        rows += case_rows
        log(f"  ({time.perf_counter() - start:.1f} s)")
        if after_case is not None:
            after_case(case_rows)
    return rows


def environment(device: torch.device) -> Dict[str, Optional[str]]:
    """Versions and the device name, for the JSON."""
    import platform

    from .. import __version__

    env = {"lens_kernels": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": "cpu" if device.type != "cuda" else torch.cuda.get_device_name(device),
           "cuda": torch.version.cuda, "cpu_threads": str(torch.get_num_threads())}
    if hasattr(os, "getloadavg"):  # CPU timings on a shared machine mean little under load: say how much
        env["load_average_1min"] = f"{os.getloadavg()[0]:.2f}"
    for module in ("triton", "liger_kernel", "cut_cross_entropy"):
        try:
            from importlib.metadata import version

            env[module] = version(module.replace("_", "-"))
        except Exception:
            env[module] = None
    return env
