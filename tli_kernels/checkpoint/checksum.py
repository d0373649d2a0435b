"""wsum64x2: the shard checksum written into each sidecar and rechecked on --resume.

Definition (csrc/checksum.h computes the same in C++): the file's bytes, zero-padded to a multiple
of 8, are little-endian u64 words w_i. Over a set of words the checksum is the pair, mod 2^64,
    A = sum w_i * (K1 * (2i + 1)),   B = sum g(w_i),   g(w) = x ^ (x >> 32), x = (w ^ (w >> 29)) * K2
written as 32 hex digits. Zero words add nothing, so holes are never read.

Two coverages, recorded in the label so that a resume checks what was recorded:
- "sample" (default, label wsum64x2-sample1m): the header (first 8 + N bytes), one 4 KiB block at
  every MiB and the last 4 KiB. A few MB per GB: free at write time and on --resume, catches a
  shard truncated, zeroed, partly overwritten or taken from another run, but not a single changed
  byte between samples.
- "full" (label wsum64x2): every byte. Costs one more read of the output through the CPU when
  writing (docs/bench_conversion.md has the measured price) and a full read on --resume.
"""

from __future__ import annotations

import errno
import os
import struct

import numpy as np

MODES = {"sample": "wsum64x2-sample1m", "full": "wsum64x2"}
CODES = {"none": 0, "sample": 1, "full": 2}  # csrc ChecksumMode
SAMPLE_STRIDE = 1 << 20
SAMPLE_BLOCK = 4096
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xBF58476D1CE4E5B9)


def label(mode: str, digits: str) -> str:
    return f"{MODES[mode]}:{digits}"


def parse(recorded: object) -> tuple[str, str] | None:
    """(mode, 32 hex digits) of a recorded checksum, or None when it is not one of ours."""
    if not isinstance(recorded, str) or ":" not in recorded:
        return None
    name, digits = recorded.split(":", 1)
    mode = next((m for m, n in MODES.items() if n == name), None)
    if mode is None or len(digits) != 32 or any(c not in "0123456789abcdef" for c in digits):
        return None
    return mode, digits


def sample_ranges(size: int, header_len: int) -> list[tuple[int, int]]:
    """Word-aligned, sorted, disjoint byte ranges of the "sample" coverage of a file.

    header_len is 8 + N with N the u64 at the file's start (clamped to the file).
    """
    raw = [(0, min(size, header_len)), (max(0, size - SAMPLE_BLOCK), size)]
    raw += [(k, min(size, k + SAMPLE_BLOCK)) for k in range(0, size, SAMPLE_STRIDE)]
    merged: list[tuple[int, int]] = []
    for begin, end in sorted((b & ~7, min(size, (e + 7) & ~7)) for b, e in raw if e > b):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((begin, end))
    return merged


def file_sample_ranges(path: str) -> list[tuple[int, int]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    return sample_ranges(size, min(size, 8 + n))


def data_extents(fd: int, begin: int, end: int):
    """(data, hole) ranges of fd within [begin, end); the whole range where SEEK_DATA is unsupported."""
    pos = begin
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            yield pos, end
            return
        if d >= end:
            return
        h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        yield d, h
        pos = h


def checksum_python(path: str, ranges: list[tuple[int, int]] | None = None, chunk: int = 8 << 20) -> str:
    """32 hex digits of the file's words in `ranges` (None: all of it); holes are skipped."""
    a = b = 0
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        for begin, end in [(0, size)] if ranges is None else ranges:
            for data, hole in list(data_extents(fd, begin, end)):
                data, hole = data & ~7, min(end, (hole + 7) & ~7)
                for off in range(data, hole, chunk):
                    raw = os.pread(fd, min(chunk, hole - off), off)
                    raw += b"\0" * (-len(raw) % 8)
                    w = np.frombuffer(raw, dtype=np.uint64)
                    index = np.arange(off // 8, off // 8 + len(w), dtype=np.uint64)
                    a += int((w * (_K1 * (np.uint64(2) * index + np.uint64(1)))).sum(dtype=np.uint64))
                    x = (w ^ (w >> np.uint64(29))) * _K2
                    b += int((x ^ (x >> np.uint64(32))).sum(dtype=np.uint64))
    return f"{a % 2**64:016x}{b % 2**64:016x}"


def checksum_files(
    files: list[tuple[str, int]], mode: str, *, max_memory: int = 512 << 20, threads: int | None = None
) -> list[str]:
    """Labelled checksums of (path, size) files: the native engine's parallel read when built, else numpy."""
    from tli_kernels.checkpoint import executor_native

    if executor_native.available():
        digits = executor_native.verify_files(files, mode, max_memory=max_memory, threads=threads)
    else:
        digits = [checksum_python(p, file_sample_ranges(p) if mode == "sample" else None) for p, _ in files]
    return [label(mode, d) for d in digits]
