"""Outputs of a run: the stdout table, the JSON with every figure, a markdown report, PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

COLUMNS = ("provider", "ms", "fwd ms", "extra GiB", "TB/s|TFLOP/s", "% floor", "vs ours", "d loss",
           "d grad|out", "ok", "note")


def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan" if isinstance(value, float) else "-"
    return format(value, fmt)


def row_cells(row: Dict) -> List[str]:
    if row["status"] != "ok":
        return [row["provider"], row["status"]] + ["-"] * 8 + [row["reason"][:70]]
    scale = 1e12
    unit = "TB/s" if row["work_unit"] == "bytes" else "TFLOP/s"
    d_second = row.get("d_grad_rel", row.get("d_out"))
    note = f"first call {row['first_call_s']:.1f} s" if row.get("first_call_s", 0) > 1.0 else ""
    return [
        row["provider"],
        _num(row["ms"], ".3f"),
        _num(row.get("fwd_ms"), ".3f"),
        _num(row.get("extra_gib"), ".3f"),
        f"{row['throughput'] / scale:.3g} {unit}",
        _num(row.get("pct_floor"), ".1f"),
        _num(row.get("vs_ours"), ".2f") + ("x" if row.get("vs_ours") is not None else ""),
        _num(row.get("d_loss"), ".1e"),
        _num(d_second, ".1e"),
        "ok" if row.get("within_tol") else "> tol",
        note,
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
        lines.append(f"== {case} (baseline: {group[0].get('baseline') or '-'})")
        for c in cells:
            lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
    return "\n".join(lines)


def short_table(rows: List[Dict]) -> str:
    """A compact view: case, provider, ms, % floor, vs ours, ok (or why the row has no time)."""
    lines = [f"{'case':<44} {'provider':<16} {'ms':>9} {'%floor':>7} {'vs ours':>8}  ok"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['case'][:44]:<44} {r['provider']:<16} {r['status']}: {r['reason'][:60]}")
            continue
        vs = f"{r['vs_ours']:.2f}x" if r.get("vs_ours") is not None else "-"
        lines.append(f"{r['case'][:44]:<44} {r['provider']:<16} {r['ms']:>9.3f} {_num(r.get('pct_floor'), '.1f'):>7} "
                     f"{vs:>8}  {'ok' if r.get('within_tol') else '> tol'}")
    return "\n".join(lines)


def header_lines(result: Dict) -> List[str]:
    env, floor = result["environment"], result["floor"]
    lines = [
        f"device: {env['device']}  load {env.get('load_average_1min', '-')}  torch {env['torch']}  "
        f"triton {env.get('triton')}  liger-kernel {env.get('liger_kernel')}  "
        f"cut-cross-entropy {env.get('cut_cross_entropy')}",
        f"floor: copy {floor['copy_bytes_per_s'] / 1e12:.3g} TB/s (bytes read + written), {floor['matmul_dtype']} "
        f"matmul {floor['matmul_shape']}^3 {floor['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s",
    ]
    lines += result.get("notes", [])
    return lines


def legend() -> List[str]:
    return [
        "ms: median forward+backward time (forward only for *-fwd and advantages); fwd ms: the loss "
        "forward alone; extra GiB: peak memory over the inputs, outputs and gradients included (GPU only);",
        "TB/s | TFLOP/s: against the byte/FLOP model of the case (lens_kernels/bench/cases.py); % floor: of "
        "the measured copy bandwidth or matmul throughput;",
        "vs ours: time / time of our fastest backend (> 1: ours is faster); d loss: |loss - baseline|; "
        "d grad|out: max |grad - baseline| / max |baseline grad|, or max |logp - baseline| over kept tokens;",
        "ok: within the per-dtype tolerance of lens_kernels/bench/runner.py; > tol: outside it (eager bf16 "
        "takes log_softmax in bf16 and lands near 5% on the gradients; a NaN is never ok).",
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
                ax_m.text(0.5, 0.5, "no memory figures (measured on GPU only)", ha="center",
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
