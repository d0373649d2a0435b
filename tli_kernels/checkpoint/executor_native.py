"""The native engine's Python half: resolve a SurgeryPlan into a job, run it in C++, poll it.

The C++ core (csrc/, docs/engine.md) knows nothing about models or JSON. This module resolves,
per output shard, the final path, the exact header bytes (OutShard.header_bytes()) and, per
tensor, its output offset, dtype and op with its sources as (file, absolute offset, dtype), then
hands that to `_native.Engine` and polls it: the work runs on C++ threads without the GIL, this
thread reads a byte counter for the progress bar and gets KeyboardInterrupt promptly (the poll
wakes every 0.1 s). Any failure, in any thread, stops the run and surfaces here as one
`EngineError` naming the file, the tensor and the errno; unfinished `.partial` files are removed
before it is raised. Output is byte-identical to executor_python (the reference).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tli_kernels.checkpoint import checksum as checksum_def
from tli_kernels.checkpoint.executor_python import overflow_message
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.outdir import OutputDir
from tli_kernels.checkpoint.plan import SurgeryPlan, validate_plan
from tli_kernels.checkpoint.safetensors_format import ARITHMETIC_DTYPES

try:
    from tli_kernels.checkpoint import _native
except ImportError as e:  # not built: pure-Python install, or no compiler at install time
    _native = None
    _IMPORT_ERROR = str(e)
else:
    _IMPORT_ERROR = ""

Progress = Callable[[int], None]

_DTYPE_CODES = {"BF16": 0, "F16": 1, "F32": 2}
_OTHER_DTYPE = 3
_FP8_CODES = {"F8_E4M3": 4, "F8_E5M2": 5}  # the weights of a dequant op only
_OP_CODES = {"bytecopy": 0, "cast": 1, "scale": 2, "average": 3, "zeros": 4, "fill": 5, "uniform": 6, "dequant": 7}
_MODE_WRITE, _MODE_VERIFY = 0, 1

# Per-thread buffer bounds: below 256 KiB the syscall count dominates; 1, 4 and 16 MiB measured
# alike for copies and casts on the benchmark machine, and more only grows RSS.
MIN_BUFFER = 256 << 10
MAX_BUFFER = 16 << 20
# In-kernel copies move this much per work item; it costs no user memory.
COPY_CHUNK = 64 << 20
POLL_SECONDS = 0.1
# Test hook: microseconds to sleep after every write chunk, so interrupt tests can stop a small
# job at a random point of a `tli upscale` subprocess. Never set it otherwise.
TEST_DELAY_ENV = "TLI_NATIVE_TEST_CHUNK_DELAY_US"


class EngineError(RuntimeError):
    """The native engine stopped. kind: 'source' (input at fault), 'output' (e.g. disk full), 'job'."""

    def __init__(self, message: str, path: str = "", tensor: str = "", errno: int = 0, kind: str = "job"):
        self.path, self.tensor, self.errno, self.kind, self.reason = path, tensor, errno, kind, message
        where = path
        if tensor:
            where = f"{where}: tensor {tensor!r}" if where else f"tensor {tensor!r}"
        super().__init__(f"{where}: {message}" if where else message)


def available() -> bool:
    """True when the C++ extension is built and importable."""
    return _native is not None


def unavailable_reason() -> str:
    return _IMPORT_ERROR or "built"


def _require() -> None:
    if _native is None:
        raise RuntimeError(
            "the native engine is not built in this install "
            f"({_IMPORT_ERROR}); reinstall with a C++17 compiler (pip install -e .) or use --engine python"
        )


def default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


@dataclass(frozen=True)
class MemoryPlan:
    """How --max-memory is spent: each of `threads` workers owns one buffer of `buffer_bytes`.

    Buffers get at most half the budget; the other half is headroom for the Python process
    itself (interpreter, plan, headers). In-kernel copies and the page cache use no buffer.
    """

    threads: int
    buffer_bytes: int

    @property
    def engine_bytes(self) -> int:
        return self.threads * self.buffer_bytes


def memory_plan(max_memory: int, threads: int | None = None) -> MemoryPlan:
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: must be at least 1")
    wanted = threads or default_threads()
    budget = max_memory // 2
    if budget < MIN_BUFFER:
        raise ValueError(
            f"--max-memory {max_memory} bytes is too small: the engine needs at least {2 * MIN_BUFFER >> 10} KiB "
            f"(one {MIN_BUFFER >> 10} KiB buffer per thread, within half the budget)"
        )
    n = min(wanted, budget // MIN_BUFFER)  # fewer threads rather than buffers below MIN_BUFFER
    per = min(MAX_BUFFER, budget // n)
    per -= per % 4096
    assert n * per <= budget, (n, per, budget)
    return MemoryPlan(threads=n, buffer_bytes=per)


def _dtype_code(dtype: str) -> int:
    return _DTYPE_CODES.get(dtype, _OTHER_DTYPE)


def build_job(
    plan: SurgeryPlan,
    layout: CheckpointLayout,
    dst: str,
    shards: Iterable[int],
    sidecar: Callable[[int], tuple[str, str]] | None = None,
) -> tuple[list[tuple], list[tuple]]:
    """The resolved job: (source files as (path, size, dev, ino, mtime_ns, ctime_ns), shards as the
    tuples csrc/bindings.cpp reads)."""
    validate_plan(plan, layout.tensors)
    dst = os.path.abspath(dst)
    # Each source with the identity its header was read with: the engine refuses any other file.
    files = [(h.path, h.size, *(h.stat[:2] if h.stat else (0, 0)), *(h.stat[3:] if h.stat else (0, 0)))
             for h in layout.files.values()]  # fmt: skip
    file_index = {f[0]: i for i, f in enumerate(files)}
    job = []
    for i in shards:
        shard = plan.shards[i]
        header = shard.header_bytes()
        pos = len(header)
        tensors = []
        for t in shard.tensors:
            op = t.op
            srcs = [layout.tensors[s] for s in op.src]
            kind = op.kind
            if kind == "copy":
                kind = "bytecopy" if srcs[0].dtype == t.dtype else "cast"
            grid = (0, 0, 0)
            if kind == "dequant":
                grid = (t.shape[1], *op.block)
            elif kind not in ("bytecopy", "zeros"):
                assert t.dtype in ARITHMETIC_DTYPES and all(s.dtype in ARITHMETIC_DTYPES for s in srcs), t.name
            if kind == "bytecopy":
                assert srcs[0].nbytes == t.nbytes, t.name
            tensors.append(
                (
                    t.name,
                    pos,
                    t.nbytes,
                    _dtype_code(t.dtype),
                    _OP_CODES[kind],
                    float(op.factor),
                    float(op.offset if kind in ("scale", "average") else op.value),  # csrc: value = offset there
                    int(op.seed),
                    float(op.bound),
                    _DTYPE_CODES[op.pre_round] if op.pre_round else -1,
                    [
                        (
                            file_index[s.file],
                            s.offset,
                            _FP8_CODES[s.dtype]
                            if kind == "dequant" and s.dtype in _FP8_CODES
                            else _dtype_code(s.dtype),
                        )
                        for s in srcs
                    ],
                    grid,
                )
            )
            pos += t.nbytes
        assert pos == shard.file_size, (shard.file, pos, shard.file_size)
        side_path, side_template = sidecar(i) if sidecar else ("", "")
        job.append((os.path.join(dst, shard.file), _MODE_WRITE, header, pos, side_path, side_template, tensors))
    return files, job


def execute_native(
    plan: SurgeryPlan,
    layout: CheckpointLayout,
    dst: str | OutputDir,
    *,
    max_memory: int = 512 << 20,
    shards: Iterable[int] | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    sidecar: Callable[[int], tuple[str, str]] | None = None,
    checksum: str = "sample",
    tuning: dict | None = None,
) -> dict[int, str]:
    """Write the plan's shards (all, or the given indices) into the existing folder dst.

    sidecar(i) -> (path, template) names the file written (atomically, before the rename) when
    shard i completes; "@CHECKSUM@" in the template becomes the shard's checksum (32 hex digits)
    with the coverage `checksum` ("sample", "full" or "none"; checksum.py). Returns
    {shard index: 32 hex digits} of the shards written. tuning: switches for tests and benchmarks
    (copy_file_range, sparse, writeback, fsync, checksum, check_finite: True by default; buffer_bytes
    and copy_chunk replace the sizes derived from max_memory). check_finite=False writes an inf or
    NaN that an op computed from finite sources instead of failing (the engine-parity tests use it
    to compare the overflow paths themselves).
    """
    _require()
    todo = list(range(len(plan.shards)) if shards is None else shards)
    if checksum not in checksum_def.CODES:
        raise ValueError(f"checksum {checksum!r}: choose one of {', '.join(checksum_def.CODES)}")
    out = OutputDir(dst) if isinstance(dst, str) else dst
    files, job = build_job(plan, layout, out.path, todo, sidecar)
    mem = memory_plan(max_memory, threads)
    knobs = {
        "copy_file_range": True,
        "sparse": True,
        "writeback": True,
        "fsync": True,
        "check_finite": True,
        "checksum": checksum_def.CODES[checksum],
        "buffer_bytes": mem.buffer_bytes,
        "copy_chunk": COPY_CHUNK,
        "test_chunk_delay_us": int(os.environ.get(TEST_DELAY_ENV, "0")),
        **(tuning or {}),
    }
    side_dir = None
    try:
        # Shards and sidecars are created by name inside these folders (openat, O_NOFOLLOW).
        if sidecar is not None and todo:
            side_dir = out.subdir(os.path.basename(os.path.dirname(sidecar(todo[0])[0])), create=False)
        engine = _native.Engine(
            files, job, threads=mem.threads, out_dir_fd=out.fd, sidecar_dir_fd=side_dir.fd if side_dir else -1, **knobs
        )
        del job  # the engine holds its own copy; a job of a million tensors is hundreds of MB of tuples
    finally:
        if side_dir is not None:
            side_dir.close()
        if out is not dst:
            out.close()
    try:
        _run(engine, progress)
    except EngineError as e:
        if e.kind == "overflow":
            t = next(t for i in todo for t in plan.shards[i].tensors if t.name == e.tensor)
            element = int(e.reason.split("element ")[1].split()[0])
            src_dtypes = [layout.tensors[s].dtype for s in t.op.src]
            raise EngineError(overflow_message(t, src_dtypes, element), "", e.tensor, 0, "overflow") from None
        raise
    return {todo[i]: format_checksum(a, b) for i, a, b in engine.finished()}


def verify_files(
    files: list[tuple[str, int]],
    checksum: str = "full",
    *,
    max_memory: int = 512 << 20,
    threads: int | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Checksums (32 hex digits) of finished files given as (path, expected size), with coverage
    "full" or "sample" (checksum.py), read back in parallel, holes skipped."""
    _require()
    mem = memory_plan(max_memory, threads)
    job = [(path, _MODE_VERIFY, b"", size, "", "", []) for path, size in files]
    engine = _native.Engine(
        [],
        job,
        threads=mem.threads,
        buffer_bytes=mem.buffer_bytes,
        copy_chunk=COPY_CHUNK,
        copy_file_range=True,
        sparse=True,
        writeback=False,
        fsync=False,
        checksum=checksum_def.CODES[checksum],
    )
    _run(engine, progress)
    sums = {i: format_checksum(a, b) for i, a, b in engine.finished()}
    return [sums[i] for i in range(len(files))]


def checksum_file(path: str) -> str:
    """One whole file's checksum on the calling thread (tests compare it with checksum.checksum_python)."""
    _require()
    return format_checksum(*_native.checksum_file(path))


def format_checksum(a: int, b: int) -> str:
    return f"{a:016x}{b:016x}"


def _run(engine, progress: Progress | None) -> None:
    """Start the engine and poll it; Ctrl-C (or any exception here) cancels it and waits for cleanup."""
    reported = 0
    try:
        engine.start()
        while not engine.wait(POLL_SECONDS):
            if progress:
                done = engine.bytes_done
                progress(done - reported)
                reported = done
    except BaseException:
        engine.cancel()
        engine.wait(-1.0)  # workers stop at their next check; .partial files are removed
        raise
    failure = engine.failure()
    if failure is not None:
        message, path, tensor, errno, kind = failure
        raise EngineError(message, path, tensor, errno, kind)
    if progress:
        progress(engine.bytes_done - reported)
