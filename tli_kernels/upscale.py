"""`tli upscale` as a library call: open the source, plan, check, execute, finish."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from tli_kernels import __version__
from tli_kernels.checkpoint import output
from tli_kernels.checkpoint.executor_python import execute_python
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.plan import SurgeryPlan
from tli_kernels.methods import CommonOptions, make_plan

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
    shards_written: list[int]
    bytes_to_write: int
    finished: bool


def upscale(
    src: str,
    dst: str,
    method: str,
    *,
    common: CommonOptions | None = None,
    options: dict | None = None,
    engine: str = "python",
    overwrite: bool = False,
    resume: bool = False,
    part: str | None = None,
    dry_run: bool = False,
    max_memory: int = 512 << 20,
    threads: int | None = None,
    progress: bool = False,
) -> UpscaleResult:
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    part_of = parse_part(part)
    layout = CheckpointLayout.open(src)
    plan = make_plan(layout, method, common, **(options or {}))
    output.check_destination(src, dst, overwrite=overwrite, resume=resume, part=part_of is not None)
    todo = part_shards(len(plan.shards), part_of)
    continuing = (resume or part_of is not None) and output.has_marker(dst)
    if continuing:
        output.check_marker(dst, plan)
        done = output.completed_shards(dst, plan)
        todo = [i for i in todo if i not in done]
    need = output.bytes_to_write(plan, todo)
    if dry_run:
        return UpscaleResult(plan, todo, need, finished=False)
    output.check_free_disk(dst if os.path.isdir(dst) else os.path.dirname(os.path.abspath(dst)), plan, todo)
    if not continuing:
        output.begin(dst, plan, overwrite=overwrite)

    bar = _progress_bar(sum(plan.shards[i].data_bytes for i in todo), method) if progress else None
    try:
        if engine == "native":
            raise RuntimeError("--engine native: the native engine is not built in this install; use --engine python")
        execute_python(plan, layout, dst, max_memory=max_memory, shards=todo, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    finished = part_of is None
    if finished:
        output.finish(dst, plan, layout, __version__)
    return UpscaleResult(plan, todo, need, finished)


def _progress_bar(total: int, method: str):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"upscale ({method})", dynamic_ncols=True
    )
