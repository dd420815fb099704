"""The harness itself: check each provider against the float64 reference, take its memory, then time
every provider of a case over several rounds in a rotated order.

The baseline of a case is the float64 reference (``lens_kernels.reference``), computed one sequence at
a time on the case's device: the loss and the log-probs of every sequence, the gradients of all of
them where they fit and of a subset of sequences (both signs of the advantage) at the headline. Our
torch backend is the baseline only where even one sequence does not fit. Each row records the
difference of the loss, of the gradients (relative to the largest reference gradient) or of the
log-probs, and the fraction of kept tokens the clip zeroes (read off the provider's gradient rows)
against the reference's, so that a fast wrong answer is visible next to its time.
"""
from __future__ import annotations

import gc
import os
import statistics
import subprocess
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .. import reference
from .cases import CLIP_EPS, Case, make_inputs
from .providers import LOSS_CONFIG, Provider, Unavailable, grad_leaves, timed_first_call
from .timing import measure, peak_memory, timer_name

# One sequence of the reference holds a few float64 [T, V] tensors: up to 2^28 elements (2 GiB each).
REFERENCE_MAX_SEQUENCE_ELEMENTS = 2**28
# Gradients of the reference are kept (fp32) for at most this many logits: all sequences below it,
# a subset of whole sequences above it (the headline: 6 of 16 on a GPU; the big CPU shapes: 2).
REFERENCE_MAX_GRAD_ELEMENTS = {"cuda": 2**30, "cpu": 2**26}
REFERENCE_MAX_ADVANTAGE_TOKENS = 2**27

# Tolerances of the "ok" column, per tolerance family (the provider's), input dtype and kind of path
# ("logits": the logits are given; "hidden": they are a GEMM's output): |d loss|, max |d grad| / max
# |grad|, |d logp| (advantages compare like log-probs), and |d clip|, the difference of the fraction of
# kept tokens whose gradient the clip zeroes. Set from the largest error measured on the bench's own
# inputs (``python benchmarks/measure_tolerances.py --seeds 4``: CPU, ours-torch and eager, 5 paths x 4
# seeds; figures in benchmarks/NOTES.md) times 3-5, rounded up; fp32 at ~5-10x, since a fp32 loss
# moved by 4e-7 at another T. The GPU-only families (liger, cce,
# cce-exact) borrow ours until a GPU run measures them: provisional. A gradient off by 4% (1.04x) fails
# every family on the logits paths; on the hidden paths in bf16 it passes, as rounding the GEMM's
# output to bf16 (cuBLAS, eager, our fast mode) moves a log-prob by up to ~0.07 and the gradient by ~4%.
def _tol(loss, grad, out, clip=0.0):
    return dict(loss=loss, grad=grad, out=out, clip=clip)


TOLERANCES = {
    "ours": {
        "float32": {"logits": _tol(1e-6, 2e-5, 2e-5), "hidden": _tol(2e-6, 2e-5, 2e-5)},
        "float16": {"logits": _tol(2e-7, 2e-3, 1e-5), "hidden": _tol(5e-4, 1.5e-2, 1.5e-2)},
        "bfloat16": {"logits": _tol(2e-7, 1e-2, 1e-5), "hidden": _tol(4e-3, 1e-1, 1e-1)},
    },
    # TRL-style: log_softmax in the input dtype (bf16/fp16), so a kept token may cross a clip bound.
    "eager": {
        "float32": {"logits": _tol(1e-6, 2e-5, 2e-5), "hidden": _tol(2e-6, 2e-5, 2e-5)},
        "float16": {"logits": _tol(5e-4, 3e-2, 4e-2, 0.01), "hidden": _tol(2e-3, 3e-2, 4e-2, 0.01)},
        "bfloat16": {"logits": _tol(3e-3, 1.5e-1, 2e-1, 0.01), "hidden": _tol(8e-3, 2e-1, 2.5e-1, 0.01)},
    },
}
TOLERANCES["compile"] = TOLERANCES["eager"]
# Provisional: Liger and CCE compute in fp32 from the input dtype, as ours does.
TOLERANCES["liger"] = TOLERANCES["ours"]
TOLERANCES["cce-exact"] = TOLERANCES["ours"]
# CCE's default filter drops gradient entries under 2^-12 (bf16) or 2^-23 (fp32): at least that much,
# relative to a largest entry near 1 - p_top ~ 0.1, and the bf16 rounding on top.
TOLERANCES["cce"] = {dt: {kind: dict(t, grad=max(t["grad"], 2e-2)) for kind, t in kinds.items()}
                     for dt, kinds in TOLERANCES["ours"].items()}


def tolerance(case: Case, family: str = "ours") -> Dict[str, float]:
    kinds = TOLERANCES.get(family, TOLERANCES["ours"])[case.dtype]
    return kinds["hidden" if case.path.startswith("hidden") else "logits"]


# A row's working memory (peak over the inputs, minus its outputs) of this many logits buffers
# (B * T * V elements of the input dtype) or more is flagged "copy?": a full-size temporary (a copy,
# slice_backward's zero-filled buffer, or materialized logits / probabilities).
COPY_FLAG_BUFFERS = 0.5


# -------------------------------------------------------------------------------------------------
# The float64 reference, one sequence at a time
# -------------------------------------------------------------------------------------------------
def reference_fits(case: Case) -> bool:
    if case.path == "advantages":
        return case.B * case.T <= REFERENCE_MAX_ADVANTAGE_TOKENS
    return case.T * case.V <= REFERENCE_MAX_SEQUENCE_ELEMENTS


def reference_grad_rows(case: Case, inp: Dict[str, torch.Tensor]) -> Optional[List[int]]:
    """The sequences whose reference gradient is computed: None (all) where they fit, else a subset
    of whole sequences: the first kept ones of each advantage sign, then evenly spaced ones."""
    limit = REFERENCE_MAX_GRAD_ELEMENTS["cuda" if inp["mask"].is_cuda else "cpu"]
    if case.path == "hidden" or case.N * case.V <= limit:
        return None  # the hidden path's dW needs every sequence
    n = max(2, limit // (case.T * case.V))
    lengths = inp["mask"].sum(1).cpu()
    kept = [b for b in range(case.B) if lengths[b] > 0]
    rows = []
    if "advantages" in inp:
        adv = inp["advantages"].cpu()
        for sign in (1, -1):
            rows += [b for b in kept if adv[b] * sign > 0][:1]
    spaced = [kept[int(i * len(kept) / n)] for i in range(n)] if kept else []
    rows += [b for b in spaced if b not in rows]
    return sorted(rows[:n])


def reference_outputs(case: Case, inp: Dict[str, torch.Tensor], grad_rows: Optional[List[int]] = "auto") -> Dict:
    """The float64 reference of ``case``: a dict with ``loss`` and ``grads`` (fp32, of the sequences in
    ``rows``, None = all) for the forward + backward paths, ``out`` for the forward-only ones, and
    ``clip``, the fraction of kept tokens the clip zeroes (where there are old log-probs)."""
    if grad_rows == "auto":
        grad_rows = reference_grad_rows(case, inp)
    tau, mask = case.temperature, inp["mask"]
    if case.path == "advantages":
        out = reference.group_advantages(inp["rewards"], group_size=case.group_size, estimator="lens",
                                         old_logps=inp["old_logps"], mask=mask)
        return dict(out=out[0] if isinstance(out, tuple) else out)
    if case.path == "lens-step":
        return lens_step_reference(case, inp, grad_rows)
    rows = range(case.B)
    if case.path in ("logits-fwd", "hidden-fwd"):
        with torch.no_grad():
            return dict(out=torch.cat([_ref_logps(case, inp, b)[0] for b in rows]))
    wanted = set(rows if grad_rows is None else grad_rows)
    total = mask.sum().clamp(min=1).double()
    loss = torch.zeros((), dtype=torch.float64, device=mask.device)
    logps_all, grads = [], []
    weight = None
    if case.path == "hidden":
        weight = inp["weight"].detach().double().requires_grad_(True)
        d_hidden = torch.empty_like(inp["hidden"], dtype=torch.float32)
        d_weight = torch.zeros_like(weight)
    for b in rows:
        with torch.set_grad_enabled(b in wanted):
            logps, x = _ref_logps(case, inp, b, weight, requires_grad=b in wanted)
            part, _ = reference.policy_loss(logps, inp["advantages"][b:b + 1], mask[b:b + 1],
                                            old_logps=inp["old_logps"][b:b + 1], config=LOSS_CONFIG, num_tokens=total)
        if b in wanted:
            if case.path == "hidden":
                gx, gw = torch.autograd.grad(part, [x, weight])
                d_hidden[b:b + 1] = gx
                d_weight += gw
            else:
                grads.append(torch.autograd.grad(part, [x])[0].float())
        loss += part.detach()
        logps_all.append(logps.detach())
    logps_all = torch.cat(logps_all)
    if case.path == "hidden":
        grads = [d_hidden, d_weight.float()]
    else:
        grads = [torch.cat(grads)]
    return dict(loss=loss, grads=grads, rows=grad_rows, clip=expected_clip_fraction(case, inp, logps_all))


def _ref_logps(case, inp, b, weight=None, requires_grad=False):
    """float64 log-probs of sequence b, and the float64 leaf they were computed from."""
    tau, mask, targets = case.temperature, inp["mask"][b:b + 1], inp["targets"][b:b + 1]
    if case.from_logits:
        x = inp["logits_kept"][b:b + 1].detach().double().requires_grad_(requires_grad)
        return reference.token_logprobs(x, targets, tau, mask)[0], x
    x = inp["hidden"][b:b + 1].detach().double().requires_grad_(requires_grad)
    w = inp["weight"].detach().double() if weight is None else weight
    return reference.linear_token_logprobs(x, w, targets, temperature=tau, mask=mask)[0], x


def expected_clip_fraction(case: Case, inp: Dict[str, torch.Tensor], logps: torch.Tensor) -> float:
    """The fraction of kept tokens whose gradient the clip zeroes: ratio above 1 + eps with a positive
    advantage, or below 1 - eps with a negative one (from float64 log-probs)."""
    mask = inp["mask"].bool()
    ratio = torch.exp(logps.double() - inp["old_logps"].double())
    adv = inp["advantages"].double()[:, None]
    clipped = mask & (((adv > 0) & (ratio > 1 + CLIP_EPS)) | ((adv < 0) & (ratio < 1 - CLIP_EPS)))
    return float(clipped.sum()) / max(1, int(mask.sum()))


def lens_step_reference(case: Case, inp: Dict[str, torch.Tensor], grad_rows: Optional[List[int]] = None) -> Dict:
    """The float64 reference composition of the on-policy LENS step, one sequence at a time:
    ``reference.group_advantages`` on the reference token log-probs, then
    ``reference.policy_loss_from_logits`` (on-policy) of each sequence over the batch's token count,
    whose sum is the loss and whose gradients are the rows of dL/dlogits (stored in fp32)."""
    tau, mask, targets, buf = case.temperature, inp["mask"], inp["targets"], inp["logits_kept"].detach()
    rows = range(case.B)
    wanted = list(rows) if grad_rows is None else list(grad_rows)
    with torch.no_grad():
        logps = torch.cat([reference.token_logprobs(buf[b:b + 1], targets[b:b + 1], tau, mask[b:b + 1])[0]
                           for b in rows])
    advantages = reference.group_advantages(inp["rewards"], group_size=case.group_size, estimator="lens",
                                            old_logps=logps, mask=mask).to(buf.device)
    num_tokens = mask.sum().clamp(min=1).double()
    loss = torch.zeros((), dtype=torch.float64, device=buf.device)
    grad = torch.empty((len(wanted),) + tuple(buf.shape[1:]), dtype=torch.float32, device=buf.device)
    for b in rows:
        want = b in wanted
        x = buf[b:b + 1].double().requires_grad_(want)
        with torch.set_grad_enabled(want):
            part, _ = reference.policy_loss_from_logits(x, targets[b:b + 1], mask[b:b + 1], advantages[b:b + 1],
                                                        temperature=tau, config=LOSS_CONFIG, num_tokens=num_tokens)
        if want:
            grad[wanted.index(b):wanted.index(b) + 1] = torch.autograd.grad(part, [x])[0]
        loss += part.detach()
    return dict(loss=loss, grads=[grad], rows=grad_rows, clip=None)


# -------------------------------------------------------------------------------------------------
# Comparison
# -------------------------------------------------------------------------------------------------
def compare(case: Case, out: tuple, base: Dict, mask: Optional[torch.Tensor], upstream: float = 1.0) -> Dict[str, float]:
    """Differences of ``out`` against ``base`` (``reference_outputs``): loss, relative gradient and clip
    fraction, or outputs at the kept tokens (all completions for advantages). Gradients of the whole
    [B, T + 1, V] buffer (Liger, the slice-copy row) must be zero at the last position and are compared
    on the first T; gradients taken for an upstream gradient ``upstream`` are divided by it."""
    if not case.fwd_bwd:
        value, base_value = out[0].detach().double(), base["out"].detach().double()
        if case.path != "advantages":
            keep = mask.bool()
            value, base_value = value[keep], base_value[keep]
        diff = (value - base_value).abs().max().item() if value.numel() else 0.0
        if not torch.isfinite(value).all().item():
            diff = float("nan")
        return {"d_out": diff}
    loss, grads = out
    grads = list(grads)
    rows = base.get("rows")
    d_grad, tail = 0.0, 0.0
    if case.from_logits and grads[0].dim() == 3 and grads[0].shape[1] == case.T + 1:
        tail = _max_abs(grads[0][:, -1:]).item()  # the buffer's last position takes no gradient
        grads[0] = grads[0][:, :-1]
    observed_clip = None
    if base.get("clip") is not None and mask is not None:
        observed_clip = zero_row_fraction(grads[0], mask)
    for i, (g, r) in enumerate(zip(grads, base["grads"])):
        if i == 0 and rows is not None:
            g = g[torch.as_tensor(rows, device=g.device)]
        scale = _max_abs(r).clamp_min(1e-30)
        d_grad = max(d_grad, (_max_abs(r, minus=g, minus_scale=1.0 / upstream) / scale).item())
        if i == 0:
            d_grad = max(d_grad, tail / upstream / scale.item())
    d_loss = (loss.detach().double() - base["loss"].detach().double()).abs().item()
    if not (torch.isfinite(loss).item() and all(torch.isfinite(g).all().item() for g in grads)):
        d_loss = float("nan")
    diffs = {"d_loss": d_loss, "d_grad_rel": d_grad}
    if observed_clip is not None:
        diffs.update(clip=observed_clip, clip_ref=base["clip"], d_clip=abs(observed_clip - base["clip"]))
    return diffs


def zero_row_fraction(grad: torch.Tensor, mask: torch.Tensor) -> float:
    """The fraction of kept tokens whose gradient row is exactly zero: where the clip decided (the
    advantages are never 0), read off a [B, T, V] logits gradient or a [B, T, H] hidden one."""
    keep = mask.bool()
    zero = torch.zeros_like(keep)
    for b in range(grad.shape[0]):  # one sequence at a time: a [T, V] bool temporary
        zero[b] = (grad[b] == 0).all(-1)
    return float((zero & keep).sum()) / max(1, int(keep.sum()))


# Elements per float64 slice in ``_max_abs``: 128 MiB of temporaries, whatever the tensor's size.
COMPARE_CHUNK_ELEMENTS = 2**24


def _max_abs(t: torch.Tensor, minus: Optional[torch.Tensor] = None, minus_scale: float = 1.0) -> torch.Tensor:
    """max |t - minus_scale * minus| (or max |t|) of a gradient in float64, slice by slice along dim 0:
    a float64 copy of a headline gradient is 20 GB, several times over with the temporaries."""
    t = t.detach()
    rows = max(1, COMPARE_CHUNK_ELEMENTS // max(1, t[0].numel())) if t.dim() else 1
    if t.dim() == 0:
        t = t.reshape(1)
        minus = None if minus is None else minus.reshape(1)
    worst = torch.zeros((), dtype=torch.float64, device=t.device)
    for start in range(0, t.shape[0], rows):
        part = t[start:start + rows].double()
        if minus is not None:
            part = part - minus.detach()[start:start + rows].double().to(part.device) * minus_scale
        if part.numel():
            worst = torch.maximum(worst, part.abs().max())  # NaN propagates
    return worst


def within_tolerance(case: Case, diffs: Dict[str, float], family: str = "ours") -> bool:
    tol = tolerance(case, family)
    checks = [("d_loss", "loss"), ("d_grad_rel", "grad"), ("d_out", "out"), ("d_clip", "clip")]
    # NaN compares False, so a NaN never passes.
    return all(diffs[k] <= tol[t] + (1e-9 if t == "clip" else 0.0) for k, t in checks if k in diffs)


def _free(device: torch.device) -> None:
    # Only a GPU needs it: the next provider's peak memory must not count this one's leftovers
    # (and a full collection costs a third of a second on CPU once torch.compile is loaded).
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_case(case: Case, providers: List[Provider], device: torch.device, warmup_ms: float, rep_ms: float,
             log: Callable[[str], None] = print, rounds: int = 3, seed: int = 0) -> List[Dict]:
    """All providers of one case on the same inputs; one row each. First each provider once: its
    first call (compile or autotune included), its check against the reference and its peak memory;
    then ``rounds`` rounds of timing, the provider order rotated by one each round, so that no
    provider always runs first (cold) or after the same neighbour. A row's time is the median of its
    round medians; ``spread_pct`` is (max - min) / median of them."""
    inp = make_inputs(case, device, seed=seed)
    stats = inp.pop("stats")
    for leaf in grad_leaves(case, inp):
        leaf.requires_grad_(True)
    base, base_name = None, None
    if reference_fits(case):
        base, base_name = reference_outputs(case, inp), "reference-fp64"
        if base.get("rows") is not None:
            base_name += f" (gradient of sequences {base['rows']} of {case.B})"
    kept = stats["kept_fraction"]
    shape = dict(N=case.N, B=case.B, T=case.T, V=case.V, H=case.H, G=case.group_size, dtype=case.dtype,
                 kept_fraction=kept)
    rows, fns = [], {}
    for provider in providers:
        if case.path not in provider.paths:
            continue
        row = dict(case=case.name, path=case.path, provider=provider.name, kind=provider.kind, status="ok",
                   reason="", note=provider.note, inplace=provider.inplace, tolerance=provider.tolerance,
                   shape=shape, inputs=stats, seed=seed)
        rows.append(row)
        fn = out = None
        try:
            fn = provider.build(case, inp)
            out, row["first_call_s"] = timed_first_call(fn)
            if base is None:  # no reference at this size: our first backend is the baseline
                base = _as_base(case, out)
                base_name = provider.name
            row["baseline"] = base_name
            row.update(compare(case, out, base, inp["mask"], upstream=getattr(fn, "upstream", 1.0)))
            row["within_tol"] = within_tolerance(case, row, provider.tolerance)
            del out
            _memory(row, fn, device, case)
            fns[provider.name] = fn
        except Unavailable as exc:
            row.update(status="unavailable", reason=str(exc))
        except Exception as exc:  # a failing provider is a row, never a crash
            _failed(row, exc)
        finally:
            fn = out = None
            _free(device)
    ok = [r for r in rows if r["provider"] in fns]
    for r in ok:
        r["rounds"] = []
    for k in range(rounds):
        order = ok[k % len(ok):] + ok[:k % len(ok)] if ok else []
        for r in order:
            if r["status"] != "ok":
                continue
            try:
                r["rounds"].append(measure(fns[r["provider"]], device, warmup_ms, rep_ms))
            except Exception as exc:
                _failed(r, exc)
    for r in ok:
        if r["status"] != "ok":
            continue
        medians = [m["ms"] for m in r["rounds"]]
        r["ms"] = statistics.median(medians)
        r["spread_pct"] = 100.0 * (max(medians) - min(medians)) / r["ms"] if r["ms"] > 0 else 0.0
        r["reps"] = sum(m["reps"] for m in r["rounds"])
        forward = getattr(fns[r["provider"]], "forward", None)
        if forward is not None:
            try:
                r["loss_call_ms"] = measure(forward, device, warmup_ms, rep_ms)["ms"]
            except Exception as exc:
                _failed(r, exc)
        log(_progress(r))
    for r in rows:
        if r["status"] != "ok":
            log(_progress(r))
    fns.clear()
    _rate(case, rows, kept)
    del inp
    _free(device)
    return rows


def _failed(row: Dict, exc: Exception) -> None:
    first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
    row.update(status="failed", reason=f"{type(exc).__name__}: {first_line}")
    row["traceback"] = traceback.format_exc(limit=4)


def _as_base(case: Case, out) -> Dict:
    if case.fwd_bwd:
        return dict(loss=out[0].detach(), grads=[g.detach().float() for g in out[1]], rows=None, clip=None)
    return dict(out=out[0].detach())


def _memory(row: Dict, fn, device: torch.device, case: Case) -> None:
    """Peak memory over the inputs, the outputs' share of it, and the working memory in logits buffers
    (B * T * V elements of the input dtype); ``copy_flag`` when it is a full-size temporary or more."""
    mem = peak_memory(fn, device)
    row["memory_method"] = mem["method"]
    if mem["extra_bytes"] is None:
        row["extra_gib"] = None
        return
    row["extra_gib"] = mem["extra_bytes"] / 2**30
    row["output_gib"] = mem["output_bytes"] / 2**30
    row["work_gib"] = mem["work_bytes"] / 2**30
    if case.V:
        buffer_bytes = case.N * case.V * torch.finfo(case.torch_dtype).bits // 8
        row["work_buffers"] = mem["work_bytes"] / buffer_bytes
        row["copy_flag"] = row["work_buffers"] >= COPY_FLAG_BUFFERS


def _progress(row: Dict) -> str:
    if row["status"] != "ok":
        return f"  {row['provider']:<22} {row['status']}: {row['reason']}"
    return f"  {row['provider']:<22} {row['ms']:.3f} ms (spread {row['spread_pct']:.1f}%, {row['reps']} reps)"


def _rate(case: Case, rows: List[Dict], kept_fraction: float = 1.0) -> None:
    """Throughput against the work model at the case's kept fraction, and the ratio against our
    fastest backend in this case."""
    work, unit = case.work(kept_fraction)
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
            after_case: Optional[Callable[[List[Dict]], None]] = None, rounds: int = 3, seed: int = 0) -> List[Dict]:
    """Every case in turn; ``after_case(rows)`` sees the rows of each finished case, so that a run
    cut short by a time limit still leaves its results behind."""
    rows = []
    for case in cases:
        log(f"{case.name}")
        start = time.perf_counter()
        case_rows = run_case(case, providers, device, warmup_ms, rep_ms, log, rounds=rounds, seed=seed)
        rows += case_rows
        log(f"  ({time.perf_counter() - start:.1f} s)")
        if after_case is not None:
            after_case(case_rows)
    return rows


ENV_SWITCHES = ("LENS_KERNELS_TRITON_VARIANT", "LENS_KERNELS_CHECK", "LENS_KERNELS_BACKEND", "LENS_KERNELS_CHUNK_BYTES",
                "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
NVIDIA_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
                     "power.draw", "power.limit", "temperature.gpu", "pstate", "mig.mode.current")


def environment(device: torch.device) -> Dict[str, object]:
    """Versions, the device, the commit and the switches that change what runs, for the JSON."""
    import platform

    from .. import __version__

    env = {"lens_kernels": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": "cpu" if device.type != "cuda" else torch.cuda.get_device_name(device),
           "cuda": torch.version.cuda, "cpu_threads": str(torch.get_num_threads()),
           "cpu": platform.processor() or platform.machine()}
    env.update(git_state())
    env["env_switches"] = {k: os.environ.get(k, "unset") for k in ENV_SWITCHES}
    if hasattr(os, "getloadavg"):  # CPU timings on a shared machine mean little under load: say how much
        env["load_average_1min"] = f"{os.getloadavg()[0]:.2f}"
    env["gpu_state_start"] = gpu_state(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    for module in ("triton", "liger_kernel", "cut_cross_entropy"):
        try:
            from importlib.metadata import version

            env[module] = version(module.replace("_", "-"))
        except Exception:
            env[module] = None
    return env


def gpu_state(device: torch.device) -> Dict[str, str]:
    """Driver, SM and memory clocks, power and temperature from nvidia-smi ("n/a" on CPU or without
    it): taken at the start and the end of a run, as clocks and temperature drift under load."""
    if device.type != "cuda":
        return {k: "n/a" for k in NVIDIA_SMI_FIELDS}
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        line = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=" + ",".join(NVIDIA_SMI_FIELDS),
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
        values = [v.strip() for v in line.strip().split(",")]
        if len(values) == len(NVIDIA_SMI_FIELDS):
            return dict(zip(NVIDIA_SMI_FIELDS, values))
    except (OSError, subprocess.SubprocessError):
        pass
    return {k: "n/a" for k in NVIDIA_SMI_FIELDS}


def git_state() -> Dict[str, object]:
    """The commit of the package's checkout and whether it had uncommitted changes to tracked files; "n/a"
    for a package that is not a git checkout (a wheel in site-packages, an unpacked source tree), which
    must not report the commit of a repository that merely encloses it (a venv inside a checkout)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return {"commit": "n/a", "dirty": "n/a"}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=20)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20)
        if commit.returncode == 0:
            return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": "n/a", "dirty": "n/a"}
