"""One validation layer for the files tli reads but did not just compute: regular files only, JSON
decoded strictly, and the types of the fields tli relies on checked before anything uses them.

Every failure is a CheckpointError whose message starts with the file, so a hostile or damaged
file gives one line naming it instead of a hang, a traceback or a message that names nothing:

- a FIFO, device, socket or directory where a file is expected is refused before it is opened
  for reading (`os.stat` first, then an `O_NONBLOCK` open checked with `fstat`, so a FIFO swapped
  in between cannot block either);
- bytes that are not UTF-8, JSON nested past the interpreter's recursion limit, integers with
  more digits than Python converts (4300), lone surrogates (valid JSON escapes, invalid Unicode)
  and duplicate keys where they matter are named with the file;
- the JSON files tli reads (config, index, provenance, the unfinished-output marker, the shard
  sidecars) each have a checker here for the fields tli uses.

The config's model fields (layer counts, architectures, ...) are checked where they are
interpreted (layout.py); this module only guarantees config.json is a JSON object.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import stat as stat_mod

from tli_kernels.checkpoint.errors import CheckpointError

# JSON files tli reads are small: a 405B index is ~100 KB, configs a few KB. A bound keeps a
# hostile multi-GB "config.json" from being read into memory.
MAX_JSON_BYTES = 64 << 20


def _kind(mode: int) -> str:
    for test, name in (
        (stat_mod.S_ISDIR, "a directory"),
        (stat_mod.S_ISFIFO, "a FIFO (named pipe)"),
        (stat_mod.S_ISCHR, "a character device"),
        (stat_mod.S_ISBLK, "a block device"),
        (stat_mod.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def file_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a character device', ... for a stat mode (for messages)."""
    return _kind(mode)


def check_regular(path: str, what: str) -> os.stat_result:
    """stat(path) (following links, as a model folder may be a Hugging Face cache of links); raise
    unless it is a regular file. Reads nothing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read {what}: {e.strerror or e}", path) from e
    if not stat_mod.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} is {_kind(st.st_mode)}, not a regular file; tli reads only regular files", path)
    return st


def open_regular(path: str, what: str) -> int:
    """A read-only fd of `path`, refused before any read unless it is a regular file."""
    check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot open {what}: {e.strerror or e}", path) from e
    st = os.fstat(fd)
    if not stat_mod.S_ISREG(st.st_mode):  # swapped between the stat and the open
        os.close(fd)
        raise CheckpointError(f"{what} is {_kind(st.st_mode)}, not a regular file; tli reads only regular files", path)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def read_regular(path: str, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(f"{what} is {size} bytes, more than the {limit >> 20} MiB tli reads", path)
        chunks, got = [], 0
        while got <= limit:
            block = os.read(fd, min(1 << 20, limit + 1 - got))
            if not block:
                break
            chunks.append(block)
            got += len(block)
        if got > limit:
            raise CheckpointError(f"{what} grew past {limit >> 20} MiB while being read", path)
        return b"".join(chunks)
    except OSError as e:
        raise CheckpointError(f"cannot read {what}: {e.strerror or e}", path) from e
    finally:
        os.close(fd)


def decode_utf8(raw: bytes, path: str, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})", path) from None


def parse_json(raw: bytes | str, path: str, what: str, object_pairs_hook=None, check_strings: bool = True) -> object:
    """json.loads with every failure named: syntax, UTF-8, nesting depth, giant integers, lone
    surrogates (check_strings=False leaves the last to a caller that checks the strings it uses)."""
    text = decode_utf8(raw, path, what) if isinstance(raw, bytes | bytearray) else raw
    try:
        obj = json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise CheckpointError(f"{what} is not valid JSON ({e.msg} at {where})", path) from None
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply to be read (over ~1000 levels of [ or {{)", path) from None
    except ValueError as e:  # int() refusing more than sys.get_int_max_str_digits() digits
        if isinstance(e, CheckpointError):
            raise
        reason = " ".join(str(e).split()[:12])
        raise CheckpointError(f"{what} holds a number tli cannot read ({reason})", path) from None
    bad = _first_lone_surrogate(obj) if check_strings else None
    if bad is not None:
        raise CheckpointError(
            f"{what} holds the string {bad!r} with a lone UTF-16 surrogate (a \\ud8xx escape): not valid Unicode", path
        )
    return obj


def _first_lone_surrogate(obj: object) -> str | None:
    """The first string (key or value) that cannot be encoded as UTF-8; iterative, any depth."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if not x.isascii():
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    return x
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return None


def load_json(path: str, what: str, limit: int = MAX_JSON_BYTES) -> object:
    """Read and parse a JSON file tli did not write in this run (FileNotFoundError passes through)."""
    return parse_json(read_regular(path, what, limit), path, what)


def load_json_object(path: str, what: str, limit: int = MAX_JSON_BYTES) -> dict:
    obj = load_json(path, what, limit)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} is a JSON {_json_type(obj)}, not an object", path)
    return obj


def _json_type(x: object) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "boolean"
    if isinstance(x, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(x), type(x).__name__)


# ---- field checks ----------------------------------------------------------------------------------
def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: object) -> bool:
    return (is_int(x) or isinstance(x, float)) and math.isfinite(x)


def field(obj: dict, key: str, check, expected: str, path: str, what: str, required: bool = True):
    """obj[key] if check(value) holds; raise naming the file, the key and what was expected."""
    if key not in obj:
        if required:
            raise CheckpointError(f"{what} has no {key!r} (expected {expected})", path)
        return None
    value = obj[key]
    if not check(value):
        raise CheckpointError(f"{what}: {key!r} is {repr(value)[:60]} ({_json_type(value)}), expected {expected}", path)
    return value


def check_index(obj: object, path: str) -> dict[str, str]:
    """model.safetensors.index.json: a non-empty weight_map of tensor name -> file name in the folder."""
    what = "index"
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} is a JSON {_json_type(obj)}, not an object", path)
    weight_map = field(obj, "weight_map", lambda x: isinstance(x, dict) and x, "a non-empty object", path, what)
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or os.path.basename(fname) != fname or fname in (".", ".."):
            raise CheckpointError(f"index maps it to {fname!r}, not a file name in this folder", path, name)
    field(obj, "metadata", lambda x: x is None or isinstance(x, dict), "an object", path, what, required=False)
    return weight_map


def check_marker(obj: object, path: str) -> dict:
    """.tli-incomplete.json: written by tli at the start of a run; names the plan it belongs to."""
    what = "unfinished-output marker"
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} is a JSON {_json_type(obj)}, not an object (not written by tli?)", path)
    field(obj, "plan_sha256", lambda x: isinstance(x, str), "a string", path, what)
    field(obj, "source_stat", lambda x: isinstance(x, dict), "an object", path, what, required=False)
    field(obj, "source", lambda x: isinstance(x, dict), "an object", path, what, required=False)
    field(obj, "finished_shards", lambda x: isinstance(x, dict), "an object", path, what, required=False)
    return obj


def check_provenance(obj: object, path: str) -> dict:
    """tli_provenance.json: the fields `tli inspect` and training read, with their types."""
    what = "provenance"
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} is a JSON {_json_type(obj)}, not an object", path)
    field(obj, "method", lambda x: isinstance(x, str), "a string", path, what, required=False)
    field(obj, "options", lambda x: isinstance(x, dict), "an object", path, what, required=False)
    field(
        obj,
        "injected_layers",
        lambda x: isinstance(x, list) and all(is_int(i) and i >= 0 for i in x),
        "a list of layer indices",
        path,
        what,
        required=False,
    )
    field(
        obj,
        "residual_scales",
        lambda x: isinstance(x, dict) and all(k.isdigit() and k.isascii() and is_number(v) for k, v in x.items()),
        "an object of layer index -> finite number",
        path,
        what,
        required=False,
    )
    field(
        obj,
        "source",
        lambda x: isinstance(x, dict) and isinstance(x.get("path", ""), str),
        "an object with a string 'path'",
        path,
        what,
        required=False,
    )
    return obj


def read_provenance(folder: str) -> dict | None:
    """The folder's validated tli_provenance.json, or None when it has none."""
    path = os.path.join(folder, "tli_provenance.json")
    if not os.path.lexists(path):
        return None
    try:
        return check_provenance(load_json(path, "provenance"), path)
    except FileNotFoundError:
        return None


# ---- file identity ----------------------------------------------------------------------------------
class FileStat(tuple):
    """(dev, ino, size, mtime_ns, ctime_ns) of an open file.

    Any write to a file, and any utime() that restores its mtime afterwards, sets its ctime to the
    current time; only the kernel sets ctime. So two equal FileStats of one inode mean the file was
    not modified in between (on file systems with fine-grained timestamps: ext4, XFS, btrfs, tmpfs).
    """

    __slots__ = ()

    def __new__(cls, st: os.stat_result):
        return super().__new__(cls, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))

    @classmethod
    def from_list(cls, values: list) -> FileStat:
        return super().__new__(cls, tuple(int(v) for v in values))

    dev = property(lambda self: self[0])
    ino = property(lambda self: self[1])
    size = property(lambda self: self[2])
    mtime_ns = property(lambda self: self[3])
    ctime_ns = property(lambda self: self[4])

    def same_file(self, other: FileStat) -> bool:
        return self[:2] == other[:2]

    def change_since(self, was: FileStat) -> str | None:
        """What differs from `was` (the same inode expected), in words; None when nothing does."""
        if not self.same_file(was):
            return "it was replaced by another file (different inode)"
        if self.size != was.size:
            return f"its size changed ({was.size} -> {self.size} bytes)"
        if self.mtime_ns != was.mtime_ns:
            return "it was modified (mtime changed)"
        if self.ctime_ns != was.ctime_ns:
            return "it was modified or its metadata changed (ctime changed, even if the mtime was put back)"
        return None
