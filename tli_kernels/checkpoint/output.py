"""The output folder's life cycle: checks before writing, the in-progress marker, finishing.

Protocol (the same for both executors), so that no incomplete output passes for complete:
1. DST is checked (not SRC, not inside SRC, not holding SRC; absent, empty, or --overwrite /
   --resume given) and free disk is checked, before any byte is written.
2. DST/.tli-incomplete.json is written first; it names the plan's digest.
3. Shards are written as NAME.partial, fsynced, renamed to NAME when complete.
4. Last: the index, tokenizer/generation files, tli_provenance.json, then config.json, then the
   marker is removed. Without config.json transformers refuses the folder; with the marker
   present tli refuses it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.executor_python import PARTIAL_SUFFIX, fsync_dir
from tli_kernels.checkpoint.layout import (
    CONFIG_NAME,
    INCOMPLETE_MARKER,
    INDEX_NAME,
    PROVENANCE_NAME,
    CheckpointLayout,
)
from tli_kernels.checkpoint.plan import SurgeryPlan, write_json_atomic


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


def bytes_to_write(plan: SurgeryPlan, shards: list[int]) -> int:
    """Disk the shards will take: zero tensors are holes and cost nothing."""
    total = 0
    for i in shards:
        s = plan.shards[i]
        total += s.file_size - sum(t.nbytes for t in s.tensors if t.op.kind == "zeros")
    return total


def check_free_disk(dst: str, plan: SurgeryPlan, shards: list[int]) -> None:
    need = bytes_to_write(plan, shards)
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
    fsync_dir(dst)


def completed_shards(dst: str, plan: SurgeryPlan) -> set[int]:
    """Shards already renamed into place whose size and header match the plan."""
    done = set()
    for i, shard in enumerate(plan.shards):
        path = os.path.join(dst, shard.file)
        if not os.path.isfile(path) or os.path.getsize(path) != shard.file_size:
            continue
        header = shard.header_bytes()
        with open(path, "rb") as f:
            if f.read(len(header)) == header:
                done.add(i)
    return done


def finish(dst: str, plan: SurgeryPlan, layout: CheckpointLayout, version: str) -> None:
    """Write the files that make dst a complete model folder, config.json last, then drop the marker."""
    missing = [s.file for i, s in enumerate(plan.shards) if i not in completed_shards(dst, plan)]
    if missing:
        raise RuntimeError(
            f"cannot finish {dst}: {len(missing)} shard(s) missing or incomplete (e.g. {missing[0]}); "
            "run the remaining --part jobs, or --resume"
        )
    for leftover in glob.glob(os.path.join(dst, "*" + PARTIAL_SUFFIX)):
        os.unlink(leftover)
    if len(plan.shards) > 1:
        write_json_atomic(os.path.join(dst, INDEX_NAME), plan.index_json())
    for name in plan.side_files:
        target = os.path.join(dst, name)
        shutil.copyfile(os.path.join(layout.path, name), target + ".tmp")
        os.replace(target + ".tmp", target)
    write_json_atomic(os.path.join(dst, PROVENANCE_NAME), plan.provenance(version))
    write_json_atomic(os.path.join(dst, CONFIG_NAME), plan.config)
    fsync_dir(dst)
    os.unlink(os.path.join(dst, INCOMPLETE_MARKER))
    fsync_dir(dst)


def check_complete_output(path: str) -> None:
    if os.path.exists(os.path.join(path, INCOMPLETE_MARKER)):
        raise CheckpointError("unfinished tli output (run it again with --resume)", path)
