"""Measure the error of the CPU providers against the float64 reference on the bench's own inputs, to
set the tolerances of ``lens_kernels/bench/runner.py`` (TOLERANCES) from data:

    python benchmarks/measure_tolerances.py [--seeds 5]

For each tolerance family (ours, eager) and dtype it prints the largest |d loss|, relative d grad,
|d logp| and |d clip| over the cases and seeds. The GPU families (liger, cce) need a GPU run.
"""
import argparse
import collections

import torch

from lens_kernels.bench import Case, compare, make_inputs
from lens_kernels.bench.providers import grad_leaves, providers_for
from lens_kernels.bench.runner import reference_outputs

CPU = torch.device("cpu")


def cases(dtype):
    return [Case("logits", B=4, T=128, V=2003, dtype=dtype), Case("logits-fwd", B=4, T=128, V=2003, dtype=dtype),
            Case("hidden", B=4, T=64, V=2003, H=64, dtype=dtype), Case("hidden-fwd", B=4, T=64, V=2003, H=64, dtype=dtype),
            Case("lens-step", B=4, T=64, V=2003, dtype=dtype, group_size=2)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    worst = collections.defaultdict(float)
    for dtype in ("float32", "bfloat16", "float16"):
        for case in cases(dtype):
            for seed in range(args.seeds):
                inp = make_inputs(case, CPU, seed=seed)
                inp.pop("stats")
                for leaf in grad_leaves(case, inp):
                    leaf.requires_grad_(True)
                base = reference_outputs(case, inp)
                for provider in providers_for(CPU, only=["ours-torch", "eager"]):
                    if case.path not in provider.paths:
                        continue
                    fn = provider.build(case, inp)
                    diffs = compare(case, fn(), base, inp["mask"], upstream=getattr(fn, "upstream", 1.0))
                    for k, v in diffs.items():
                        if k.startswith("d_"):
                            key = (provider.tolerance, dtype, "hidden" if case.path.startswith("hidden") else "logits", k)
                            worst[key] = max(worst[key], v)
    for (family, dtype, kind, k), v in sorted(worst.items()):
        print(f"{family:<8} {dtype:<9} {kind:<7} {k:<11} {v:.2e}")


if __name__ == "__main__":
    main()
