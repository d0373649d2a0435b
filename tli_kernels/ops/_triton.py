"""What every op file shares: the Triton import shim, the Triton-or-reference decision and launch sizes.

Nothing here touches CUDA at import time. The decision is made per call, from the tensors and the
kernel object: a CUDA tensor runs the compiled kernel; a CPU tensor runs it only when Triton built the
kernel for its interpreter (TRITON_INTERPRET=1 set before the op module was imported); anything else
runs the plain PyTorch reference in `tli_kernels.reference`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

try:  # Triton is a Linux-only dependency; the reference path keeps everything else working.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

_BACKENDS = ("auto", "triton", "reference")
_backend = "auto"


def jit(fn):
    """`triton.jit` when Triton is installed; otherwise the function is kept (and never launched)."""
    return triton.jit(fn) if triton is not None else fn


def set_ops_backend(name: str) -> None:
    """Choose how the tli ops run: "auto" (Triton where it can run, else reference), "triton" (always,
    an error where it cannot run) or "reference" (plain PyTorch everywhere)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"ops backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_ops_backend() -> str:
    return _backend


@contextlib.contextmanager
def ops_backend(name: str) -> Iterator[None]:
    """Context manager form of `set_ops_backend`; restores the previous choice on exit."""
    previous = _backend
    set_ops_backend(name)
    try:
        yield
    finally:
        set_ops_backend(previous)


def _interpreted(kernel) -> bool:
    # Triton decides compiled vs interpreted when the kernel is decorated; ask the kernel, not the env.
    return type(kernel).__name__ == "InterpretedFunction"


def use_triton(kernel, x: torch.Tensor) -> bool:
    """Whether `kernel` should run on `x`'s device now (see the module docstring)."""
    if _backend == "reference":
        return False
    runnable = triton is not None and (x.device.type == "cuda" or (x.device.type == "cpu" and _interpreted(kernel)))
    if _backend == "triton" and not runnable:
        raise RuntimeError(
            f"ops backend 'triton' was forced but the kernel cannot run on a {x.device.type} tensor "
            f"(triton installed: {triton is not None}; on CPU set TRITON_INTERPRET=1 before importing "
            "tli_kernels.ops)"
        )
    return runnable


def block_size(n: int) -> int:
    """Smallest power of two holding one row of `n` elements."""
    return triton.next_power_of_2(n)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_warps_for(block: int) -> int:
    """Warps for a row-wise kernel: enough threads that each holds a handful of elements."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_programs(x: torch.Tensor, rows: int) -> int:
    """Programs for kernels that reduce over rows (norm backward's dw): a few per SM on a GPU, a
    handful under the interpreter, never more than there are rows."""
    if x.device.type == "cuda":
        target = 4 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(rows, target))
