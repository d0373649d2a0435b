"""What every op file shares: the Triton import shim, the Triton-or-reference decision, the eager-or-
custom-op dispatch, the device guard and launch sizes.

Nothing here touches CUDA at import time. The decision is made per call, from the tensors and the
kernel object: a CUDA tensor runs the compiled kernel; a CPU tensor runs it only when Triton built the
kernel for its interpreter (TRITON_INTERPRET=1 set before the op module was imported); anything else
runs the plain PyTorch reference in `tli_kernels.reference`. A kernel built for the interpreter is
refused on a CUDA tensor: it would run on the host, slowly, and not test the compiled code.

Dispatch. Each op is a `torch.library` custom op, which is what `torch.compile` needs (an opaque node
with a fake implementation instead of a graph break). In eager mode the dispatcher round trip of a
custom op costs several times an `autograd.Function` call (benchmarks/bench_dispatch.py: 10-16 us
against 6 us on the development CPU, more on a busy host), which is most of the cost of a one-token
decode step. So the public functions call the custom ops only while `torch.compile` traces them, and
otherwise an `autograd.Function` when a gradient is needed, or the implementation directly when not.
"""

from __future__ import annotations

import contextlib
import functools
import os
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
_force_custom_ops = False


def jit(fn):
    """`triton.jit` when Triton is installed; otherwise the function is kept (and never launched)."""
    return triton.jit(fn) if triton is not None else fn


# ------------------------------------------------------------------------- Triton's interpreter
def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _patch_interpreter_loop_bounds() -> bool:
    """Triton <= 3.6's interpreter reads a runtime loop bound (`range(start, n)` with n a kernel
    argument) as int(ndarray of shape (1,)), which numpy >= 2.4 refuses ("only 0-dimensional arrays
    can be converted to Python scalars"): every kernel with a loop failed there. Later Triton reads
    `int(data.squeeze())`; do the same. Applied only to the interpreter (compiled kernels never see it),
    and it only adds a second `__index__` to the interpreter's per-launch patch scope, restored with it."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_tli_loop_bounds", False):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._tli_loop_bounds = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


if triton is not None and _interpreter_requested():
    _patch_interpreter_loop_bounds()


# ------------------------------------------------------------------------------- ops backend
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
    device = x.device.type
    interpreted = _interpreted(kernel)
    if device == "cuda" and interpreted:
        raise RuntimeError(
            "tli_kernels: TRITON_INTERPRET=1 was set when tli_kernels.ops was imported, so its kernels were "
            "built for Triton's CPU interpreter and cannot run on CUDA tensors as compiled code; unset "
            "TRITON_INTERPRET on a GPU machine"
        )
    runnable = triton is not None and (device == "cuda" or (device == "cpu" and interpreted))
    if _backend == "triton" and not runnable:
        raise RuntimeError(
            f"ops backend 'triton' was forced but the kernel cannot run on a {device} tensor "
            f"(triton installed: {triton is not None}; on CPU set TRITON_INTERPRET=1 before importing "
            "tli_kernels.ops)"
        )
    return runnable


# ------------------------------------------------------------------- eager vs custom-op dispatch
def use_custom_op() -> bool:
    """True while torch.compile traces (it needs the custom ops), or when `custom_op_dispatch` forces them."""
    return _force_custom_ops or torch.compiler.is_compiling()


@contextlib.contextmanager
def custom_op_dispatch() -> Iterator[None]:
    """Route every eager call through the torch.library custom ops, as torch.compile sees them (for
    comparisons: benchmarks/bench_dispatch.py, and tests that the two paths agree)."""
    global _force_custom_ops
    previous = _force_custom_ops
    _force_custom_ops = True
    try:
        yield
    finally:
        _force_custom_ops = previous


CUSTOM_OP, AUTOGRAD, KERNEL, REFERENCE = "custom_op", "autograd", "kernel", "reference"


def route(kernel, x: torch.Tensor, *tensors: torch.Tensor | None) -> str:
    """How a public op runs this call, decided once: CUSTOM_OP (torch.compile is tracing), AUTOGRAD (an
    input needs a gradient: the autograd.Function), KERNEL or REFERENCE (no grad: the implementation
    directly). Written out flat: it runs on every op of every decode step."""
    if _force_custom_ops or torch.compiler.is_compiling():
        return CUSTOM_OP
    if torch.is_grad_enabled():
        if x.requires_grad:
            return AUTOGRAD
        for t in tensors:
            if t is not None and t.requires_grad:
                return AUTOGRAD
    if _backend == "reference":
        return REFERENCE
    if _backend == "auto" and x.device.type == "cpu" and type(kernel).__name__ != "InterpretedFunction":
        return REFERENCE  # the CPU without the interpreter (use_triton's answer, without the call)
    return KERNEL if use_triton(kernel, x) else REFERENCE


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must record an op on these inputs (a plain loop: this runs on every call)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


# ------------------------------------------------------------------------------ device guard
@functools.lru_cache(maxsize=1)
def _cuda_device_count() -> int:
    return torch.cuda.device_count()


def device_guard(x: torch.Tensor):
    """The device `x` lives on made current for a launch: Triton launches on the current device and
    its current stream, so a tensor on cuda:1 (e.g. `device_map="auto"`) needs it. A no-op on CPU and
    on a one-GPU machine, where it would only cost time."""
    if x.device.type != "cuda" or _cuda_device_count() < 2:
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


# ------------------------------------------------------------------------------ launch sizes
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


INTERPRETER_REDUCTION_PROGRAMS = 4  # several, so the tests exercise the cross-program sum


# Programs per SM of the row-reducing kernels (the norms' backward). Each walks its rows one at a time
# with a row-wide sum between its loads and its stores, so one program per SM leaves few bytes in
# flight: on an H200 (2026-12-04, benchmarks/tune_norm_backward.py, 8192 rows, bf16) one per SM with
# 16-32 warps ran at 1.3-1.9 TB/s; two per SM with 8 warps each took the RMSNorm + add-RMSNorm
# backward pair from 249 to 223 us at n = 4096 and from 192 to 144 us at n = 2048, the best or within
# 1% of the best of 9 launches at both widths. Each program adds one float32 row of dw partials (16 KB
# at n = 4096), noise beside the 190-320 MB the kernels move.
PROGRAMS_PER_SM = 2


def reduction_programs(x: torch.Tensor, rows: int) -> int:
    """Programs for kernels that reduce over rows (the norms' dw): PROGRAMS_PER_SM per SM on a GPU (each
    writes an fp32 row of partial sums that a second pass adds up), a few under the interpreter, never
    more than there are rows."""
    if x.device.type == "cuda":
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        target = PROGRAMS_PER_SM * _sm_count(index)
    else:
        target = INTERPRETER_REDUCTION_PROGRAMS
    return max(1, min(rows, target))
