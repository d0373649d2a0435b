"""Conversion at a small size: the native engine and the Python engine (library calls, each in a fresh
interpreter) against `cp -r`, on a SmolLM2-135M-shaped generated checkpoint (~0.27 GB, kept in
.cache/bench between runs). Each round removes the output and syncs first (untimed)."""

from __future__ import annotations

import shlex

import bench_conversion as bc
import pytest
from harness import run_process

ROUNDS = 5


@pytest.fixture(scope="module")
def source(bench_workdir):
    src, _ = bc.write_source(str(bench_workdir), "135m")
    return src


def _jobs(src: str, out: str) -> dict:
    tli = bc.tli_commands(src, out)
    return {
        "cp -r": f"cp -r {shlex.quote(src)} {shlex.quote(out)}",
        "tli native engine (library call)": tli["tli library call (no CLI)"],
        "tli python engine (library call)": tli["tli library call, python engine"],
    }


@pytest.mark.parametrize("job", ["cp -r", "tli native engine (library call)", "tli python engine (library call)"])
def test_conversion(benchmark, record, bench_workdir, source, job):
    if job.startswith("tli native"):
        from tli_kernels.checkpoint import executor_native

        if not executor_native.available():
            pytest.skip(f"native engine not built: {executor_native.unavailable_reason()}")
    out = str(bench_workdir / "out")
    cmd = _jobs(source, out)[job]
    usage: list[dict] = []
    benchmark.group = "conversion (SmolLM2-135M shape)"
    benchmark.pedantic(lambda: usage.append(run_process(f"{cmd} && sync")), setup=lambda: bc.clean(out),
                       rounds=ROUNDS, warmup_rounds=0)  # fmt: skip
    written = bc.disk_bytes(out)[0]
    bc.clean(out)
    assert written > 0
    record(
        benchmark,
        "conversion",
        job,
        "wall",
        source="SmolLM2-135M-shaped checkpoint (30 layers -> 45)",
        source_bytes=bc.disk_bytes(source)[0],
        bytes_written=written,
        peak_rss_mib=max(u["peak_rss_mib"] for u in usage),
        usage=usage,
        command=cmd,
    )
