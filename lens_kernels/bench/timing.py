"""Timing, peak memory and the floor (copy bandwidth, matmul throughput), measured in the same run.

GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run), CUDA events as a
fallback; peak memory from the caching allocator (``torch.cuda.max_memory_allocated`` over what was
allocated before the call). CPU: ``time.perf_counter`` after a warm-up; peak memory as the growth of
the process's resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus
``VmRSS`` before the call, with glibc's free memory returned first and its mmap threshold fixed so
that every large tensor is mapped and unmapped on its own).
"""
from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TIMER_CUDA = "triton.testing.do_bench (CUDA events, L2 flushed before each run)"
TIMER_CUDA_EVENTS = "CUDA events (no L2 flush)"
TIMER_CPU = "time.perf_counter"


def timer_name(device: torch.device) -> str:
    if device.type != "cuda":
        return TIMER_CPU
    try:
        import triton.testing  # noqa: F401

        return TIMER_CUDA
    except ImportError:
        return TIMER_CUDA_EVENTS


def measure(fn: Callable, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Dict[str, float]:
    """Times of ``fn()`` in ms: median, repetition count, min, max and the quartiles."""
    if device.type == "cuda":
        try:
            import triton.testing

            times = list(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))
        except ImportError:
            times = _cuda_events_ms(fn, warmup_ms, rep_ms)
    else:
        times = _cpu_ms(fn, warmup_ms, rep_ms)
    return summarize(times)


def summarize(times: List[float]) -> Dict[str, float]:
    ordered = sorted(times)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return dict(ms=statistics.median(ordered), reps=len(ordered), min=ordered[0], max=ordered[-1], q25=q[0], q75=q[2])


def median_ms(fn: Callable, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """The median time of ``fn()`` in milliseconds."""
    return measure(fn, device, warmup_ms, rep_ms)["ms"]


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
    return times


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
    return times


MEMORY_CUDA = "allocator: torch.cuda.max_memory_allocated minus memory_allocated before the call"
MEMORY_CPU = "resident set growth: VmHWM (reset by /proc/self/clear_refs) minus VmRSS before the call"


def output_bytes(out) -> int:
    """Bytes of the tensors ``fn()`` returned (gradients included), each storage once."""
    seen, total = set(), 0

    def visit(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)

    visit(out)
    return total


def peak_memory(fn: Callable, device: torch.device) -> Dict[str, object]:
    """Peak memory of one ``fn()`` over what was held before it (the inputs), in bytes, and the bytes
    of what it returned. The outputs count in ``extra_bytes``: they are memory the op needs;
    ``work_bytes`` = extra - outputs is its working memory. None where it cannot be measured."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - base
        method = MEMORY_CUDA
    else:
        if not _rss_supported():
            return dict(extra_bytes=None, output_bytes=None, work_bytes=None, method="n/a (no /proc/self/clear_refs)")
        gc.collect()
        _malloc_trim()
        base = _rss_kib("VmRSS")
        _reset_hwm()
        out = fn()
        extra = (_rss_kib("VmHWM") - base) * 1024
        method = MEMORY_CPU
    outputs = output_bytes(out)
    del out
    return dict(extra_bytes=extra, output_bytes=outputs, work_bytes=extra - outputs, method=method)


def extra_peak_gib(fn: Callable, device: torch.device) -> Optional[float]:
    """Peak memory of one ``fn()`` over the inputs, in GiB (see ``peak_memory``)."""
    extra = peak_memory(fn, device)["extra_bytes"]
    return None if extra is None else extra / 2**30


_LIBC = None
_RSS_OK = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            # Fix the mmap threshold at 128 KiB: glibc otherwise raises it after each large free, and
            # later large tensors would reuse resident heap memory that the measurement cannot see.
            _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        except OSError:
            _LIBC = False
    return _LIBC


def _malloc_trim() -> None:
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one


def _rss_supported() -> bool:
    global _RSS_OK
    if _RSS_OK is None:
        try:
            _libc()
            _reset_hwm()
            _RSS_OK = _rss_kib("VmHWM") > 0
        except (OSError, AttributeError, ValueError):
            _RSS_OK = False
    return _RSS_OK


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
