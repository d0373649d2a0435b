"""benchmarks/gpu_kernels.py runs end to end at tiny shapes on CPU (--smoke): every section produces
results, none records an error, and the layer passes its correctness criterion in float16 (the
interpreter rounds float16 stores correctly; its bf16 stores truncate, so bf16 is checked on the GPU).
Its timings mean nothing here; the GPU run produces the real ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kernels.py"


def test_gpu_benchmark_smoke_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    args = ["--smoke", "--dtype", "fp16", "--warmup", "0", "--reps", "1", "--no-compile", "--out", str(tmp_path)]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_kernels.json").read_text())
    for name in ("rates", "kernels", "attention_backend", "layer_correctness", "layer", "gemm_attention_reference"):
        assert name in results and "error" not in results[name], (name, results.get(name))
    assert set(results["kernels"]) == {"rms_norm", "add_rms_norm", "rope", "swiglu"}
    assert {"stock", "tli"} <= set(results["layer"])
    assert all("error" not in entry for entry in results["layer"].values()), results["layer"]
    assert "reference_forward_backward_ms" in results["gemm_attention_reference"]
    assert {"training", "decode"} == set(results["attention_backend"])
    assert {"stock_choice", "tli_choice", "priority_order_before"} <= set(results["attention_backend"]["training"])
    correctness = results["layer_correctness"]
    assert correctness["pass"], correctness["failures"]
    assert {"stock", "tli", "tli_fused_gate_up"} <= set(correctness["errors"])
    assert (tmp_path / "gpu_kernels.md").read_text().startswith("# tli kernels")
