"""CPU timing of the loss head from logits, fwd+bwd: eager TRL-style, torch.compile of it, and the
lens_kernels torch backend. Each (shape, dtype, provider) runs in its own subprocess; its peak memory is
the growth of the kernel's peak resident set (VmHWM, reset after the inputs are made) over the
resident set with the inputs: what the step allocates at its peak, the gradient included.

    python benchmarks/cpu_torch_backend.py --shape 8x256x32000 --dtype fp32 [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def child(shape, dtype, provider, reps, temperature):
    import torch

    import lens_kernels as lk
    from lens_kernels.bench.providers import eager_logits_loss

    torch.manual_seed(0)
    B, T, V = shape
    dt = getattr(torch, DTYPES[dtype])
    logits = (torch.randn(B, T + 1, V) * 2).to(dt).requires_grad_(True)
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.1
    adv = torch.randn(B)
    old = -torch.rand(B, T) * 3
    if provider.startswith("ours"):
        def step():
            loss, _ = lk.policy_loss_from_logits(logits[:, :-1], targets, mask, adv, old_logps=old,
                                                 temperature=temperature, backend="torch")
            loss.backward()
    else:
        fn = eager_logits_loss if provider == "eager" else torch.compile(eager_logits_loss, dynamic=False)

        def step():  # TRL slices the model's output, as ours does: the same [B, T, V] view for both
            fn(logits[:, :-1], targets, old, adv, mask, temperature).backward()
    base = reset_peak()
    step()  # warm-up (compiles)
    logits.grad = None
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        logits.grad = None
    peak = status_kib("VmHWM") - base
    return {"ms": 1e3 * statistics.median(times), "peak_mib": peak / 1024}


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak():
    """Resets the kernel's peak resident set (VmHWM) to the current one and returns it (KiB): the
    inputs are then the baseline, and the peak growth counts what the step allocates."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", action="append", default=[])
    p.add_argument("--dtype", action="append", default=[])
    p.add_argument("--provider", action="append", default=[])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--before", default=None, help="a checkout of lens_kernels to time as 'ours_before'")
    p.add_argument("--child", action="store_true")
    a = p.parse_args()
    shapes = a.shape or ["8x256x32000", "4x512x151936"]
    dtypes = a.dtype or ["fp32", "bf16"]
    providers = a.provider or (["eager", "compile", "ours"] + (["ours_before"] if a.before else []))
    if a.child:
        shape = tuple(int(x) for x in shapes[0].split("x"))
        print(json.dumps(child(shape, dtypes[0], providers[0], a.reps, a.temperature)))
        return
    print("| shape | dtype | eager ms | compile ms | ours ms | eager / ours | ours / compile | "
          "peak MiB eager / compile / ours |" + (" ours before ms | peak MiB before |" if a.before else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if a.before else ""))
    for s in shapes:
        for d in dtypes:
            res = {}
            for prov in providers:
                # glibc serves large buffers by mmap, so a freed buffer leaves the resident set at once
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
                if prov == "ours_before":
                    env["PYTHONPATH"] = a.before
                out = subprocess.run([sys.executable, __file__, "--child", "--shape", s, "--dtype", d, "--provider",
                                      prov, "--reps", str(a.reps), "--temperature", str(a.temperature)],
                                     capture_output=True, text=True, env=env)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    res[prov] = {"ms": float("nan"), "peak_mib": float("nan")}
                else:
                    res[prov] = json.loads(out.stdout.strip().splitlines()[-1])
            g = lambda k, f: res.get(k, {}).get(f, float("nan"))  # noqa: E731
            print(f"| {s} | {d} | {g('eager', 'ms'):.0f} | {g('compile', 'ms'):.0f} | {g('ours', 'ms'):.0f} | "
                  f"{g('eager', 'ms') / g('ours', 'ms'):.2f}x | {g('ours', 'ms') / g('compile', 'ms'):.2f} | "
                  f"{g('eager', 'peak_mib'):.0f} / {g('compile', 'peak_mib'):.0f} / {g('ours', 'peak_mib'):.0f} |"
                  + (f" {g('ours_before', 'ms'):.0f} | {g('ours_before', 'peak_mib'):.0f} |" if a.before else ""),
                  flush=True)


if __name__ == "__main__":
    main()
