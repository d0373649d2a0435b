"""A tiny timing helper shared by benchmark scripts: median of many timed runs after a warm-up.

On CUDA each run is bracketed by its own pair of CUDA events (the GPU's clock, not the host's), so
launch overhead between runs is not counted; on CPU it is perf_counter around a call. `setup` runs
before each timed call and is not timed (zeroing grads, rebuilding a graph to backward through).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_fn(
    fn: Callable[[], object],
    *,
    device: torch.device,
    warmup: int = 5,
    reps: int = 20,
    setup: Callable[[], object] | None = None,
) -> dict:
    """Milliseconds per call of `fn`: median, 20th/80th percentile, min, and the number of reps."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            if setup is not None:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "p20_ms": samples[int(0.2 * (len(samples) - 1))],
        "p80_ms": samples[int(0.8 * (len(samples) - 1))],
        "min_ms": samples[0],
        "reps": len(samples),
    }


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call of `fn`, above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
