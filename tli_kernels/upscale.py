"""`tli upscale` as a library call: open the source, plan, check, execute, finish.

Engines: "native" (the C++ streaming engine, the default when the extension is built) and
"python" (the reference). Both write the same bytes and follow the same output protocol
(tli_kernels/checkpoint/output.py), so a run started with one can be resumed with the other.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field

from tli_kernels import __version__
from tli_kernels.checkpoint import checksum, executor_native, output
from tli_kernels.checkpoint.executor_python import execute_python
from tli_kernels.checkpoint.hub import source_folders
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.outdir import OutputDir
from tli_kernels.checkpoint.plan import SurgeryPlan
from tli_kernels.methods import CommonOptions, plan_source

ENGINES = ("python", "native")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int, option: str) -> int:
    """'5GB' -> 5e9, '512MiB' -> 512 * 2**20, '1000' -> 1000."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{option} {text!r}: expected a size such as 5GB, 512MB or 1GiB")
    unit = (m.group(2) or "").lower()
    base = 2 ** (10 * "bkmgt".index(unit[0])) if unit.endswith("ib") else _UNITS[unit[:1]]
    value = int(float(m.group(1)) * base)
    if value < 1:
        raise ValueError(f"{option} {text!r}: must be positive")
    return value


def parse_part(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"--part {text!r}: expected i/n with 1 <= i <= n, e.g. 2/8")
    return int(m.group(1)), int(m.group(2))


def part_shards(num_shards: int, part: tuple[int, int] | None) -> list[int]:
    """Shards of part i of n: every n-th shard starting at i-1 (balanced, as shards are similar)."""
    if part is None:
        return list(range(num_shards))
    i, n = part
    return list(range(i - 1, num_shards, n))


@dataclass
class UpscaleResult:
    plan: SurgeryPlan
    shards_written: list[int]  # shards this call wrote (or, with dry_run, would write)
    bytes_to_write: int  # disk the written shards take (holes excluded)
    finished: bool  # the output folder is complete (index, config.json written, marker gone)
    bytes_to_read: int = 0  # source bytes read (holes excluded with the native engine)
    engine: str = ""  # the engine that ran (or would run)
    shards_verified: list[int] = field(default_factory=list)  # found finished and re-verified (resume, parts)
    layout: CheckpointLayout | None = None  # the source as read for this call


_warned_fallback = False


def resolve_engine(engine: str | None) -> str:
    """None -> native when built, else python (with a one-line warning); explicit names are checked."""
    global _warned_fallback
    if engine is None:
        if executor_native.available():
            return "native"
        if not _warned_fallback:
            print(
                "tli: warning: native engine not built (reinstall with a C++17 compiler); using the Python engine",
                file=sys.stderr,
            )
            _warned_fallback = True
        return "python"
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "native" and not executor_native.available():
        raise RuntimeError(
            f"--engine native: the native engine is not built in this install "
            f"({executor_native.unavailable_reason()}); reinstall with a C++17 compiler or use --engine python"
        )
    return engine


def upscale(
    src: str,
    dst: str,
    method: str | None,
    *,
    common: CommonOptions | None = None,
    options: dict | None = None,
    engine: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    part: str | None = None,
    dry_run: bool = False,
    max_memory: int = 512 << 20,
    threads: int | None = None,
    progress: bool = False,
    verify: str = "sample",
) -> UpscaleResult:
    """Upscale the checkpoint in src into dst (see SPEC section 2 and docs/engine.md).

    part="i/n" writes every n-th shard starting at i-1 and leaves the folder unfinished; the same
    call without part and with resume=True then re-verifies every shard, writes what is missing
    and finishes. engine=None picks native when built. verify: what each shard's checksum covers,
    "sample" (header + 4 KiB per MiB, free) or "full" (every byte; costs a read of the output).
    """
    engine = resolve_engine(engine)
    if verify not in checksum.MODES:
        raise ValueError(f"--verify {verify!r}: choose one of {', '.join(checksum.MODES)}")
    part_of = parse_part(part)
    if part_of is not None and overwrite:
        raise ValueError("--part cannot be combined with --overwrite: parts share DST (delete it first to start over)")
    if engine == "native":
        executor_native.memory_plan(max_memory, threads)  # reject a bad budget before anything is written
    layout, plan = plan_source(src, method, common, options)  # a folder, a Hub id or a recipe file
    check_numbers(plan)
    todo = part_shards(len(plan.shards), part_of)
    if dry_run:  # reads only: no lock
        return _survey(src, dst, plan, layout, todo, engine, overwrite, resume, part_of, max_memory, threads, verify)
    _check_destination(src, dst, layout, overwrite, resume, part_of)  # early, before DST is made
    out, made = _open_locked(dst, part_of is not None)
    made = made and part_of is None  # parts share a folder another part may be about to write into
    shard_locks = -1
    try:
        if part_of is not None:  # before anything is verified: the shards this part may write are its own
            shard_locks = out.lock_shards(todo, [plan.shards[i].file for i in todo])
        # Under the lock, no other run changes DST: look at it again and decide what to write.
        result = _survey(src, dst, plan, layout, todo, engine, overwrite, resume, part_of, max_memory, threads,
                         verify, out=out)  # fmt: skip
        todo, verified = result.shards_written, set(result.shards_verified)
        output.check_free_disk(dst, plan, todo, result.bytes_to_write)
        if (resume or part_of is not None) and output.has_marker(dst):
            output.remove_partials(out, plan, todo)
        else:
            output.begin(out, plan, overwrite=overwrite, layout=layout)
        made = False  # DST now holds the run's marker: it stays
        out.subdir(output.SHARDS_DIR).close()
        bar = _progress_bar(sum(plan.shards[i].data_bytes for i in todo), plan.method) if progress else None
        try:
            _execute(engine, plan, layout, out, todo, max_memory, threads, bar.update if bar else None, verify)
        finally:
            if bar:
                bar.close()
        result.finished = part_of is None
        if result.finished:
            output.finish(out, plan, layout, __version__, verified=verified | set(todo))
    finally:
        if shard_locks >= 0:
            os.close(shard_locks)
        if made:  # a folder this call made and wrote nothing into (a check failed under the lock)
            try:
                os.rmdir(dst)
            except OSError:
                pass
        out.close()
    return result


def _check_destination(src, dst, layout, overwrite, resume, part_of) -> None:
    for folder in source_folders(layout):
        output.check_destination(
            folder, dst, overwrite=overwrite, resume=resume, part=part_of is not None, layout=layout
        )


def _survey(src, dst, plan, layout, todo, engine, overwrite, resume, part_of, max_memory, threads, verify,
            out: OutputDir | None = None) -> UpscaleResult:  # fmt: skip
    """What the run would write: DST checked, finished shards (resume, parts) verified and dropped from todo."""
    _check_destination(src, dst, layout, overwrite, resume, part_of)
    continuing = (resume or part_of is not None) and output.has_marker(dst)
    verified: set[int] = set()
    if continuing:
        output.check_marker(dst, plan, layout)
        verified = output.completed_shards(
            out or dst, plan, todo, max_memory=max_memory, threads=threads, require=verify
        )
        todo = [i for i in todo if i not in verified]
    sparse = engine == "native"
    need = output.bytes_to_write(plan, todo, layout if sparse else None)
    read = output.bytes_to_read(plan, todo, layout, sparse)
    return UpscaleResult(
        plan, todo, need, False, bytes_to_read=read, engine=engine, shards_verified=sorted(verified), layout=layout
    )


def _open_locked(dst: str, part: bool) -> tuple[OutputDir, bool]:
    """DST opened (created if absent) and locked: exclusively, or shared by --part runs. Returns it and
    whether this call created the folder. Raises naming the holder when another run writes DST."""
    made = False
    if not os.path.lexists(dst):
        try:
            os.mkdir(dst, 0o755)
            made = True
        except FileExistsError:
            pass  # another run made it first: the lock decides
        except OSError as e:
            raise OSError(e.errno, f"cannot create the output folder: {e.strerror}", os.path.abspath(dst)) from None
    out = OutputDir(dst)
    try:
        out.lock(shared=part)
    except BaseException:
        out.close()
        if made:
            try:
                os.rmdir(dst)
            except OSError:
                pass
        raise
    return out, made


def check_numbers(plan: SurgeryPlan) -> None:
    """Refuse op constants that float32 cannot hold (the executors compute in float32): they would
    write inf or NaN weights into an output that looks finished. Overflow that depends on the
    weights themselves (a finite but large --alpha, a narrow --dtype) is caught by the executors,
    element by element (executor_python.overflow_message). The message names what set the constant:
    --alpha, a recipe's scale, or the config's initializer_range."""
    recipe = plan.method == "recipe"
    for t in plan.tensors():
        op = t.op
        if op.kind in ("scale", "average", "dequant") and not _fits_f32(op.factor):
            what = f"scale {op.factor:g} (the recipe's parameters)" if recipe else f"--alpha {op.factor:g}"
            raise ValueError(
                f"{what}: float32 cannot hold it (largest finite float32 {F32_MAX:.4g}); {t.name} would be inf or NaN"
            )
        if op.kind == "fill" and not _fits_f32(op.value):
            raise ValueError(f"{t.name}: fill value {op.value:g} is not a finite float32")
        if op.kind == "uniform" and not _fits_f32(op.bound):
            init_range = (plan.config or {}).get("initializer_range")
            if isinstance(init_range, (int, float)) and not _fits_f32(float(init_range) * math.sqrt(3)):
                fix = f"the config's initializer_range {init_range:g} is too large: correct it in config.json"
            else:
                fix = "use a smaller --alpha"
            raise ValueError(
                f"{t.name}: random init bound {op.bound:g} (initializer_range x sqrt(3) x --alpha) is beyond "
                f"float32 (largest {F32_MAX:.4g}); {fix}"
            )


F32_MAX = 3.4028234663852886e38


def _fits_f32(x: float) -> bool:
    """x is finite and rounds to a finite float32 (round-to-nearest: up to F32_MAX + half an ulp)."""
    return math.isfinite(x) and abs(x) < 3.4028235677973366e38


def _execute(engine, plan, layout, out: OutputDir, todo, max_memory, threads, progress, verify) -> None:
    if not todo:
        return
    digest = plan.digest()
    if engine == "native":
        sidecar = lambda i: (  # noqa: E731
            output.sidecar_path(out.path, plan.shards[i].file),
            output.sidecar_template(plan, i, verify, digest),
        )
        executor_native.execute_native(
            plan,
            layout,
            out,
            max_memory=max_memory,
            shards=todo,
            threads=threads,
            progress=progress,
            sidecar=sidecar,
            checksum=verify,
        )
        return

    def record(i: int) -> None:  # each shard gets its sidecar as soon as it is in place
        path = out.join(plan.shards[i].file)
        (recorded,) = checksum.checksum_files([(path, plan.shards[i].file_size)], verify, max_memory=max_memory)
        output.record_shard(out, plan, i, recorded, digest)

    execute_python(plan, layout, out, max_memory=max_memory, shards=todo, progress=progress, on_shard=record)


def _progress_bar(total: int, method: str):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=f"upscale ({method})", dynamic_ncols=True
    )
