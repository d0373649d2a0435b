"""A fixed-seed fuzz run over header, index and config mutations (tests/hostile/fuzzing.py): every
case must keep the contract (one named line or a complete output, source untouched, nothing
written outside DST, no complete-looking folder after a failure, both engines alike).

The seeds are fixed so a failure reproduces: `fuzz_case(base, pristine, seed)` rebuilds the case.
tools/fuzz_hostile.py runs the same machinery for thousands of seeds.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.hostile.fuzzing import fuzz_case, make_source, run_case

ARGS = ["--method", "tli", "--k", "2", "--init", "average", "--alpha", "0.5", "--shard-size", "20KB"]
CASES = {"sharded": (3, range(0, 240)), "single-file": (1, range(1000, 1060))}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz-pristine")
    return {kind: make_source(str(base / kind), shards=shards) for kind, (shards, _) in CASES.items()}


@pytest.mark.parametrize("kind", list(CASES))
def test_fuzzed_sources_keep_the_contract(tmp_path, pristine, kind):
    failures = []
    for seed in CASES[kind][1]:
        base = str(tmp_path / f"case{seed}")
        os.makedirs(base)
        src, what = fuzz_case(base, pristine[kind], seed)
        command = ("upscale", "upscale", "plan", "inspect")[seed % 4]
        problems = run_case(base, src, ARGS if command != "inspect" else [], command)
        if problems:
            failures.append(f"seed {seed} ({what}, {command}): {problems[0]}")
        shutil.rmtree(base)
    assert not failures, "\n".join(failures)


def test_fuzzed_recipes_hub_caches_bins_data_and_checkpoints_keep_the_contract(tmp_path):
    """A fixed-seed slice of tools/fuzz_hostile.py's issue-20 families (it exits 1 on any finding)."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, os.path.join(repo, "tools", "fuzz_hostile.py"), "--cases", "40", "--seed", "7",
         "--families", "recipes,hub,bin,data,ckpt", "--hang-seconds", "120"],
        env={**os.environ, "PYTHONPATH": repo, "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
