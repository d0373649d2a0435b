"""The output folder's life cycle: checks before writing, the in-progress marker, finishing.

Protocol (the same for both executors), so that no incomplete output passes for complete:
1. DST is checked (not SRC, not inside SRC, not holding SRC; absent, empty, or --overwrite /
   --resume given) and free disk is checked, before any byte is written.
2. DST/.tli-incomplete.json is written first; it names the plan's digest.
3. Shards are written as NAME.partial, fsynced, renamed to NAME when complete. Each finished shard
   gets a sidecar DST/.tli-shards/NAME.json with its size, header hash, the plan digest and a
   content checksum (checksum.py: sampled by default, every byte with verify="full"), written
   before the rename by the native engine and right after it by the Python one.
4. Last: the index, tokenizer/generation files, tli_provenance.json, then config.json, then the
   marker is removed (and the sidecars with it). Without config.json transformers refuses the
   folder; with the marker present tli refuses it.
--resume (and every --part run) trusts a shard only when its file, header, sidecar and recomputed
checksum all agree; anything else is written again. docs/engine.md has the whole story.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time

from tli_kernels.checkpoint import checksum as checksum_def
from tli_kernels.checkpoint.checksum import data_extents
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.executor_python import PARTIAL_SUFFIX, fsync_dir
from tli_kernels.checkpoint.layout import (
    CONFIG_NAME,
    INCOMPLETE_MARKER,
    INDEX_NAME,
    PROVENANCE_NAME,
    CheckpointLayout,
)
from tli_kernels.checkpoint.model_card import write_model_card
from tli_kernels.checkpoint.plan import OutTensor, SurgeryPlan, write_json_atomic

SHARDS_DIR = ".tli-shards"
CHECKSUM_PLACEHOLDER = "@CHECKSUM@"


def _inside(child: str, parent: str) -> bool:
    return os.path.commonpath([child, parent]) == parent


def check_destination(src: str, dst: str, *, overwrite: bool, resume: bool, part: bool = False) -> None:
    """Raise ValueError if writing dst is unsafe or not what the user asked for. Writes nothing."""
    rs, rd = os.path.realpath(src), os.path.realpath(dst)
    if rd == rs:
        raise ValueError(f"DST {dst} is the source folder; choose a new folder")
    if _inside(rd, rs):
        raise ValueError(f"DST {dst} is inside the source folder {src}; choose a folder outside it")
    if _inside(rs, rd):
        raise ValueError(f"DST {dst} contains the source folder {src}; choose another folder")
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
        if os.path.exists(marker):
            return
        if part and all(n.startswith(INCOMPLETE_MARKER) for n in os.listdir(dst)):
            return  # another part is creating the marker right now (its temporary file is all there is)
        if resume:
            raise ValueError(f"--resume: {dst} holds no unfinished tli output ({INCOMPLETE_MARKER} missing)")
    if not os.listdir(dst):
        return
    if not overwrite:
        raise ValueError(f"DST {dst} already exists; pass --overwrite to replace it (or --resume to finish it)")
    if not _looks_like_model_folder(dst):
        raise ValueError(
            f"--overwrite refused: {dst} is not empty and does not look like a model folder "
            "(no config.json, *.safetensors or tli marker); delete it yourself if you mean it"
        )


def _looks_like_model_folder(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in (CONFIG_NAME, INCOMPLETE_MARKER, INDEX_NAME)) or bool(
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
            with open(path, "rb") as f:
                self._cache[path] = list(data_extents(f.fileno(), 0, os.fstat(f.fileno()).st_size))
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
        if t.op.kind in ("fill", "uniform"):
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
    need = bytes_to_write(plan, shards) if need is None else need
    have = free_bytes(dst)
    if need > have:
        raise ValueError(
            f"not enough free disk for {dst}: the output needs {_gb(need)}, the file system has {_gb(have)} free"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def has_marker(dst: str) -> bool:
    return os.path.exists(os.path.join(dst, INCOMPLETE_MARKER))


def check_marker(dst: str, plan: SurgeryPlan) -> None:
    """Raise unless the unfinished output in dst was started by this same plan."""
    with open(os.path.join(dst, INCOMPLETE_MARKER), encoding="utf-8") as f:
        recorded = json.load(f).get("plan_sha256")
    if recorded != plan.digest():
        raise ValueError(
            f"{dst} was started with different options or source (plan {str(recorded)[:12]}, now "
            f"{plan.digest()[:12]}); rerun with the original options, or use --overwrite to start again"
        )


def begin(dst: str, plan: SurgeryPlan, *, overwrite: bool) -> None:
    """Create dst (replacing it with overwrite) and mark it incomplete. Call after check_destination."""
    if os.path.exists(dst) and os.listdir(dst) and overwrite:
        shutil.rmtree(dst)
    os.makedirs(dst, exist_ok=True)
    write_json_atomic(
        os.path.join(dst, INCOMPLETE_MARKER),
        {"plan_sha256": plan.digest(), "method": plan.method, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )
    os.makedirs(os.path.join(dst, SHARDS_DIR), exist_ok=True)
    fsync_dir(dst)


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


def record_shard(dst: str, plan: SurgeryPlan, i: int, checksum: str, digest: str | None = None) -> None:
    """Write shard i's sidecar; checksum is labelled (checksum.label)."""
    path = sidecar_path(dst, plan.shards[i].file)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(sidecar_record(plan, i, checksum, digest), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def completed_shards(
    dst: str,
    plan: SurgeryPlan,
    candidates: list[int] | None = None,
    *,
    verify: bool = True,
    max_memory: int = 512 << 20,
    threads: int | None = None,
) -> set[int]:
    """Shards (of candidates, default all) already finished: renamed into place with the plan's size
    and header, and a sidecar of this plan whose checksum matches the file's content (re-read, with
    the coverage the sidecar records, when verify). A shard with a sidecar that fails the checksum
    is reported on stderr; none of the failing shards is counted."""
    digest = plan.digest()
    found: list[tuple[int, str, str]] = []  # (shard, path, recorded checksum)
    for i in range(len(plan.shards)) if candidates is None else candidates:
        shard = plan.shards[i]
        path = os.path.join(dst, shard.file)
        if not os.path.isfile(path) or os.path.getsize(path) != shard.file_size:
            continue
        header = shard.header_bytes()
        with open(path, "rb") as f:
            if f.read(len(header)) != header:
                continue
        try:
            with open(sidecar_path(dst, shard.file), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue  # finished before its sidecar landed (Python engine) or never finished: redo
        if not isinstance(record, dict) or record != sidecar_record(plan, i, record.get("checksum"), digest):
            continue
        if checksum_def.parse(record["checksum"]) is None:
            continue  # e.g. "none": written without a checksum, nothing to verify it by
        found.append((i, path, record["checksum"]))
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


def remove_partials(dst: str, plan: SurgeryPlan, shards: list[int]) -> None:
    """Delete leftovers of an interrupted run for these shards (other parts' files are not touched)."""
    for i in shards:
        path = os.path.join(dst, plan.shards[i].file) + PARTIAL_SUFFIX
        if os.path.exists(path):
            os.unlink(path)


def finish(
    dst: str, plan: SurgeryPlan, layout: CheckpointLayout, version: str, verified: set[int] | None = None
) -> None:
    """Write the files that make dst a complete model folder, config.json last, then drop the marker.

    Shards in `verified` (written or checked by this run) are trusted; the others must pass
    completed_shards (checksum re-read) first.
    """
    verified = set(verified or ())
    rest = [i for i in range(len(plan.shards)) if i not in verified]
    done = verified | (completed_shards(dst, plan, rest) if rest else set())
    missing = [s.file for i, s in enumerate(plan.shards) if i not in done]
    if missing:
        raise RuntimeError(
            f"cannot finish {dst}: {len(missing)} shard(s) missing or incomplete (e.g. {missing[0]}); "
            "run the remaining --part jobs, or --resume"
        )
    for pattern in ("*" + PARTIAL_SUFFIX, "*.tmp", "*.tmp-*"):  # and what an interrupted finish() left
        for leftover in glob.glob(os.path.join(dst, pattern)):
            os.unlink(leftover)
    if len(plan.shards) > 1:
        write_json_atomic(os.path.join(dst, INDEX_NAME), plan.index_json())
    for name in plan.side_files:
        target = os.path.join(dst, name)
        shutil.copyfile(os.path.join(layout.path, name), target + ".tmp")
        os.replace(target + ".tmp", target)
    write_model_card(dst, plan, layout, version)  # README.md with the Hub's front matter (model_card.py)
    write_json_atomic(os.path.join(dst, PROVENANCE_NAME), plan.provenance(version))
    write_json_atomic(os.path.join(dst, CONFIG_NAME), plan.config)
    fsync_dir(dst)
    os.unlink(os.path.join(dst, INCOMPLETE_MARKER))
    fsync_dir(dst)
    # After the marker: a crash before this point must still find the sidecars on --resume.
    shutil.rmtree(os.path.join(dst, SHARDS_DIR), ignore_errors=True)


def check_complete_output(path: str) -> None:
    if os.path.exists(os.path.join(path, INCOMPLETE_MARKER)):
        raise CheckpointError("unfinished tli output (run it again with --resume)", path)
