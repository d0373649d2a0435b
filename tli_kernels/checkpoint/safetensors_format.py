"""The safetensors file format, read from headers only.

A safetensors file is: 8 bytes little-endian u64 N, then N bytes of UTF-8 JSON (the header), then
the data buffer. The contract this module enforces (the same as the safetensors library's own
validation, with an error that names the file and tensor at fault):

- The file MUST hold at least 8 bytes, N MUST be at most 100 MB, and 8 + N MUST fit in the file.
- The header MUST be a JSON object; it MAY hold "__metadata__", a map of string to string.
- Every other key is a tensor name, unique, mapped to {"dtype", "shape", "data_offsets"}: a known
  dtype, a list of non-negative integers, and [begin, end] with begin <= end.
- end - begin MUST equal numel(shape) * itemsize(dtype).
- Sorted by begin, the tensors MUST tile the data buffer: the first begins at 0, each begins where
  the previous ended (no gap, no overlap) and the last ends at the end of the file.
- The header MAY be padded with trailing spaces (writers pad it to a multiple of 8 bytes).

Nothing here reads tensor data: a 405B checkpoint's layout costs a few MB of JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from json.decoder import scanstring

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.validate import FileStat, decode_utf8, open_regular

MAX_HEADER_BYTES = 100_000_000

# safetensors dtype name -> bytes per element.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# The float dtypes the executors can transform (scale, average, cast). Others are copied verbatim.
ARITHMETIC_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of one file: where its bytes lie, absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # absolute path of the file holding it
    offset: int  # absolute byte offset of its first byte in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class FileHeader:
    path: str
    size: int
    header_bytes: int  # N, the JSON length (with padding)
    metadata: dict[str, str] | None
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    stat: FileStat | None = None  # of the file whose header this is, when it was read (sources.py)

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(shape) * DTYPE_SIZES[dtype]


def read_header(path: str) -> FileHeader:
    """Read and validate the header of one safetensors file; raises CheckpointError on any breach.

    A FIFO or device named *.safetensors is refused before it is read (validate.open_regular).
    """
    path = os.path.abspath(path)
    try:
        fd = open_regular(path, "safetensors file")
    except FileNotFoundError:
        raise CheckpointError("does not exist (a broken link?)", path) from None
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size < 8:
            raise CheckpointError(f"file is {size} bytes, shorter than the 8-byte header length", path)
        (n,) = struct.unpack("<Q", _pread_exact(fd, 8, 0, path))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"header length {n} exceeds the 100 MB limit (corrupt file?)", path)
        if 8 + n > size:
            raise CheckpointError(f"header length {n} runs past the end of the {size}-byte file", path)
        raw = _pread_exact(fd, n, 8, path)
        if os.fstat(fd).st_size != size:
            raise CheckpointError("file changed size while its header was read", path)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", path) from e
    finally:
        os.close(fd)
    if not raw.startswith(b"{"):
        raise CheckpointError("header does not start with '{' (not a safetensors file?)", path)
    box = [decode_utf8(raw, path, "header")]
    del raw  # a legal header is up to 100 MB: the bytes, the text and the entries never all coexist
    header = _parse_text(box, n, path, size)
    header.stat = FileStat(st)
    return header


def _pread_exact(fd: int, n: int, offset: int, path: str) -> bytes:
    parts, got = [], 0
    while got < n:
        block = os.pread(fd, min(n - got, 64 << 20), offset + got)
        if not block:
            raise CheckpointError(f"file ended at byte {offset + got} while reading its header", path)
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def parse_header(raw: bytes, path: str, size: int) -> FileHeader:
    """Validate header bytes (the N bytes after the length prefix) of a file of `size` bytes."""
    if not raw.startswith(b"{"):
        raise CheckpointError("header does not start with '{' (not a safetensors file?)", path)
    return _parse_text([decode_utf8(raw, path, "header")], len(raw), path, size)


def _parse_text(box: list[str], header_len: int, path: str, size: int) -> FileHeader:
    """box: [the header text], emptied here so the text is freed as soon as it is parsed."""
    text = box.pop()
    data_start = 8 + header_len
    data_len = size - data_start
    header = FileHeader(path=path, size=size, header_bytes=header_len, metadata=None)
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
    # Entries are parsed and checked one at a time (_top_level_items), so a legal 100 MB header
    # never exists as a whole tree of Python dicts next to its TensorEntries.
    for name, info in _top_level_items(text, path):
        if name == "__metadata__":
            header.metadata = _check_metadata(info, path)
            continue
        if name in header.tensors:
            raise CheckpointError(f"tensor {name!r} appears twice in the header", path, name)
        if not _valid_text(name):
            raise CheckpointError(
                f"tensor name {name!r} holds a lone UTF-16 surrogate (a \\ud8xx escape): not valid Unicode", path
            )
        dtype, shape, (begin, end) = _check_entry(name, info, path)
        expected = tensor_nbytes(dtype, shape)
        if end - begin != expected:
            raise CheckpointError(
                f"data_offsets [{begin}, {end}] span {end - begin} bytes but {dtype}{list(shape)} needs {expected}",
                path,
                name,
            )
        shape = shapes.setdefault(shape, shape)  # one tuple per distinct shape, not per tensor
        header.tensors[name] = TensorEntry(name, dtype, shape, path, data_start + begin, expected)
    del text, shapes

    cursor, previous = 0, None
    for t in sorted(header.tensors.values(), key=_by_offset):
        begin, end, name = t.offset - data_start, t.offset - data_start + t.nbytes, t.name
        if begin < cursor:
            raise CheckpointError(
                f"data_offsets [{begin}, {end}] overlap the previous tensor {previous!r} (ends at {cursor})",
                path,
                name,
            )
        if begin > cursor:
            raise CheckpointError(
                f"gap of {begin - cursor} bytes before this tensor (begins at {begin}, previous ends at {cursor})",
                path,
                name,
            )
        cursor, previous = end, name
    if cursor != data_len:
        what = "truncated" if cursor > data_len else "has trailing bytes"
        raise CheckpointError(
            f"file {what}: tensors need {cursor} data bytes after the header, the file has {data_len}",
            path,
            previous,
        )
    return header


def _by_offset(t: TensorEntry) -> tuple[int, int]:
    return t.offset, t.nbytes


_WS = re.compile(r"[ \t\n\r]*")


def _top_level_items(text: str, path: str):
    """(key, value) of the header's top-level object, one at a time: keys by the C string scanner,
    each value (a small object) by the C JSON scanner. Errors name the file and the byte."""
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys(path))

    def fail(msg: str, pos: int):
        raise CheckpointError(f"header is not valid JSON ({msg} at character {pos})", path)

    try:
        i = _WS.match(text, 1).end()
        if text.startswith("}", i):
            i += 1
        else:
            while True:
                if not text.startswith('"', i):
                    fail("expecting a tensor name in double quotes", i)
                key, i = scanstring(text, i + 1)
                i = _WS.match(text, i).end()
                if not text.startswith(":", i):
                    fail("expecting ':'", i)
                i = _WS.match(text, i + 1).end()
                value, i = decoder.raw_decode(text, i)
                yield key, value
                i = _WS.match(text, i).end()
                if text.startswith(",", i):
                    i = _WS.match(text, i + 1).end()
                elif text.startswith("}", i):
                    i += 1
                    break
                else:
                    fail("expecting ',' or '}'", i)
        if text[i:].strip(" "):
            fail("trailing characters after the object (only space padding is allowed)", i)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"header is not valid JSON ({e.msg} at character {e.pos})", path) from None
    except RecursionError:
        raise CheckpointError("header is nested too deeply to be read (over ~1000 levels of [ or {)", path) from None
    except ValueError as e:  # int() refusing more than sys.get_int_max_str_digits() digits
        if isinstance(e, CheckpointError):
            raise
        reason = " ".join(str(e).split()[:12])
        raise CheckpointError(f"header holds a number tli cannot read ({reason})", path) from None


def _check_metadata(metadata: object, path: str) -> dict[str, str]:
    if not (isinstance(metadata, dict) and all(isinstance(v, str) and _valid_text(v) for v in metadata.values())):
        raise CheckpointError("__metadata__ must map strings to strings", path)
    if not all(_valid_text(k) for k in metadata):
        raise CheckpointError("__metadata__ has a key that is not valid Unicode (a lone surrogate)", path)
    return metadata


def _check_entry(name: str, info: object, path: str) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if not isinstance(info, dict):
        raise CheckpointError("header entry is not an object", path, name)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"unknown dtype {str(dtype)[:40]!r}", path, name)
    if not _uint_list(shape):
        raise CheckpointError(f"shape {str(shape)[:80]} is not a list of non-negative integers", path, name)
    if not _uint_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(f"data_offsets {str(offsets)[:80]} are not [begin, end] with begin <= end", path, name)
    return dtype, tuple(shape), (offsets[0], offsets[1])


_INT_ONLY = {int}


def _uint_list(x: object) -> bool:
    """A list of non-negative ints (not bools); C-level checks, as a header may hold a million."""
    return type(x) is list and (not x or (set(map(type, x)) <= _INT_ONLY and min(x) >= 0))


def _valid_text(s: str) -> bool:
    """False for strings with lone surrogates, which JSON escapes allow but UTF-8 cannot encode."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_duplicate_keys(path: str):
    def hook(pairs):
        seen = dict(pairs)
        if len(seen) != len(pairs):
            counts: dict[str, int] = {}
            for k, _ in pairs:
                counts[k] = counts.get(k, 0) + 1
                if counts[k] > 1:
                    raise CheckpointError(f"{k!r} appears twice in one object of the header", path)
        return seen

    return hook


def build_header(tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The header bytes (length prefix included) for tensors laid out in the given order.

    Deterministic: compact JSON (exactly json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    of {"__metadata__": ..., name: {"dtype", "shape", "data_offsets"}, ...}), tensors in order,
    padded with spaces to a multiple of 8 bytes so the data buffer is 8-byte aligned (as the
    safetensors writer does). Written entry by entry into one buffer: a header of a million
    tensors never exists as a tree of dicts.
    """
    out = bytearray(b"{")
    if metadata:
        out += b'"__metadata__":' + json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    offset = 0
    for name, dtype, shape in tensors:  # names are unique (validate_plan, the writers' own lists)
        nbytes = tensor_nbytes(dtype, shape)
        if len(out) > 1:
            out += b","
        out += json.dumps(name, ensure_ascii=False).encode("utf-8")
        out += f':{{"dtype":{json.dumps(dtype)},"shape":[{",".join(map(str, shape))}],'.encode()
        out += f'"data_offsets":[{offset},{offset + nbytes}]}}'.encode()
        offset += nbytes
        if len(out) > MAX_HEADER_BYTES:
            break
    out += b"}"
    out += b" " * (-len(out) % 8)
    if len(out) > MAX_HEADER_BYTES:
        raise ValueError(f"output header would be over {len(out)} bytes, over the 100 MB safetensors limit")
    return struct.pack("<Q", len(out)) + bytes(out)
