#!/usr/bin/env python3
"""Registers and spills per kernel from ``nvcc -Xptxas -v`` output (stdin or files), one line each.

    python3 csrc/test/ptxas_report.py [--fail-on-spill REGEX] [LOG ...]

Exit status 1 when a kernel whose demangled-enough name matches REGEX spills (spill stores or loads
above 0 bytes); the vocab-loop kernels must not spill: a spill there is a local-memory round trip
per element. Kernels are grouped by (name, arch); names are shortened from their mangled form.
"""
import argparse
import re
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")


def short(mangled: str) -> str:
    """_ZN4lens21fused_loss_row_kernelI13__nv_bfloat16Li512ELb0EEEv... -> fused_loss_row_kernel<bf16,512,0>."""
    m = re.match(r"_ZN4lens(\d+)", mangled)
    if not m:
        return mangled
    n = int(m.group(1))
    start = m.end()
    name = mangled[start:start + n]
    rest = mangled[start + n:]
    targs = []
    for tm in re.finditer(r"I(13__nv_bfloat16|6__half|f)|Li(\d+)E|Lb([01])E", rest):
        t = tm.group(1)
        targs.append({"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}[t] if t else tm.group(2) or tm.group(3))
    return name + (f"<{','.join(targs)}>" if targs else "")


def parse(text: str):
    rows, cur = [], None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = {"kernel": short(m.group(1)), "mangled": m.group(1), "arch": m.group(2), "regs": None,
                   "stack": 0, "spill_st": 0, "spill_ld": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = SPILL.search(line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", nargs="*")
    ap.add_argument("--fail-on-spill", default=None, help="regex of kernel names that must not spill")
    args = ap.parse_args()
    text = "".join(open(p).read() for p in args.logs) if args.logs else sys.stdin.read()
    rows = parse(text)
    if not rows:
        print("ptxas_report: no 'Compiling entry function' lines: was -Xptxas -v passed?", file=sys.stderr)
        return 1
    bad = []
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
        spills = r["spill_st"] + r["spill_ld"]
        print(f"{r['arch']:7s} {r['kernel']:48s} {r['regs'] if r['regs'] is not None else '?':>4} regs  "
              f"spill st/ld {r['spill_st']}/{r['spill_ld']} B  stack {r['stack']} B")
        if args.fail_on_spill and spills and re.search(args.fail_on_spill, r["kernel"]):
            bad.append(f"{r['arch']} {r['kernel']}")
    if bad:
        print("ptxas_report: spills in vocab-loop kernels: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
