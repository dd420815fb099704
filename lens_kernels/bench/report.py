"""Outputs of a run: the stdout table, the JSON with every figure, a markdown report, PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

COLUMNS = ("provider", "ms", "spread", "loss call ms", "extra GiB", "work", "TB/s|TFLOP/s", "% floor", "vs ours",
           "d loss", "d grad|out", "clip % (ref)", "ok", "note")


def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan" if isinstance(value, float) else "-"
    return format(value, fmt)


def row_cells(row: Dict) -> List[str]:
    if row["status"] != "ok":
        return [row["provider"], row["status"]] + ["-"] * (len(COLUMNS) - 3) + [row["reason"][:70]]
    scale = 1e12
    unit = "TB/s" if row["work_unit"] == "bytes" else "TFLOP/s"
    d_second = row.get("d_grad_rel", row.get("d_out"))
    notes = []
    if row.get("first_call_s", 0) > 1.0:
        notes.append(f"first call {row['first_call_s']:.1f} s")
    if row.get("copy_flag"):
        notes.append("copy?")
    work = "-"
    if row.get("work_buffers") is not None:
        work = f"{row['work_buffers']:.2f} buf"
    clip = "-"
    if row.get("clip") is not None:
        clip = f"{100 * row['clip']:.2f} ({100 * row['clip_ref']:.2f})"
    return [
        row["provider"],
        _num(row["ms"], ".3f"),
        _num(row.get("spread_pct"), ".1f") + "%",
        _num(row.get("loss_call_ms"), ".3f"),
        _num(row.get("extra_gib"), ".3f"),
        work,
        f"{row['throughput'] / scale:.3g} {unit}",
        _num(row.get("pct_floor"), ".1f"),
        _num(row.get("vs_ours"), ".2f") + ("x" if row.get("vs_ours") is not None else ""),
        _num(row.get("d_loss"), ".1e"),
        _num(d_second, ".1e"),
        clip,
        "ok" if row.get("within_tol") else "> tol",
        "; ".join(notes),
    ]


def _grouped(rows: List[Dict]) -> Dict[str, List[Dict]]:
    groups: Dict[str, List[Dict]] = {}
    for r in rows:
        groups.setdefault(r["case"], []).append(r)
    return groups


def format_table(rows: List[Dict]) -> str:
    """One block per case, one line per provider."""
    lines = []
    for case, group in _grouped(rows).items():
        cells = [list(COLUMNS)] + [row_cells(r) for r in group]
        widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
        first = group[0]
        shape = first.get("shape", {})
        kept = f", kept {100 * shape['kept_fraction']:.1f}% of tokens" if "kept_fraction" in shape else ""
        top1 = (first.get("inputs") or {}).get("median_top1_prob")
        peaked = f", median top-1 p {top1:.2f}" if top1 is not None else ""
        lines.append(f"== {case}{kept}{peaked} (baseline: {first.get('baseline') or '-'})")
        for c in cells:
            lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
    return "\n".join(lines)


def short_table(rows: List[Dict]) -> str:
    """A compact view: case, provider, ms, spread, extra GiB, % floor, vs ours, ok (or why no time)."""
    lines = [f"{'case':<44} {'provider':<22} {'ms':>9} {'spread':>7} {'GiB':>7} {'%floor':>7} {'vs ours':>8}  ok"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['case'][:44]:<44} {r['provider']:<22} {r['status']}: {r['reason'][:60]}")
            continue
        vs = f"{r['vs_ours']:.2f}x" if r.get("vs_ours") is not None else "-"
        spread = _num(r.get("spread_pct"), ".1f") + "%"
        lines.append(f"{r['case'][:44]:<44} {r['provider']:<22} {r['ms']:>9.3f} {spread:>7} "
                     f"{_num(r.get('extra_gib'), '.3f'):>7} {_num(r.get('pct_floor'), '.1f'):>7} "
                     f"{vs:>8}  {'ok' if r.get('within_tol') else '> tol'}")
    return "\n".join(lines)


def header_lines(result: Dict) -> List[str]:
    env, floor = result["environment"], result["floor"]
    gpu = env.get("gpu_state_start") or {}
    lines = [
        f"device: {env['device']}  load {env.get('load_average_1min', '-')}  torch {env['torch']}  "
        f"triton {env.get('triton')}  liger-kernel {env.get('liger_kernel')}  "
        f"cut-cross-entropy {env.get('cut_cross_entropy')}",
        f"commit {str(env.get('commit', 'n/a'))[:12]}{' (dirty)' if env.get('dirty') is True else ''}  switches: "
        + (" ".join(f"{k}={v}" for k, v in (env.get("env_switches") or {}).items() if v != "unset") or "none set")
        + f"  driver {gpu.get('driver_version', 'n/a')}  clocks sm {gpu.get('clocks.sm', 'n/a')} "
          f"mem {gpu.get('clocks.mem', 'n/a')}  power {gpu.get('power.draw', 'n/a')}  "
          f"temp {gpu.get('temperature.gpu', 'n/a')}",
        f"floor: copy {floor['copy_bytes_per_s'] / 1e12:.3g} TB/s (bytes read + written), {floor['matmul_dtype']} "
        f"matmul {floor['matmul_shape']}^3 {floor['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s",
    ]
    if "timer" in result:
        lines.append(f"timer: {result['timer']}; {result.get('rounds')} rounds, provider order rotated; "
                     f"warm-up {result.get('warmup_ms')} ms, timed {result.get('rep_ms')} ms per round; "
                     f"seed {result.get('seed')}; memory: {result.get('memory_method', '-')}")
    lines += result.get("notes", [])
    return lines


def legend() -> List[str]:
    return [
        "ms: median over the rounds of each round's median forward+backward time (forward only for *-fwd and "
        "advantages); spread: (max - min) / median of the round medians;",
        "loss call ms: the loss call alone, without autograd's backward. Not comparable across providers: "
        "ours computes and writes dL/dlogits inside it (fused), eager/compile/Liger compute only the forward;",
        "extra GiB: peak memory over the inputs, outputs and gradients included (GPU: the allocator's peak; "
        "CPU: resident set growth); work: extra minus outputs, in logits buffers (B*T*V in the input dtype); "
        "copy?: a buffer-sized temporary or more (a copy, slice_backward's zero fill, materialized logits);",
        "in place: both libraries have an in-place mode (ours inplace=True, Liger inplace=True); neither ran "
        "here (the inputs are shared by every provider and repetition), so extra GiB includes the gradient;",
        "same work: ours and eager/compile take a [B, T, V] logits leaf (the lm_head applied to hidden[:, :-1], "
        "or logits_to_keep: no slice copy); Liger takes the whole [B, T+1, V] buffer; ours-*:slice-copy "
        "takes the gradient through logits[:, :-1] of the whole buffer and pays autograd's slice_backward copy;",
        "grad_scale: every headline row sends an upstream gradient equal to grad_scale (1.0): our best case; "
        "ours-*:go=1/8 sends 1/8 with grad_scale 1.0 (a trainer dividing by 8 accumulation steps), which "
        "costs a rescale of the gradient unless the user sets grad_scale=1/8;",
        "TB/s | TFLOP/s: against the byte/FLOP model of the case at its kept fraction (masked rows are skipped "
        "by every kernel; lens_kernels/bench/cases.py); % floor: of the measured copy bandwidth or matmul "
        "throughput;",
        "vs ours: time / time of our fastest backend (> 1: ours is faster); d loss: |loss - baseline|; "
        "d grad|out: max |grad - baseline| / max |baseline grad| (on the baseline's sequences), or max |logp - "
        "baseline| over kept tokens; clip %: kept tokens whose gradient row the clip zeroes, read off the "
        "provider's gradient (the float64 reference's in brackets);",
        "ok: within the tolerance of the provider's family and dtype (lens_kernels/bench/runner.py, set from "
        "measured error); > tol: outside it (eager bf16 takes log_softmax in bf16; cce filters small gradient "
        "entries: its d grad is the filter's error against float64; a NaN is never ok).",
    ]


def write_json(result: Dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=1, default=str, allow_nan=True) + "\n")


def write_markdown(result: Dict, path: Path, plots: List[str]) -> None:
    lines = [f"# lens-bench report ({result['date']})", ""]
    lines += [f"- {line}" for line in header_lines(result)]
    lines += ["", *legend(), ""]
    for case, group in _grouped(result["rows"]).items():
        lines += [f"## {case}", "", f"baseline of the difference columns: {group[0].get('baseline') or '-'}", "",
                  "| " + " | ".join(c.replace("|", "/") for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row_cells(r)) + " |" for r in group]
        lines.append("")
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    path.write_text("\n".join(lines))


def write_plots(rows: List[Dict], out_dir: Path, stem: str) -> List[str]:
    """Time and memory against V (at the most common N) and N (at the most common V), per path.
    Returns the file names written; needs matplotlib (optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for path in ("logits", "hidden"):
        ok = [r for r in rows if r["path"] == path and r["status"] == "ok"]
        if not ok:
            continue
        for axis, fixed in (("V", "N"), ("N", "V")):
            values = [r["shape"][fixed] for r in ok]
            anchor = max(set(values), key=values.count)
            series = [r for r in ok if r["shape"][fixed] == anchor]
            if len({r["shape"][axis] for r in series}) < 2:
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
            with_memory = False
            for provider in sorted({r["provider"] for r in series}):
                pts = sorted((r["shape"][axis], r["ms"], r.get("extra_gib")) for r in series
                             if r["provider"] == provider)
                ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
                if all(p[2] is not None for p in pts):
                    ax_m.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=provider)
                    with_memory = True
            if not with_memory:
                ax_m.text(0.5, 0.5, "no memory figures in these rows", ha="center",
                          transform=ax_m.transAxes)
            ax_t.set(xlabel=axis, ylabel="ms (fwd+bwd)", title=f"{path}: time vs {axis} ({fixed}={anchor})")
            ax_m.set(xlabel=axis, ylabel="extra GiB", title=f"{path}: memory vs {axis} ({fixed}={anchor})")
            ax_t.legend()
            ax_t.grid(alpha=0.3)
            ax_m.grid(alpha=0.3)
            name = f"{stem}_{path}_vs_{axis}.png"
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=110)
            plt.close(fig)
            written.append(name)
    return written


def matplotlib_missing() -> Optional[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed: no plots (pip install matplotlib)"
    return None
