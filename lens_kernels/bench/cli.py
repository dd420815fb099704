"""``lens-bench``: our loss heads against the peers, side by side, in one run on one device.

    lens-bench --quick                 # GPU: headline + a small grid; CPU: small shapes, torch providers
    lens-bench --headline              # the headline shape only (N=16384, V=151936, H=2048, bf16)
    lens-bench --paths logits,hidden --exclude compile --out results/
    lens-bench --shape 8x256x32000 --dtype float32 --providers ours-torch,eager,compile   # your own shape
    lens-bench --shape 16x1024x151936x2048 --paths hidden                             # BxTxV[xH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .cases import DTYPES, PATHS, cpu_cases, grid_cases, headline_cases, parse_shape, user_cases, with_dtype
from .providers import providers_for
from .report import (format_table, header_lines, legend, matplotlib_missing, short_table, write_json, write_markdown,
                     write_plots)
from .runner import apply_floor, environment, gpu_state, run_all
from .timing import MEMORY_CPU, MEMORY_CUDA, measure_floor, timer_name

CPU_NOTE = ("CPU mode: small shapes (and, without --quick or --headline, the logits loss at 8x256x32000 and "
            "4x512x151936 fp32), "
            "torch providers only (ours-torch, eager, compile); Liger and CCE are Triton GPU kernels and are "
            "measured on a CUDA GPU only. CPU times say nothing about GPU speed.")
# On CPU torch.compile builds C++ per case: about 15 s unloaded and about 60 s cold on a loaded 2-core
# machine for the first one. --quick keeps it to the logits paths.
CPU_QUICK_COMPILE_PATHS = ("logits", "logits-fwd")
CPU_QUICK_NOTE = ("--quick on CPU: the compile row runs on the logits paths only (its C++ compile costs "
                  "tens of seconds per case here); drop --quick to compile every case.")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lens-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small grid (GPU: headline + a few shapes)")
    size.add_argument("--headline", action="store_true",
                      help="the headline case only (GPU); on CPU the small cases of every path")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers to run (ours = all our backends; eager, compile, liger, cce)")
    p.add_argument("--exclude", default=None, help="comma-separated providers to leave out")
    p.add_argument("--grid-exclude", default=None,
                   help="providers to leave out of the grid cases only (e.g. compile, whose compile time "
                        "is paid per shape)")
    p.add_argument("--shape", default=None, metavar="BxTxV[xH]",
                   help="measure this shape only (every path in --paths it has the sizes for; hidden needs H)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="input dtype of every case (default: each case's own; --shape: bfloat16 on GPU, float32 "
                        "on CPU)")
    p.add_argument("--rounds", type=int, default=3,
                   help="timing rounds per case, the provider order rotated each round (at least 1; default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up per measurement")
    p.add_argument("--rep-ms", type=float, default=None, help="timed repetitions per measurement")
    p.add_argument("--out", default="lens_bench_out", help="folder for the JSON, markdown and plots")
    p.add_argument("--no-files", action="store_true", help="print the table only")
    p.add_argument("--summary", metavar="JSON", nargs="+", default=None,
                   help="print a short table of each JSON written by an earlier run, and exit")
    return p.parse_args(argv)


def _split(value: Optional[str]) -> Optional[List[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def select_cases(args, device: torch.device):
    paths = set(_split(args.paths) or PATHS)
    unknown = paths - set(PATHS)
    if unknown:
        raise SystemExit(f"lens-bench: --paths must be among {list(PATHS)}, got {sorted(unknown)}")
    if args.shape:
        try:
            shape = parse_shape(args.shape)
        except ValueError as exc:
            raise SystemExit(f"lens-bench: --shape: {exc}") from None
        dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        main = user_cases(shape, dtype, [p for p in PATHS if p in paths])
        if not main:
            raise SystemExit(f"lens-bench: no case of {sorted(paths)} at --shape {args.shape} (hidden paths need H)")
        return main, []
    if device.type != "cuda":
        # --headline on CPU: the small cases of every path (the headline itself is a GPU shape).
        cases = cpu_cases(quick=args.quick, real_vocabs=not args.headline)
        if args.quick:  # the grid's providers (no compile) run the rest
            main = [c for c in cases if c.path in CPU_QUICK_COMPILE_PATHS]
            grid = [c for c in cases if c.path not in CPU_QUICK_COMPILE_PATHS]
        else:
            main, grid = cases, []
    elif args.headline:
        main, grid = headline_cases(), []
    else:
        main, grid = headline_cases(), grid_cases(quick=args.quick)
    keep = lambda cases: with_dtype([c for c in cases if c.path in paths], args.dtype)  # noqa: E731
    return keep(main), keep(grid)


def _write_files(result: Dict, out: Path, stem: str, with_plots: bool) -> List[str]:
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(result["rows"], out, stem) if with_plots else []
    write_json(result, out / f"{stem}.json")
    write_markdown(result, out / f"{stem}.md", plots)
    return plots


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.summary:
        for name in args.summary:
            result = json.loads(Path(name).read_text())
            print(f"--- {Path(name).name}" + ("" if result.get("complete") else " (incomplete: the run was cut short)"))
            print("\n".join(header_lines(result)))
            print(short_table(result["rows"]))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lens-bench: --device cuda but torch sees no CUDA GPU")
    notes = []
    grid_exclude = _split(args.grid_exclude) or []
    if device.type != "cuda":
        notes.append(CPU_NOTE)
        if args.quick:
            notes.append(CPU_QUICK_NOTE)
            grid_exclude.append("compile")
    warmup = args.warmup_ms if args.warmup_ms is not None else (25.0 if device.type == "cuda" else 10.0)
    rep = args.rep_ms if args.rep_ms is not None else (100.0 if device.type == "cuda" else 60.0)
    if args.rounds < 1:
        raise SystemExit("lens-bench: --rounds must be at least 1")
    main_cases, grid = select_cases(args, device)
    providers = providers_for(device, _split(args.providers), _split(args.exclude))
    grid_providers = providers_for(device, _split(args.providers), (_split(args.exclude) or []) + grid_exclude)
    for line in notes:
        print(line)
    print(f"lens-bench on {device}: {len(main_cases) + len(grid)} cases, providers "
          f"{', '.join(p.name for p in providers)}", flush=True)

    start = time.perf_counter()
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "date": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": "lens-bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(device),
        "floor": measure_floor(device, quick=args.quick),
        "seed": args.seed,
        "timer": timer_name(device),
        "rounds": args.rounds,
        "warmup_ms": warmup,
        "rep_ms": rep,
        "memory_method": MEMORY_CUDA if device.type == "cuda" else MEMORY_CPU,
        "notes": notes,
        "complete": False,
        "rows": [],
    }
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["environment"]["device"]).strip("-")
    stem = f"lens-bench_{now.strftime('%Y-%m-%d_%H%M%S')}_{slug}"
    if args.paths != ",".join(PATHS):  # runs of one script, seconds apart, never share a file name
        stem += "_" + "-".join(sorted(_split(args.paths) or []))[:60]
    out = Path(args.out)

    def after_case(case_rows):
        apply_floor(case_rows, result["floor"])
        result["rows"] += case_rows
        result["wall_s"] = time.perf_counter() - start
        if not args.no_files:  # partial results survive a run cut short
            _write_files(result, out, stem, with_plots=False)

    log = lambda line: print(line, flush=True)  # noqa: E731
    run_all(main_cases, providers, device, warmup, rep, log, after_case, rounds=args.rounds, seed=args.seed)
    run_all(grid, grid_providers, device, warmup, rep, log, after_case, rounds=args.rounds, seed=args.seed)
    result["environment"]["gpu_state_end"] = gpu_state(device)
    result["complete"] = True
    result["wall_s"] = time.perf_counter() - start
    print()
    print("\n".join(header_lines(result)))
    print(format_table(result["rows"]))
    print("\n".join(legend()))
    if not args.no_files:
        missing = matplotlib_missing()
        if missing:
            print(missing)
        plots = _write_files(result, out, stem, with_plots=missing is None)
        print(f"wrote {out / stem}.json, .md" + (f" and {len(plots)} plots" if plots else ""))
    print(f"lens-bench: {result['wall_s']:.1f} s")
    return 0
