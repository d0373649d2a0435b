"""The CPU-sized benchmark subset (`pytest benchmarks --benchmark-only`, which `make bench` runs).

pytest-benchmark times each case; this file collects what the tests record, and at the end prints two
tables (conversion against `cp -r`, kernels against the stock transformers code) with the baseline's
ratio taken in the same run, and writes them to build/bench/cpu_subset.{json,md} with the machine,
versions, date and commit (benchmarks/harness.py). `pytest` at the repository root does not collect
this folder (pyproject: testpaths = ["tests"]).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

# The Triton kernels run in the interpreter without a GPU; must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A shared 2-CPU machine: OpenMP threads spinning against other work make PyTorch's CPU timings noise.
CPU_THREADS = 1
torch.set_num_threads(CPU_THREADS)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_conversion import rss_cell  # noqa: E402
from harness import REPO, describe_environment, environment, fmt, fmt_ratio, markdown_table, ratio  # noqa: E402

OUT = Path(os.environ.get("TLI_BENCH_OUT", REPO / "build" / "bench"))
_RECORDS: list[dict] = []


@pytest.fixture(scope="session")
def bench_workdir() -> Path:
    path = Path(os.environ.get("TLI_BENCH_WORKDIR", REPO / ".cache" / "bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def record():
    """record(benchmark, table, row, column, **extra): keep one benchmark's median for the summary."""

    def add(benchmark, table: str, row: str, column: str, **extra) -> None:
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is None:  # --benchmark-disable: nothing was timed
            return
        _RECORDS.append(
            {
                "table": table,
                "row": row,
                "column": column,
                "median_ms": stats.median * 1e3,
                "min_ms": stats.min * 1e3,
                "max_ms": stats.max * 1e3,
                "rounds": stats.rounds,
                **extra,
            }
        )

    return add


# --------------------------------------------------------------------------------------- summary
def conversion_table(records: list[dict]) -> str:
    rows = {r["row"]: r for r in records}
    base = rows.get("cp -r")
    lines = []
    for name, r in rows.items():
        seconds = r["median_ms"] / 1e3
        lines.append([
            name, f"{seconds:.3f} ({r['min_ms'] / 1e3:.3f}-{r['max_ms'] / 1e3:.3f})",
            fmt(ratio(r["median_ms"], base["median_ms"]) if base else None, ".2f"),
            f"{r['bytes_written'] / seconds / 1e9:.2f}", f"{r['source_bytes'] / seconds / 1e9:.2f}",
            rss_cell(r["usage"]), f"{r['bytes_written'] / 1e9:.3f} GB", r["rounds"],
        ])  # fmt: skip
    headers = ["job", "wall s, median (min-max)", "x cp (wall)", "GB/s written", "source GB/s", "peak RSS",
               "written", "rounds"]  # fmt: skip
    source = records[0]
    head = (
        f"Conversion of a {source['source']} ({source['source_bytes'] / 1e9:.2f} GB), TLI K=2. Baseline: "
        "`cp -r` of the same source in the same run; `x cp` = median wall / cp's median wall. Each round is "
        "one process (`CMD && sync`, output removed and synced before it), timed by pytest-benchmark; peak "
        "RSS (largest over rounds) from GNU time (or a small os.wait4 waiter where it is not installed)."
    )
    return head + "\n\n" + markdown_table(headers, lines)


def kernel_table(records: list[dict], columns: list[str]) -> str:
    by_row: dict[str, dict[str, dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], {})[r["column"]] = r
    headers = ["case", "stock ms (baseline)"]
    for column in columns[1:]:
        headers += [f"{column} ms", "speed-up vs stock"]
    lines = []
    for row, cells in by_row.items():
        stock = cells.get(columns[0])
        line = [row, fmt(stock["median_ms"], ".4f") if stock else "n/a"]
        for column in columns[1:]:
            cell = cells.get(column)
            line += [
                fmt(cell["median_ms"], ".4f") if cell else "n/a",
                fmt_ratio(ratio(stock["median_ms"], cell["median_ms"])) if cell and stock else "n/a",
            ]
        lines.append(line)
    return markdown_table(headers, lines)


def summary(records: list[dict], env: dict) -> str:
    parts = [
        "## CPU subset (`make bench`)",
        "",
        describe_environment(env) + f" PyTorch CPU threads: {CPU_THREADS}; TRITON_INTERPRET="
        f"{os.environ.get('TRITON_INTERPRET')}.",
        "",
    ]
    conversion = [r for r in records if r["table"] == "conversion"]
    if conversion:
        parts += ["### Conversion", "", conversion_table(conversion), ""]
    kernels = [r for r in records if r["table"] == "kernels"]
    if kernels:
        shape = kernels[0]["shape"]
        parts += [
            "### Kernels at tiny shapes",
            "",
            f"Shape: {shape}, float32, CPU. Baseline: the PyTorch code stock transformers runs (LlamaRMSNorm, "
            "`r + b` then the norm, apply_rotary_pos_emb, silu(g) * u; the stock LlamaDecoderLayer), same run, "
            "inputs rotated over several sets; speed-up = stock median / median. `tli reference` is "
            "tli_kernels.reference (the path the ops take where Triton cannot run); `tli Triton interpreter` "
            "runs the real kernels in Triton's CPU interpreter, which checks that they run and says nothing "
            "about GPU speed.",
            "",
            kernel_table(kernels, ["stock", "tli reference", "tli Triton interpreter"]),
            "",
        ]
    return "\n".join(parts)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RECORDS:
        return
    env = environment(torch_threads=CPU_THREADS, triton_interpret=os.environ.get("TRITON_INTERPRET"))
    text = summary(_RECORDS, env)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cpu_subset.json").write_text(json.dumps({"environment": env, "records": _RECORDS}, indent=2))
    (OUT / "cpu_subset.md").write_text(text + "\n")
    terminalreporter.write_line("")
    for line in text.splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line("")
    terminalreporter.write_line(f"(written to {OUT / 'cpu_subset.md'} and cpu_subset.json)")
