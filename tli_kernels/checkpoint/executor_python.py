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
from tli_kernels.checkpoint.outdir import OutputDir
from tli_kernels.checkpoint.plan import OutShard, OutTensor, SurgeryPlan
from tli_kernels.checkpoint.safetensors_format import DTYPE_SIZES, TensorEntry
from tli_kernels.checkpoint.sources import open_source
from tli_kernels.checkpoint.validate import FileStat

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
    dst: str | OutputDir,
    *,
    max_memory: int = 512 << 20,
    shards: Iterable[int] | None = None,
    progress: Progress | None = None,
    on_shard: Callable[[int], None] | None = None,
    check_finite: bool = True,
) -> None:
    """Write the plan's shards (all, or the given indices) into the existing folder dst.

    Each source file is opened once for the whole call and must be the file its header was read
    from (sources.open_source); on_shard(i) runs as soon as shard i is in place (its sidecar).
    check_finite=False writes an inf/NaN computed from finite sources instead of refusing it.
    """
    chunk_elems = max(1 << 12, min(max_memory // (4 * _WORK_BYTES_PER_ELEMENT), 1 << 24))
    copy_chunk = max(1 << 20, min(max_memory // 4, 64 << 20))
    out = OutputDir(dst) if isinstance(dst, str) else dst
    try:
        with _SourceFiles(layout) as sources:
            for i in range(len(plan.shards)) if shards is None else shards:
                _write_shard(plan.shards[i], out, sources, chunk_elems, copy_chunk, progress, check_finite)
                if on_shard is not None:
                    on_shard(i)
    finally:
        if out is not dst:
            out.close()


def _write_shard(
    shard: OutShard,
    out: OutputDir,
    sources: _SourceFiles,
    chunk_elems: int,
    copy_chunk: int,
    progress: Progress | None,
    check_finite: bool = True,
) -> None:
    partial_name = shard.file + PARTIAL_SUFFIX
    partial = out.join(partial_name)
    header = shard.header_bytes()
    fd = out.create(partial_name)
    try:
        _pwrite_all(fd, header, 0, partial)
        pos = len(header)
        for t in shard.tensors:
            _write_tensor(t, fd, pos, sources, chunk_elems, copy_chunk, progress, partial, check_finite)
            pos += t.nbytes
        os.ftruncate(fd, pos)  # trailing zero tensors stay holes but count in the size
        os.fsync(fd)
        # The shard is only as good as its sources were for the whole time it was being written.
        sources.check_unchanged()
        if not out.holds(partial_name, fd):
            raise CheckpointError(
                "was replaced by another process while this run wrote it; not renaming a file this run did not "
                "write (is another tli run writing this folder?)",
                partial,
            )
    except BaseException:
        if out.holds(partial_name, fd):  # remove only the file this run created
            out.unlink(partial_name)
        os.close(fd)
        raise
    os.close(fd)
    out.rename(partial_name, shard.file)
    out.fsync()


def _write_tensor(
    t: OutTensor,
    fd: int,
    pos: int,
    sources: _SourceFiles,
    chunk_elems: int,
    copy_chunk: int,
    progress: Progress | None,
    out_path: str,
    check_finite: bool = True,
) -> None:
    op = t.op
    n = t.nbytes // DTYPE_SIZES[t.dtype]
    if op.kind == "zeros" or n == 0:
        if progress:
            progress(t.nbytes)
        return
    srcs = [sources.entry(s) for s in op.src]
    if op.kind == "dequant":
        _write_dequant(t, fd, pos, srcs, sources, chunk_elems, progress, out_path, check_finite)
        return
    if op.kind == "copy" and srcs[0].dtype == t.dtype:
        sources.copy_bytes(srcs[0], fd, pos, copy_chunk, progress, out_path)
        return
    size = DTYPE_SIZES[t.dtype]
    for start in range(0, n, chunk_elems):
        k = min(chunk_elems, n - start)
        for s in srcs:
            sources.check_unchanged(s.file, s.name)
        x = _compute_f32(t, srcs, start, k, sources)
        raw = f32_to_bytes(x, t.dtype)
        if check_finite:
            _check_finite(t, srcs, start, raw, sources)
        _pwrite_all(fd, raw, pos + start * size, out_path)
        if progress:
            progress(k * size)


def _write_dequant(
    t: OutTensor,
    fd: int,
    pos: int,
    srcs: list[TensorEntry],
    sources: _SourceFiles,
    chunk_elems: int,
    progress: Progress | None,
    out_path: str,
    check_finite: bool,
) -> None:
    """The dequant op (plan.py): FP8 weights times their block scales, chunk by chunk."""
    n, size = t.nbytes // DTYPE_SIZES[t.dtype], DTYPE_SIZES[t.dtype]
    chunk_elems = max(1, chunk_elems // 2)  # int64 index arithmetic: about twice a transform's bytes per element
    for start in range(0, n, chunk_elems):
        k = min(chunk_elems, n - start)
        for s in srcs:
            sources.check_unchanged(s.file, s.name)
        pairs = [dequant_inputs(t, q, sc, start, k, sources) for q, sc in zip(srcs[::2], srcs[1::2])]
        x = pairs[0][0] * pairs[0][1]
        for q, scale in pairs[1:]:
            x = x + q * scale
        if len(pairs) > 1:
            x = x / np.float32(len(pairs))
        if t.op.factor != 1.0:
            x = x * np.float32(t.op.factor)
        raw = f32_to_bytes(x, t.dtype)
        if check_finite:
            bad = nonfinite_mask(raw, t.dtype)
            for q, scale in pairs:
                bad &= np.isfinite(q) & np.isfinite(scale)
            if bad.any():
                raise CheckpointError(overflow_message(t, [srcs[0].dtype], start + int(np.argmax(bad))), None, t.name)
        _pwrite_all(fd, raw, pos + start * size, out_path)
        if progress:
            progress(k * size)


def dequant_inputs(
    t: OutTensor, q: TensorEntry, scale: TensorEntry, start: int, k: int, sources: _SourceFiles
) -> tuple[np.ndarray, np.ndarray]:
    """Elements [start, start + k) of an FP8 weight as f32, and the f32 scale that applies to each."""
    cols = t.shape[1]
    br, bc = t.op.block
    grid_cols = -(-cols // bc)
    raw = os.pread(sources.fds[q.file], k, q.offset + start)
    if len(raw) != k:
        raise sources._short_read(q, len(raw), k)
    values = FP8_TO_F32[q.dtype][np.frombuffer(raw, dtype=np.uint8)]
    idx = np.arange(start, start + k, dtype=np.int64)
    grid_rows = idx // cols // br
    first = int(grid_rows[0]) * grid_cols
    count = (int(grid_rows[-1]) + 1) * grid_cols - first
    table = sources.read_f32(scale, first, count)
    return values, table[grid_rows * grid_cols + (idx % cols) // bc - first]


def _fp8_table(dtype: str) -> np.ndarray:
    """f32 value of each of the 256 FP8 bytes (E4M3FN: no infinities, 0x7F/0xFF NaN; E5M2: F16's top byte)."""
    b = np.arange(256, dtype=np.uint32)
    if dtype == "F8_E5M2":
        return (b << 8).astype(np.uint16).view(np.float16).astype(np.float32)
    exp, man = (b >> 3) & 15, (b & 7).astype(np.float64)
    mag = np.where(exp == 0, man * 2.0**-9, (8 + man) * np.exp2(exp.astype(np.float64) - 10))
    mag = np.where((exp == 15) & (man == 7), np.nan, mag)
    return np.where(b >= 128, -mag, mag).astype(np.float32)


FP8_TO_F32 = {d: _fp8_table(d) for d in ("F8_E4M3", "F8_E5M2")}


def _check_finite(t: OutTensor, srcs: list[TensorEntry], start: int, raw: bytes, sources: _SourceFiles) -> None:
    """Refuse a non-finite output element whose sources are all finite (an overflow: --alpha, --dtype)."""
    bad = nonfinite_mask(raw, t.dtype)
    if not bad.any():
        return
    for s in srcs:
        bad &= np.isfinite(sources.read_f32(s, start, len(bad)))
    if bad.any():
        raise CheckpointError(overflow_message(t, [s.dtype for s in srcs], start + int(np.argmax(bad))), None, t.name)


def nonfinite_mask(raw: bytes, dtype: str) -> np.ndarray:
    """True where the BF16/F16/F32 bytes hold an infinity or a NaN."""
    if dtype == "F32":
        return (np.frombuffer(raw, dtype=np.uint32) & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    exponent = np.uint16(0x7F80 if dtype == "BF16" else 0x7C00)
    return (np.frombuffer(raw, dtype=np.uint16) & exponent) == exponent


def overflow_message(t: OutTensor, src_dtypes: list[str], element: int) -> str:
    """Why an op turned finite sources into inf/NaN, naming the option responsible (both engines)."""
    op, where = t.op, f"element {element} of this {t.dtype} tensor would be inf or NaN from finite source values"
    if op.kind in ("scale", "average") and op.factor != 1.0:
        return (
            f"{where}: --alpha {op.factor:g} (a {op.kind} by it) overflows {t.dtype} for these weights; "
            "use a smaller --alpha"
        )
    if op.kind == "average":
        return f"{where}: the sum of the averaged {src_dtypes[0]} weights overflows float32"
    if op.kind == "dequant":
        return f"{where}: the {src_dtypes[0]} weights times their scales overflow {t.dtype}; choose a wider --dtype"
    if op.kind == "copy":
        return f"{where}: {src_dtypes[0]} weights too large for {t.dtype}; choose another --dtype (or keep)"
    if op.kind == "uniform":
        return f"{where}: the random init's bound {op.bound:g} (initializer_range x --alpha) does not fit {t.dtype}"
    return f"{where}: op {op.kind} overflows {t.dtype}"


def _compute_f32(t: OutTensor, srcs: list[TensorEntry], start: int, k: int, sources: _SourceFiles) -> np.ndarray:
    op = t.op
    if op.kind == "fill":
        return np.full(k, np.float32(op.value), dtype=np.float32)
    if op.kind == "uniform":
        return uniform_f32(op.seed, op.bound, start, k)
    x = _pre_rounded(sources.read_f32(srcs[0], start, k), op)
    if op.kind == "scale":
        return _scaled(x, op)
    if op.kind == "average":
        for s in srcs[1:]:
            x = x + sources.read_f32(s, start, k)
        x = x / np.float32(len(srcs))
        return _scaled(x, op) if op.factor != 1.0 else x
    assert op.kind == "copy", op.kind
    return x


def _pre_rounded(x: np.ndarray, op) -> np.ndarray:
    """Source values rounded to op.pre_round (RNE) and widened again, when the op asks for it."""
    return bytes_to_f32(f32_to_bytes(x, op.pre_round), op.pre_round) if op.pre_round else x


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
    """Source files opened once per run, each checked to be the file its header was read from
    (sources.open_source); check_unchanged() compares size, mtime and ctime again."""

    def __init__(self, layout: CheckpointLayout):
        self.layout = layout
        self.fds: dict[str, int] = {}
        self.stats: dict[str, FileStat] = {}
        self.can_copy_file_range = hasattr(os, "copy_file_range")

    def __enter__(self):
        try:
            for h in self.layout.files.values():
                self.fds[h.path], self.stats[h.path] = open_source(h)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def entry(self, name: str) -> TensorEntry:
        return self.layout.tensors[name]

    def check_unchanged(self, path: str | None = None, tensor: str | None = None) -> None:
        for p in [path] if path is not None else list(self.fds):
            now = FileStat(os.fstat(self.fds[p]))
            change = now.change_since(self.stats[p])
            if change:
                raise CheckpointError(f"source file changed during the run: {change}; output discarded", p, tensor)

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
            self.check_unchanged(t.file, t.name)
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


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
