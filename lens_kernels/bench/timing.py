"""Timing, peak memory and the floor (copy bandwidth, matmul throughput), measured in the same run.

GPU: ``triton.testing.do_bench`` medians (it flushes L2 between runs), CUDA events as a fallback,
``torch.cuda.max_memory_allocated`` over the memory held before the call. CPU: ``time.perf_counter``
medians after a warm-up; no memory figure.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """The median time of ``fn()`` in milliseconds."""
    if device.type == "cuda":
        try:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except ImportError:
            return _cuda_events_ms(fn, warmup_ms, rep_ms)
    return _cpu_ms(fn, warmup_ms, rep_ms)


def _cuda_events_ms(fn, warmup_ms, rep_ms):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / estimate))):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cpu_ms(fn, warmup_ms, rep_ms):
    # Warm up for warmup_ms (at least once), then time for rep_ms (at least 3 runs, at most 200).
    deadline = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < deadline:
        fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def extra_peak_gib(fn: Callable, device: torch.device) -> Optional[float]:
    """Peak memory of one ``fn()`` over what was allocated before it (inputs), in GiB; None on CPU.
    The outputs (gradients included) count: they are memory the op needs."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 2**30


def measure_floor(device: torch.device, quick: bool = False) -> Dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and matmul throughput on this device.

    GPU: a 1 GiB bf16 device-to-device copy and an 8192^3 bf16 matmul on random data. CPU: a
    64 MiB fp32 copy and a 1024^3 fp32 matmul (the CPU cases run in fp32).
    """
    if device.type == "cuda":
        copy_elems, mm, mm_dtype = (2**29 if not quick else 2**28), 8192, torch.bfloat16
        warm, rep = 25.0, 100.0
    else:
        copy_elems, mm, mm_dtype = 2**24, 1024, torch.float32
        warm, rep = 20.0, 200.0
    src = torch.randn(copy_elems, device=device, dtype=mm_dtype)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, warm, rep)
    copy_bytes = 2.0 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    b = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    mm_ms = median_ms(lambda: a @ b, device, warm, rep)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "copy_bytes_per_s": copy_bytes / (copy_ms / 1e3),
        "copy_bytes": copy_bytes,
        "copy_ms": copy_ms,
        "matmul_flops_per_s": 2.0 * mm**3 / (mm_ms / 1e3),
        "matmul_shape": mm,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "matmul_ms": mm_ms,
    }
