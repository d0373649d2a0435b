"""The identity of a source folder, and the checks that it did not change under a conversion.

Two records, because they answer different questions:

- The *identity record* (`source_identity`, in the plan and hence in its digest, in
  tli_provenance.json and in the unfinished-output marker) describes content: config.json's
  sha256, each side file's sha256, and per weight file its size, the sha256 of its header and the
  sha256 of a fixed sample of its data: 4 KiB blocks at max(64, data / 64 MiB) evenly spaced
  offsets (the whole data when it is smaller than that). It is the same for every copy of the
  source, on any machine, so `--part` jobs on different nodes agree on it.
- The *stat record* (`FileStat`: device, inode, size, mtime, ctime; taken when a header is read,
  kept in the marker) describes one file on one machine. ctime is set by the kernel on every
  write and on every utime(), so an in-place edit that restores the mtime still changes it.

Checks:
1. Plan time: the identity record is computed from the files whose headers were read; each file's
   stat must still be the one its header was read with (`file_fingerprint`).
2. Before --resume: the marker's identity record must equal the one computed now (a copy edited
   elsewhere, a file replaced by a fine-tune), and for every weight file that is still the same
   inode, its stat must equal the marker's (an in-place edit, even with the mtime put back).
3. The engines: each source file is opened once per run and its stat compared with the one its
   header was read with; before each chunk that reads it and before each shard is renamed into
   place, size, mtime and ctime are compared again (executor_python.py, csrc/engine.cpp).
4. Finishing: the identity record is computed again and compared (`verify_unchanged`).

What this does not catch, and what it costs: a copy of the source that differs from the original
only between sampled blocks, and whose edit cannot be seen through ctime (a different machine, a
file system with coarse timestamps). The sample is ~50 MB of reads for Llama-3.1-405B (191
shards x 64 blocks), a few seconds on local disks; hashing every byte instead would cost a full
read of the source (812 GB) at plan time.
"""

from __future__ import annotations

import hashlib
import os

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.safetensors_format import FileHeader
from tli_kernels.checkpoint.validate import FileStat, open_regular

FINGERPRINT = "tli-source/2: sha256 of header; sha256 of 4 KiB blocks at max(64, data/64MiB) even offsets"
SAMPLE_BLOCK = 4096
SAMPLE_MIN_BLOCKS = 64
SAMPLE_SPACING = 64 << 20
_HASH_CHUNK = 1 << 20


def sample_offsets(begin: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the sampled blocks of the data region [begin, end)."""
    n = end - begin
    blocks = max(SAMPLE_MIN_BLOCKS, -(-n // SAMPLE_SPACING))
    if n <= blocks * SAMPLE_BLOCK:
        return [(begin, n)] if n > 0 else []
    return [(begin + k * (n - SAMPLE_BLOCK) // (blocks - 1), SAMPLE_BLOCK) for k in range(blocks)]


def _pread_exact(fd: int, n: int, offset: int, path: str) -> bytes:
    parts, got = [], 0
    while got < n:
        block = os.pread(fd, min(n - got, _HASH_CHUNK), offset + got)
        if not block:
            raise CheckpointError(f"file ended at byte {offset + got}, before the end its header promised", path)
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def open_source(h: FileHeader) -> tuple[int, FileStat]:
    """Open a weight file for reading; it must be the very file (same stat) whose header was read."""
    try:
        fd = open_regular(h.path, "safetensors file")
    except FileNotFoundError:
        raise CheckpointError("source file disappeared after its header was read", h.path) from None
    now = FileStat(os.fstat(fd))
    change = now.change_since(h.stat) if h.stat is not None else None
    if change is None and now.size != h.size:
        change = f"its size changed ({h.size} -> {now.size} bytes)"
    if change:
        os.close(fd)
        raise CheckpointError(f"source file changed since its header was read: {change}", h.path)
    return fd, now


def file_fingerprint(h: FileHeader) -> dict:
    """size, header sha256 and sampled-data sha256 of one weight file."""
    fd, before = open_source(h)
    try:
        head = _pread_exact(fd, h.data_start, 0, h.path)
        sample = hashlib.sha256()
        for off, n in sample_offsets(h.data_start, h.size):
            sample.update(_pread_exact(fd, n, off, h.path))
        after = FileStat(os.fstat(fd))
    except OSError as e:
        raise CheckpointError(f"cannot read source: {e.strerror or e}", h.path) from e
    finally:
        os.close(fd)
    if after != before:
        raise CheckpointError(f"source file changed while it was being read: {after.change_since(before)}", h.path)
    return {
        "size": h.size,
        "header_sha256": hashlib.sha256(head).hexdigest(),
        "sample_sha256": sample.hexdigest(),
    }


def hash_regular(path: str, what: str) -> str:
    fd = open_regular(path, what)
    try:
        digest = hashlib.sha256()
        while block := os.read(fd, _HASH_CHUNK):
            digest.update(block)
        return digest.hexdigest()
    except OSError as e:
        raise CheckpointError(f"cannot read {what}: {e.strerror or e}", path) from e
    finally:
        os.close(fd)


def source_identity(layout) -> dict:
    """The identity record of one source folder (a plan over several sources keeps one per folder)."""
    files = {name: file_fingerprint(h) for name, h in layout.files.items()}
    side = {name: hash_regular(os.path.join(layout.path, name), name) for name in layout.side_files}
    return {
        "path": layout.path,
        "fingerprint": FINGERPRINT,
        "config_sha256": hash_regular(layout.config_path, "config"),
        "files": files,
        "side_files": side,
    }


def stat_record(layout) -> dict[str, list[int]]:
    """file name -> [dev, ino, size, mtime_ns, ctime_ns] as each header was read (for the marker)."""
    return {name: list(h.stat) for name, h in layout.files.items() if h.stat is not None}


def _content_difference(recorded: dict, now: dict) -> tuple[str, str] | None:
    """(file name, what differs) between two identity records of one source folder, or None."""
    if recorded.get("fingerprint") != now.get("fingerprint"):
        return "", "it was recorded by another version of tli"
    if recorded.get("config_sha256") != now.get("config_sha256"):
        return "config.json", "its content differs"
    for kind in ("files", "side_files"):
        was, cur = recorded.get(kind) or {}, now.get(kind) or {}
        for name in sorted(set(was) | set(cur)):
            if name not in cur:
                return name, "it is gone"
            if name not in was:
                return name, "it is new"
            if was[name] != cur[name]:
                a, b = was[name], cur[name]
                if isinstance(a, dict) and isinstance(b, dict):
                    what = next((k for k in ("size", "header_sha256", "sample_sha256") if a.get(k) != b.get(k)), "")
                    words = {"size": "its size", "header_sha256": "its header", "sample_sha256": "its sampled data"}
                    return name, f"{words.get(what, 'its content')} differs"
                return name, "its content differs"
    return None


def per_source(layout, identity: dict) -> list[tuple[object, dict, dict]]:
    """(folder layout, its recorded identity, its identity as `identity` holds it) per source folder:
    one for a plain layout, one per model for a recipe's several sources (checkpoint/multi.py, whose
    identity keeps each folder's record, in order, under "sources")."""
    subs = identity.get("sources") if isinstance(identity, dict) else None
    folders = getattr(layout, "sources", None)
    if isinstance(subs, list) and folders is not None:
        return [(s.layout, sub if isinstance(sub, dict) else {}) for s, sub in zip(folders, subs)]
    return [(layout, identity)]


def check_resumable(layout, identity: dict, marker: dict, dst: str) -> None:
    """Raise ValueError naming the file when the source changed since the unfinished output in dst
    was started (marker: the validated .tli-incomplete.json)."""
    recorded = marker.get("source")
    if isinstance(recorded, dict):
        now = {id(lay): ident for lay, ident in per_source(layout, identity)}
        pairs = per_source(layout, recorded)
        if len(pairs) != len(now):
            raise ValueError(
                f"{layout.path}: {dst} was started from {len(pairs)} source folder(s), this run names {len(now)}: "
                "start again with --overwrite"
            )
        for lay, was in pairs:
            diff = _content_difference(was, now[id(lay)])
            if diff is not None:
                name, what = diff
                where = os.path.join(lay.path, name) if name else lay.path
                raise ValueError(
                    f"{where}: the source changed since {dst} was started ({what}); the shards already written "
                    "came from the old one: start again with --overwrite"
                )
    stats = marker.get("source_stat")
    if not isinstance(stats, dict):
        return
    for name, values in sorted(stats.items()):
        h = layout.files.get(name)
        if h is None or h.stat is None or not isinstance(values, list) or len(values) != 5:
            continue
        try:
            was = FileStat.from_list(values)
        except (TypeError, ValueError):
            continue
        if not h.stat.same_file(was):
            continue  # a copy (another machine, a restored backup): the content record decided
        change = h.stat.change_since(was)
        if change:
            raise ValueError(
                f"{h.path}: the source changed since {dst} was started ({change}); its sampled content still "
                "matches, but an edit between the samples cannot be ruled out, so the shards already written "
                "may not match it: start again with --overwrite"
            )


def verify_unchanged(layout, identity: dict) -> None:
    """Compute the identity record again and raise CheckpointError naming the first file that changed."""
    for lay, recorded in per_source(layout, identity):
        diff = _content_difference(recorded, source_identity(lay))
        if diff is not None:
            name, what = diff
            raise CheckpointError(
                f"source changed during the run ({what}); the output is not finished", os.path.join(lay.path, name)
            )
