"""The output folder's life cycle: checks before writing, the in-progress marker, finishing.

Protocol (the same for both executors), so that no incomplete output passes for complete:
1. DST is checked (not SRC, not inside SRC, not holding SRC, holding none of the files the source
   uses through links; absent, empty, or --overwrite / --resume given) and free disk is checked,
   before any byte is written. --overwrite never deletes through a symbolic link.
2. DST/.tli-incomplete.json is written first; it names the plan's digest, the source's identity
   record and each source file's stat (sources.py), so --resume can tell a changed source.
3. Shards are written as NAME.partial, fsynced, renamed to NAME when complete. Each finished shard
   gets a sidecar DST/.tli-shards/NAME.json with its size, header hash, the plan digest and a
   content checksum (checksum.py: sampled by default, every byte with verify="full"), written
   before the rename by the native engine and right after it by the Python one.
4. Finishing: the source is fingerprinted again; the sidecars' records move into the marker, the
   sidecars, stale temporary files and .partial files are removed; then the index, side files,
   tli_provenance.json and config.json are written; the marker is removed last. Without
   config.json transformers refuses the folder; with the marker present tli refuses it; after the
   marker is gone nothing of tli's bookkeeping is left in the folder.
Every file is written through outdir.OutputDir: by name inside DST, never through a link.
--resume (and every --part run) trusts a shard only when its file, header, record and recomputed
checksum all agree; anything else is written again. docs/engine.md has the whole story.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import sys
import time

from tli_kernels.checkpoint import checksum as checksum_def
from tli_kernels.checkpoint import sources
from tli_kernels.checkpoint.checksum import data_extents
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.executor_python import PARTIAL_SUFFIX
from tli_kernels.checkpoint.layout import (
    CONFIG_NAME,
    INCOMPLETE_MARKER,
    INDEX_NAME,
    PROVENANCE_NAME,
    CheckpointLayout,
)
from tli_kernels.checkpoint.model_card import CARD_NAME, model_card
from tli_kernels.checkpoint.outdir import OutputDir
from tli_kernels.checkpoint.plan import OutTensor, SurgeryPlan
from tli_kernels.checkpoint.validate import check_marker as check_marker_json
from tli_kernels.checkpoint.validate import open_regular, parse_json

SHARDS_DIR = ".tli-shards"
CHECKSUM_PLACEHOLDER = "@CHECKSUM@"
# Temporary names tli itself creates (OutputDir: NAME.tmp-PID; the native engine's sidecars: NAME.tmp).
_TMP_NAME = re.compile(r"^.+\.tmp(-\d+)?$")


def _inside(child: str, parent: str) -> bool:
    return os.path.commonpath([child, parent]) == parent


def source_paths(layout: CheckpointLayout) -> list[str]:
    """Every file the source uses: config, index, weights, side files (as named in the source folder)."""
    paths = [layout.config_path, *(h.path for h in layout.files.values())]
    paths += [os.path.join(layout.path, f) for f in layout.side_files]
    if os.path.lexists(os.path.join(layout.path, INDEX_NAME)):
        paths.append(os.path.join(layout.path, INDEX_NAME))
    return paths


def check_destination(
    src: str, dst: str, *, overwrite: bool, resume: bool, part: bool = False, layout: CheckpointLayout | None = None
) -> None:
    """Raise ValueError if writing dst is unsafe or not what the user asked for. Writes nothing.

    With `layout`, also refuses a DST that holds (through links) any file the source uses: a shard
    renamed over it, or --overwrite, would destroy the source's data.
    """
    rs, rd = os.path.realpath(src), os.path.realpath(dst)
    if rd == rs:
        raise ValueError(f"DST {dst} is the source folder; choose a new folder")
    if _inside(rd, rs):
        raise ValueError(f"DST {dst} is inside the source folder {src}; choose a folder outside it")
    if _inside(rs, rd):
        raise ValueError(f"DST {dst} contains the source folder {src}; choose another folder")
    if layout is not None:
        for p in source_paths(layout):
            real = os.path.realpath(p)
            if _inside(real, rd):
                raise ValueError(
                    f"the source file {p} is a link to {real}, inside DST {dst}: writing DST would destroy the "
                    "source's data; choose another DST (or copy the source's files out of it first)"
                )
    link = os.path.islink(dst)
    if link and not os.path.exists(dst):
        raise ValueError(f"DST {dst} is a symbolic link to {os.readlink(dst)!r}, which does not exist")
    if not os.path.exists(dst):
        parent = os.path.dirname(os.path.abspath(dst))
        if not os.path.isdir(parent):
            raise ValueError(f"DST's parent folder {parent} does not exist")
        if resume:
            raise ValueError(f"--resume: {dst} does not exist, nothing to resume")
        return
    if not os.path.isdir(dst):
        raise ValueError(f"DST {dst} exists and is not a folder")
    marker = os.path.join(dst, INCOMPLETE_MARKER)
    if resume or part:
        if os.path.lexists(marker):
            return
        if part and all(n.startswith(INCOMPLETE_MARKER) or n == SHARDS_DIR for n in os.listdir(dst)):
            return  # another part is creating the marker right now (its temporary file is all there is)
        if resume:
            raise ValueError(f"--resume: {dst} holds no unfinished tli output ({INCOMPLETE_MARKER} missing)")
    if not [n for n in os.listdir(dst) if not n.startswith(INCOMPLETE_MARKER + ".tmp-") and n != SHARDS_DIR]:
        return  # empty, or a run killed while writing its marker left only the temporary file (and sidecar folder)
    if not overwrite:
        raise ValueError(f"DST {dst} already exists; pass --overwrite to replace it (or --resume to finish it)")
    if link:
        raise ValueError(
            f"--overwrite refused: DST {dst} is a symbolic link (to {rd}); tli does not delete through links: "
            "give the folder itself, or delete it yourself if you mean it"
        )
    if not _looks_like_model_folder(dst):
        raise ValueError(
            f"--overwrite refused: {dst} is not empty and does not look like a model folder "
            "(no config.json, *.safetensors or tli marker); delete it yourself if you mean it"
        )


def _looks_like_model_folder(path: str) -> bool:
    return any(os.path.lexists(os.path.join(path, f)) for f in (CONFIG_NAME, INCOMPLETE_MARKER, INDEX_NAME)) or bool(
        glob.glob(os.path.join(path, "*.safetensors"))
    )


def free_bytes(path: str) -> int:
    st = os.statvfs(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    return st.f_bavail * st.f_frsize


def bytes_to_write(plan: SurgeryPlan, shards: list[int], layout: CheckpointLayout | None = None) -> int:
    """Disk the shards will take: zero tensors are holes and cost nothing.

    With `layout` (the native engine, which skips source holes), source holes cost nothing either;
    each data extent is charged two extra blocks for its unaligned ends.
    """
    extents = SourceExtents(layout) if layout is not None else None
    total = 0
    for i in shards:
        s = plan.shards[i]
        total += s.file_size - sum(t.nbytes for t in s.tensors if t.op.kind == "zeros")
        if extents is not None:
            total -= sum(t.nbytes - extents.output_data_bytes(t) for t in s.tensors if t.op.kind != "zeros")
    return total


def bytes_to_read(plan: SurgeryPlan, shards: list[int], layout: CheckpointLayout, sparse: bool) -> int:
    """Source bytes the shards read (once per use); with `sparse`, holes are not read."""
    extents = SourceExtents(layout) if sparse else None
    total = 0
    for i in shards:
        for t in plan.shards[i].tensors:
            for name in t.op.src:
                e = layout.tensors[name]
                total += extents.data_bytes(e.file, e.offset, e.nbytes) if extents else e.nbytes
    return total


class SourceExtents:
    """Where the source files hold data (SEEK_DATA / SEEK_HOLE), to price sparse output."""

    BLOCK = 4096
    TRANSFORM_CHUNK = 8 << 20  # the native engine's largest transform chunk, in output bytes

    def __init__(self, layout: CheckpointLayout):
        self.layout = layout
        self._cache: dict[str, list[tuple[int, int]]] = {}

    def extents(self, path: str) -> list[tuple[int, int]]:
        if path not in self._cache:
            fd = open_regular(path, "safetensors file")
            try:
                self._cache[path] = list(data_extents(fd, 0, os.fstat(fd).st_size))
            finally:
                os.close(fd)
        return self._cache[path]

    def data_bytes(self, path: str, begin: int, n: int) -> int:
        end, total = begin + n, 0
        for d, h in self.extents(path):
            if h > begin and d < end:
                total += min(h, end) - max(d, begin)
        return total

    def pieces(self, path: str, begin: int, n: int) -> list[tuple[int, int]]:
        return [(d, h) for d, h in self.extents(path) if h > begin and d < begin + n]

    def output_data_bytes(self, t: OutTensor) -> int:
        """Upper bound on the bytes of tensor t the native engine writes as data."""
        if t.op.kind in ("fill", "uniform", "dequant"):  # the engine computes every dequant chunk
            return t.nbytes
        sources = [self.layout.tensors[n] for n in t.op.src]
        if t.op.kind == "copy" and sources[0].dtype == t.dtype:
            e = sources[0]
            pieces = self.pieces(e.file, e.offset, e.nbytes)
            return min(t.nbytes, self.data_bytes(e.file, e.offset, e.nbytes) + 2 * self.BLOCK * len(pieces))
        if t.op.kind != "copy" and math.copysign(1.0, t.op.factor) < 0:
            return t.nbytes  # 0 * -f = -0.0: even holes become data
        # A transform chunk is written unless all its sources are holes there: price each source's
        # data at the output's width, plus one whole chunk per data extent for the chunk edges.
        total = 0
        for e in sources:
            width = t.nbytes / max(e.nbytes, 1)
            pieces = self.pieces(e.file, e.offset, e.nbytes)
            total += int(self.data_bytes(e.file, e.offset, e.nbytes) * width) + self.TRANSFORM_CHUNK * len(pieces)
        return min(t.nbytes, total)


def check_free_disk(dst: str, plan: SurgeryPlan, shards: list[int], need: int | None = None) -> None:
    """Raise unless the file system DST is (or will be) on has `need` bytes free; names DST."""
    need = bytes_to_write(plan, shards) if need is None else need
    have = free_bytes(dst if os.path.isdir(dst) else os.path.dirname(os.path.abspath(dst)))
    if need > have:
        raise ValueError(
            f"not enough free disk for {dst}: the output needs {_size(need)}, the file system has {_size(have)} free"
        )


def _size(n: int) -> str:
    """Bytes in the largest unit that keeps a digit before the point, with the exact count."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n} bytes)"
    return f"{n} bytes"


# ---- the unfinished-output marker ------------------------------------------------------------------
def has_marker(dst: str) -> bool:
    return os.path.lexists(os.path.join(dst, INCOMPLETE_MARKER))


def read_marker(dst: str | OutputDir) -> dict:
    """The validated marker (validate.check_marker); CheckpointError naming it when damaged."""
    out = OutputDir(dst) if isinstance(dst, str) else dst
    try:
        path = out.join(INCOMPLETE_MARKER)
        raw = out.read_bytes(INCOMPLETE_MARKER)
        return check_marker_json(parse_json(raw, path, "unfinished-output marker"), path)
    finally:
        if out is not dst:
            out.close()


def check_marker(dst: str, plan: SurgeryPlan, layout: CheckpointLayout | None = None) -> dict:
    """Raise unless the unfinished output in dst was started by this same plan from this same source
    (sources.check_resumable: content record, and the stat of every file that is still the same
    inode). Returns the marker."""
    marker = read_marker(dst)
    if layout is not None:
        sources.check_resumable(layout, plan.source, marker, dst)
    recorded = marker["plan_sha256"]
    if recorded != plan.digest():
        raise ValueError(
            f"{dst} was started with different options or source (plan {recorded[:12]}, now "
            f"{plan.digest()[:12]}); rerun with the original options, or use --overwrite to start again"
        )
    return marker


def begin(
    dst: str | OutputDir, plan: SurgeryPlan, *, overwrite: bool, layout: CheckpointLayout | None = None
) -> OutputDir:
    """Mark dst incomplete (emptying it first with overwrite). Call after check_destination, with the
    folder opened and locked (OutputDir.lock); a path is opened (created if absent) here.

    Returns the open output folder (close it when done)."""
    out = OutputDir(dst, create=True) if isinstance(dst, str) else dst
    try:
        if overwrite and out.listdir():
            out.clear()  # the folder itself stays (and stays locked); links inside are removed, never followed
        marker = {
            "plan_sha256": plan.digest(),
            "method": plan.method,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": plan.source,
        }
        if layout is not None:
            marker["source_stat"] = sources.stat_record(layout)
        out.write_json_atomic(INCOMPLETE_MARKER, marker)
        out.subdir(SHARDS_DIR).close()
        out.fsync()
    except BaseException:
        if out is not dst:
            out.close()
        raise
    return out


# ---- per-shard sidecars and checksums ------------------------------------------------------------
def sidecar_path(dst: str, shard_file: str) -> str:
    return os.path.join(dst, SHARDS_DIR, shard_file + ".json")


def sidecar_record(plan: SurgeryPlan, i: int, checksum: str, digest: str | None = None) -> dict:
    shard = plan.shards[i]
    return {
        "file": shard.file,
        "size": shard.file_size,
        "header_sha256": hashlib.sha256(shard.header_bytes()).hexdigest(),
        "plan_sha256": digest or plan.digest(),
        "checksum": checksum,
    }


def sidecar_template(plan: SurgeryPlan, i: int, mode: str = "sample", digest: str | None = None) -> str:
    """The sidecar of shard i as text, with CHECKSUM_PLACEHOLDER where the engine puts the hex digits."""
    record = sidecar_record(plan, i, checksum_def.label(mode, CHECKSUM_PLACEHOLDER), digest)
    return json.dumps(record, indent=2) + "\n"


def record_shard(dst: str | OutputDir, plan: SurgeryPlan, i: int, checksum: str, digest: str | None = None) -> None:
    """Write shard i's sidecar; checksum is labelled (checksum.label)."""
    out = OutputDir(dst) if isinstance(dst, str) else dst
    try:
        with out.subdir(SHARDS_DIR) as side:
            side.write_json_atomic(plan.shards[i].file + ".json", sidecar_record(plan, i, checksum, digest))
    finally:
        if out is not dst:
            out.close()


def _read_record(folder: OutputDir, name: str) -> object:
    try:
        return json.loads(folder.read_bytes(name, limit=1 << 20))
    except (OSError, ValueError):
        return None


def _shard_records(out: OutputDir) -> dict[str, object]:
    """shard file -> its record: the sidecar, else the copy finish() put into the marker."""
    records: dict[str, object] = {}
    try:
        marker = read_marker(out)
        records.update(marker.get("finished_shards") or {})
    except (OSError, ValueError):
        pass
    if out.lstat(SHARDS_DIR) is not None:
        try:
            with out.subdir(SHARDS_DIR, create=False) as side:
                for name in side.listdir():
                    if name.endswith(".json"):
                        record = _read_record(side, name)
                        if record is not None:
                            records[name[: -len(".json")]] = record
        except (OSError, ValueError):
            pass
    return records


def completed_shards(
    dst: str | OutputDir,
    plan: SurgeryPlan,
    candidates: list[int] | None = None,
    *,
    verify: bool = True,
    max_memory: int = 512 << 20,
    threads: int | None = None,
    require: str = "sample",
) -> set[int]:
    """Shards (of candidates, default all) already finished: regular files (not links) renamed into
    place with the plan's size and header, and a record of this plan whose checksum matches the
    file's content (re-read, with the coverage the record names, when verify). require="full"
    trusts only shards recorded with a full checksum (the others are written again). A shard whose
    record fails the checksum is reported on stderr; none of the failing shards is counted."""
    out = OutputDir(dst) if isinstance(dst, str) else dst
    try:
        return _completed_shards(out, plan, candidates, verify, max_memory, threads, require)
    finally:
        if out is not dst:
            out.close()


def _completed_shards(out, plan, candidates, verify, max_memory, threads, require) -> set[int]:
    digest = plan.digest()
    records = _shard_records(out)
    found: list[tuple[int, str, str]] = []  # (shard, path, recorded checksum)
    for i in range(len(plan.shards)) if candidates is None else candidates:
        shard = plan.shards[i]
        st = out.lstat(shard.file)
        if st is None or not out.is_regular(shard.file) or st.st_size != shard.file_size:
            continue
        header = shard.header_bytes()
        fd = out.open_read(shard.file)
        try:
            if os.pread(fd, len(header), 0) != header:
                continue
        finally:
            os.close(fd)
        record = records.get(shard.file)
        if not isinstance(record, dict) or record != sidecar_record(plan, i, record.get("checksum"), digest):
            continue  # finished before its sidecar landed (Python engine) or never finished: redo
        parsed = checksum_def.parse(record["checksum"])
        if parsed is None:
            continue  # e.g. "none": written without a checksum, nothing to verify it by
        if require == "full" and parsed[0] != "full":
            print(
                f"tli: {out.join(shard.file)}: recorded with a sampled checksum; --verify full writes it again",
                file=sys.stderr,
            )
            continue
        found.append((i, out.join(shard.file), record["checksum"]))
    if not verify or not found:
        return {i for i, _, _ in found}
    now_by_shard: dict[int, str] = {}
    for mode in checksum_def.MODES:
        group = [(i, p) for i, p, r in found if checksum_def.parse(r)[0] == mode]
        files = [(p, plan.shards[i].file_size) for i, p in group]
        sums = checksum_def.checksum_files(files, mode, max_memory=max_memory, threads=threads)
        now_by_shard.update({i: s for (i, _), s in zip(group, sums)})
    done = set()
    for i, path, recorded in found:
        now = now_by_shard[i]
        if now == recorded:
            done.add(i)
        else:
            print(
                f"tli: {path}: content does not match the checksum recorded when it was written; rewriting it",
                file=sys.stderr,
            )
    return done


def remove_partials(dst: str | OutputDir, plan: SurgeryPlan, shards: list[int]) -> None:
    """Delete leftovers of an interrupted run for these shards (other parts' files are not touched)."""
    out = OutputDir(dst) if isinstance(dst, str) else dst
    try:
        for i in shards:
            out.unlink(plan.shards[i].file + PARTIAL_SUFFIX)
    finally:
        if out is not dst:
            out.close()


def finish(
    dst: str | OutputDir,
    plan: SurgeryPlan,
    layout: CheckpointLayout,
    version: str,
    verified: set[int] | None = None,
) -> None:
    """Write the files that make dst a complete model folder, config.json last, then drop the marker.

    Shards in `verified` (written or checked by this run) are trusted; the others must pass
    completed_shards (checksum re-read) first. A kill anywhere in here leaves the marker (so the
    folder is refused and --resume finishes it) or a complete folder with nothing else in it.
    """
    out = OutputDir(dst) if isinstance(dst, str) else dst
    try:
        _finish(out, plan, layout, version, set(verified or ()))
    finally:
        if out is not dst:
            out.close()


def _finish(out: OutputDir, plan: SurgeryPlan, layout: CheckpointLayout, version: str, verified: set[int]) -> None:
    rest = [i for i in range(len(plan.shards)) if i not in verified]
    done = verified | (completed_shards(out, plan, rest) if rest else set())
    missing = [s.file for i, s in enumerate(plan.shards) if i not in done]
    if missing:
        raise RuntimeError(
            f"cannot finish {out.path}: {len(missing)} shard(s) missing or incomplete (e.g. {missing[0]}); "
            "run the remaining --part jobs, or --resume"
        )
    # The output is only as good as the source was for the whole run (sources.py, check 4).
    sources.verify_unchanged(layout, plan.source)
    # 1. The shards' records move into the marker, so the sidecar folder can go before anything
    #    that makes the folder look finished (a crash after this still resumes without rewriting).
    marker = read_marker(out)
    records = _shard_records(out)
    marker["finished_shards"] = {s.file: records[s.file] for s in plan.shards if s.file in records}
    out.write_json_atomic(INCOMPLETE_MARKER, marker)
    # 2. tli's leftovers: sidecars, .partial files and temporary files of earlier, killed runs.
    out.rmtree(SHARDS_DIR)
    for name in out.listdir():
        if name != INCOMPLETE_MARKER and (name.endswith(PARTIAL_SUFFIX) or _TMP_NAME.match(name)):
            out.unlink(name)
    # 3. What makes it a model folder, config.json last.
    if len(plan.shards) > 1:
        out.write_json_atomic(INDEX_NAME, plan.index_json())
    side_hashes = plan.source.get("side_files") or {}
    for name in plan.side_files:
        out.copy_in(name, os.path.join(layout.path, name), side_hashes.get(name))
    out.write_atomic(CARD_NAME, model_card(plan, layout, version).encode())  # README.md, the Hub's front matter
    out.write_json_atomic(PROVENANCE_NAME, plan.provenance(version))
    out.write_json_atomic(CONFIG_NAME, plan.config)
    out.fsync()
    # 4. The marker last: from here on tli accepts the folder too.
    out.unlink(INCOMPLETE_MARKER)
    out.fsync()


def check_complete_output(path: str) -> None:
    if os.path.lexists(os.path.join(path, INCOMPLETE_MARKER)):
        raise CheckpointError("unfinished tli output (run it again with --resume)", path)
