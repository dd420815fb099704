#!/usr/bin/env python3
"""Instructions per element of the vocab loop of a kernel, from its SASS (``cuobjdump -sass``).

    python3 csrc/test/sass_loop_stats.py CUBIN KERNEL_SUBSTRING ELEMENTS_PER_ITERATION [--cuobjdump PATH]

The vocab loop is the innermost backward branch whose body holds the most 16-byte loads
(LDG.E.128 / LDS.128): the unrolled main loop of ``for_each_vector``. Reported: static instructions
in the loop (NOPs excluded) per element, the count on the path that skips every forward
conditional branch's block inside the loop (the common path of a branchy online softmax: no new
maximum), and the BRA / BSSY / MUFU.EX2 / FSETP counts. A static read, not a profile: it says how
many instructions the SM must issue per element, not how long they take.
"""
import argparse
import re
import shutil
import subprocess
import sys

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_of(cubin, kernel, cuobjdump):
    out = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    funcs, cur = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = LINE.search(line)
        if cur and m:
            funcs[cur].append((int(m.group(1), 16), m.group(2)))
    names = [n for n in funcs if kernel in n]
    if len(names) != 1:
        sys.exit(f"sass_loop_stats: {len(names)} kernels match {kernel!r}: {names or sorted(funcs)}")
    return names[0], funcs[names[0]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cubin")
    ap.add_argument("kernel")
    ap.add_argument("elements", type=int, help="elements per iteration of the loop (kUnroll * 16 / sizeof(T))")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    args = ap.parse_args()
    name, ins = sass_of(args.cubin, args.kernel, args.cuobjdump)
    loops = []
    for addr, text in ins:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            lo, hi = int(m.group(1), 16), addr
            body = [(a, t) for a, t in ins if lo <= a <= hi]
            vec = sum(bool(re.search(r"\b(LDG|LDS)\S*\.128\b", t)) for _, t in body)
            loops.append((vec, -(hi - lo), lo, hi, body))
    if not loops:
        sys.exit("sass_loop_stats: no loop")
    # innermost loops (no other loop inside) with at least 4 vector loads: the unrolled main loops of
    # the sweeps (pass 1, then pass 2 in the fused kernels), in address order
    inner = [L for L in loops if L[0] >= 4 and not any(o is not L and L[2] <= o[2] and o[3] <= L[3] for o in loops)]
    for vec, _, lo, hi, body in sorted(inner, key=lambda L: L[2]):
        body = [(a, t) for a, t in body if not t.startswith("NOP")]
        skipped = set()
        for a, t in body:
            m = re.search(r"^@!?U?P\d+\s+BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", t)
            if m and a < int(m.group(1), 16) <= hi:
                skipped.update(x for x, _ in body if a < x < int(m.group(1), 16))
        common = sum(1 for a, _ in body if a not in skipped)
        count = lambda pat: sum(bool(re.search(pat, t)) for _, t in body)  # noqa: E731
        stores = count(r"(STG|STS)\S*\.128")
        print(f"{short(name)} loop 0x{lo:x}-0x{hi:x}: {vec} vector loads, {stores} vector "
              f"stores, {len(body)} instructions ({len(body) / args.elements:.2f}/element), common path {common} "
              f"({common / args.elements:.2f}/element); BRA {count(r'BRA')}, BSSY {count(r'BSSY')}, "
              f"MUFU.EX2 {count(r'MUFU.EX2')}, FSETP {count(r'FSETP')}, FMNMX {count(r'FMNMX')}")


def short(name):
    return re.sub(r"^_ZN4lens\d+", "", name).split("EEv")[0]


if __name__ == "__main__":
    main()
