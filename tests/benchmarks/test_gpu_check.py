"""benchmarks/gpu_check.sh --cpu-smoke: the 5-minute GPU check runs end to end on a CPU at tiny shapes
(its timings mean nothing): every section of gpu_check.json is filled, the layers pass their
correctness check in float16 under the interpreter, generate() gives the same tokens stock and patched,
the test selections it runs on the GPU collect, and it writes no more files than the device tool
brings back (8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_smoke(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, TRITON_INTERPRET="1")
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["env.txt", "gpu_check.json", "gpu_check.log", "gpu_check.md", "pytest.log", "summary.txt"]
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count("exit 0") == 3, summary  # benchmarks, the two test selections
    assert "tests collected" in (tmp_path / "pytest.log").read_text()
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    for name in ("sdpa", "rates", "layer_8b", "generate"):
        assert name in data and "error" not in data[name] and "skipped" not in data[name], (name, data.get(name))
    assert "skipped" in data["layer_1b"] and "skipped" in data["kernels_8b"]  # smoke: layer_8b's code path
    for name in ("layer_8b",):
        layer = data[name]
        assert layer["correctness"]["pass"], layer["correctness"]["failures"]
        assert {"stock", "tli", "tli_learnable_alpha"} <= set(layer["layer"])
        assert all("forward_backward" in e for e in layer["layer"].values()), layer["layer"]
        assert "reference_forward_backward_ms" in layer["gemm_attention_reference"]
    assert {"training", "decode"} == set(data["sdpa"]["layer_8b"])
    for case in data["generate"]["cases"].values():
        assert case["stock_tokens_per_s"] > 0 and case["tli_tokens_per_s"] > 0
        assert case["same_tokens_fraction"] == 1.0  # float16 on CPU: the same greedy tokens
    assert (tmp_path / "gpu_check.md").read_text().startswith("# tli GPU check")
