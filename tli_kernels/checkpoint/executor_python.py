"""The pure-Python executor: the reference the native engine must match byte for byte.

Streams every output shard in bounded chunks (never a whole tensor in memory unless it is smaller
than a chunk), reads each source byte once per use, copies unchanged bytes with copy_file_range
where the kernel offers it, leaves zero tensors as holes, fsyncs, and renames a shard into place
only when it is complete. Arithmetic is done in numpy with the exact rules of plan.py, including
our own float32 -> bfloat16/float16 rounding, so the result does not depend on which SIMD path a
library happens to take.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable

import numpy as np

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.plan import OutShard, OutTensor, SurgeryPlan
from tli_kernels.checkpoint.safetensors_format import DTYPE_SIZES, TensorEntry

PARTIAL_SUFFIX = ".partial"
BF16_NAN = np.uint16(0x7FC0)
F16_NAN = np.uint16(0x7E00)
F32_NAN = np.uint32(0x7FC00000)
_STORAGE = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
# Bytes of working memory per element of a transformed chunk: sources, f32/f64 temporaries, output.
_WORK_BYTES_PER_ELEMENT = 40

Progress = Callable[[int], None]


def execute_python(
    plan: SurgeryPlan,
    layout: CheckpointLayout,
    dst: str,
    *,
    max_memory: int = 512 << 20,
    shards: Iterable[int] | None = None,
    progress: Progress | None = None,
) -> None:
    """Write the plan's shards (all, or the given indices) into the existing folder dst."""
    chunk_elems = max(1 << 12, min(max_memory // (4 * _WORK_BYTES_PER_ELEMENT), 1 << 24))
    copy_chunk = max(1 << 20, min(max_memory // 4, 64 << 20))
    with _SourceFiles(layout) as sources:
        for i in range(len(plan.shards)) if shards is None else shards:
            shard = plan.shards[i]
            _write_shard(shard, dst, sources, chunk_elems, copy_chunk, progress)
            sources.check_unchanged()


def _write_shard(
    shard: OutShard, dst: str, sources: _SourceFiles, chunk_elems: int, copy_chunk: int, progress: Progress | None
) -> None:
    final = os.path.join(dst, shard.file)
    partial = final + PARTIAL_SUFFIX
    header = shard.header_bytes()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, header, 0, partial)
        pos = len(header)
        for t in shard.tensors:
            _write_tensor(t, fd, pos, sources, chunk_elems, copy_chunk, progress, partial)
            pos += t.nbytes
        os.ftruncate(fd, pos)  # trailing zero tensors stay holes but count in the size
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(partial)
        raise
    os.close(fd)
    os.replace(partial, final)
    fsync_dir(dst)


def _write_tensor(
    t: OutTensor,
    fd: int,
    pos: int,
    sources: _SourceFiles,
    chunk_elems: int,
    copy_chunk: int,
    progress: Progress | None,
    out_path: str,
) -> None:
    op = t.op
    n = t.nbytes // DTYPE_SIZES[t.dtype]
    if op.kind == "zeros" or n == 0:
        if progress:
            progress(t.nbytes)
        return
    srcs = [sources.entry(s) for s in op.src]
    if op.kind == "copy" and srcs[0].dtype == t.dtype:
        sources.copy_bytes(srcs[0], fd, pos, copy_chunk, progress, out_path)
        return
    size = DTYPE_SIZES[t.dtype]
    for start in range(0, n, chunk_elems):
        k = min(chunk_elems, n - start)
        x = _compute_f32(t, srcs, start, k, sources)
        _pwrite_all(fd, f32_to_bytes(x, t.dtype), pos + start * size, out_path)
        if progress:
            progress(k * size)


def _compute_f32(t: OutTensor, srcs: list[TensorEntry], start: int, k: int, sources: _SourceFiles) -> np.ndarray:
    op = t.op
    if op.kind == "fill":
        return np.full(k, np.float32(op.value), dtype=np.float32)
    if op.kind == "uniform":
        return uniform_f32(op.seed, op.bound, start, k)
    x = sources.read_f32(srcs[0], start, k)
    if op.kind == "scale":
        return _scaled(x, op)
    if op.kind == "average":
        for s in srcs[1:]:
            x = x + sources.read_f32(s, start, k)
        x = x / np.float32(len(srcs))
        return _scaled(x, op) if op.factor != 1.0 else x
    assert op.kind == "copy", op.kind
    return x


def _scaled(x: np.ndarray, op) -> np.ndarray:
    """x * factor, or (x + offset) * factor - offset for a norm stored as (scale - offset)."""
    if op.offset:
        off = np.float32(op.offset)
        return (x + off) * np.float32(op.factor) - off
    return x * np.float32(op.factor)


# ---- numerics shared with the native engine's spec ----------------------------------------------
def bytes_to_f32(raw: bytes | bytearray | memoryview, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return np.frombuffer(raw, dtype=np.float16).astype(np.float32)
    if dtype == "F32":
        return np.frombuffer(raw, dtype=np.float32).copy()
    raise ValueError(f"cannot convert {dtype} to float32")


def f32_to_bytes(x: np.ndarray, dtype: str) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32)
    nan = np.isnan(x)
    if dtype == "F32":
        # NaN payloads after an add differ between numpy's SIMD and scalar loops: canonicalise.
        bits = x.view(np.uint32).copy()
        bits[nan] = F32_NAN
        return bits.tobytes()
    if dtype == "BF16":
        bits = x.view(np.uint32)
        out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        out[nan] = BF16_NAN
        return out.tobytes()
    if dtype == "F16":
        with np.errstate(over="ignore"):
            out = x.astype(np.float16).view(np.uint16)
        out[nan] = F16_NAN
        return out.tobytes()
    raise ValueError(f"cannot convert float32 to {dtype}")


def uniform_f32(seed: int, bound: float, start: int, k: int) -> np.ndarray:
    i = np.arange(start + 1, start + 1 + k, dtype=np.uint64)
    z = np.uint64(seed) + i * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    return ((2.0 * u - 1.0) * bound).astype(np.float32)


# ---- file access -----------------------------------------------------------------------------
class _SourceFiles:
    """Open source files, read by absolute offset; notices a source that shrinks or changes size."""

    def __init__(self, layout: CheckpointLayout):
        self.layout = layout
        self.fds: dict[str, int] = {}
        self.sizes = {h.path: h.size for h in layout.files.values()}
        self.can_copy_file_range = hasattr(os, "copy_file_range")

    def __enter__(self):
        try:
            for path, _size in self.sizes.items():
                self.fds[path] = os.open(path, os.O_RDONLY)
        except OSError as e:
            self.__exit__()
            raise CheckpointError(f"cannot open source: {e.strerror}", e.filename) from e
        self.check_unchanged()
        return self

    def __exit__(self, *exc):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def entry(self, name: str) -> TensorEntry:
        return self.layout.tensors[name]

    def check_unchanged(self) -> None:
        for path, fd in self.fds.items():
            now = os.fstat(fd).st_size
            if now != self.sizes[path]:
                raise CheckpointError(
                    f"source file changed size during the run ({self.sizes[path]} -> {now} bytes); output discarded",
                    path,
                )

    def _short_read(self, t: TensorEntry, got: int, want: int) -> CheckpointError:
        return CheckpointError(
            f"source ended early: read {got} of {want} bytes (file truncated or changed during the run)",
            t.file,
            t.name,
        )

    def read_f32(self, t: TensorEntry, start: int, k: int) -> np.ndarray:
        size = DTYPE_SIZES[t.dtype]
        raw = os.pread(self.fds[t.file], k * size, t.offset + start * size)
        if len(raw) != k * size:
            raise self._short_read(t, len(raw), k * size)
        return bytes_to_f32(raw, t.dtype)

    def copy_bytes(
        self, t: TensorEntry, out_fd: int, out_pos: int, chunk: int, progress: Progress | None, out_path: str
    ) -> None:
        src_fd, done = self.fds[t.file], 0
        while done < t.nbytes:
            want = min(chunk, t.nbytes - done)
            got = self._copy_range(src_fd, out_fd, want, t.offset + done, out_pos + done, out_path)
            if got == 0:
                raise self._short_read(t, done, t.nbytes)
            done += got
            if progress:
                progress(got)

    def _copy_range(self, src_fd: int, out_fd: int, count: int, src_off: int, out_off: int, out_path: str) -> int:
        if self.can_copy_file_range:
            try:
                return os.copy_file_range(src_fd, out_fd, count, src_off, out_off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                    raise OSError(e.errno, f"cannot copy into output: {e.strerror}", out_path) from e
                self.can_copy_file_range = False
        data = os.pread(src_fd, count, src_off)
        _pwrite_all(out_fd, data, out_off, out_path)
        return len(data)


def _pwrite_all(fd: int, data: bytes, pos: int, path: str) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, pos)
        except OSError as e:
            raise OSError(e.errno, f"cannot write output: {e.strerror}", path) from e
        view, pos = view[n:], pos + n


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
