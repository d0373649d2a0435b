"""benchmarks/gpu_suite.py on CPU at tiny shapes (--smoke): every section produces results, the layer
passes its correctness check in float16 under the interpreter, the markdown and the plot are written;
and with no time left it records what it skipped instead of failing. Its timings mean nothing here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_suite(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--smoke", "--out", str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_gpu_suite_smoke_run(tmp_path):
    run = run_suite(tmp_path, "--seqs", "16", "--workdir", str(tmp_path / "work"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert data["environment"]["git"] and data["environment"]["versions"]["torch"]
    assert "matmul_tflops" in data["rates"]
    model = data["models"]["smoke"]
    assert model["correctness"]["pass"], model["correctness"]["failures"]
    cell = model["seq_16"]
    for name in ("kernels", "layer", "gemm_attention_reference"):
        assert "error" not in cell[name], (name, cell[name])
    assert set(cell["kernels"]) == {"rms_norm", "add_rms_norm", "rope", "swiglu"}
    assert {"stock", "tli", "tli_fused_gate_up"} <= set(cell["layer"])
    assert all("error" not in e and e["speedup_forward_backward"] > 0 for e in cell["layer"].values())
    assert "reference_forward_backward_ms" in cell["gemm_attention_reference"]
    assert "tli_choice" in model["attention_backend"]["training"]
    configs = data["e2e"]["configs"]
    assert set(configs) == {"stock", "tli", "tli_fused_gate_up"}
    for entry in configs.values():
        assert entry["tokens_per_s"] > 0, entry
        assert abs(entry["first_loss_minus_stock"]) < 1e-3  # same weights, same batch: same function
    conversion = data["conversion"]
    assert "error" not in conversion, conversion
    assert len(conversion["runs"]["cp -r"]) == 3
    text = (tmp_path / "gpu_suite.md").read_text()
    assert text.startswith("# tli GPU suite") and "speed-up vs stock" in text and "tokens/s" in text
    assert data["plot"].endswith("speedup.png") and (tmp_path / "speedup.png").stat().st_size > 0


def test_gpu_suite_records_what_the_budget_left_out(tmp_path):
    run = run_suite(tmp_path, "--budget-s", "0.001", "--no-conversion")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert "time budget" in data["models"]["smoke"]["skipped"]
    assert "time budget" in data["e2e"]["skipped"]
    assert "skipped" in (tmp_path / "gpu_suite.md").read_text()
