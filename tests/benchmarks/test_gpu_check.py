"""benchmarks/gpu_check.sh --cpu-smoke (gpu_window.sh without the quality preset): the GPU check runs end to
end on a CPU at tiny shapes (its timings mean nothing): every section of gpu_check.json is filled, the
layers pass their correctness check in float16 under the interpreter, generate() gives the same tokens
stock and patched and records the backends, the test selection it runs on the GPU collects, and it writes
no more files than the device tool brings back (8). A layer that fails in the correctness check (Liger's,
say) is recorded as failed and the others' errors are kept."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_gpu_check_cpu_smoke(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, TRITON_INTERPRET="1")
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gpu_check.json", "gpu_check.md", "pytest.log", "run.log", "summary.txt"]
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count("exit 0") == 2, summary  # the check, the test selection
    assert "pytest: " in summary and "tests collected" in summary, summary
    assert "torch" in summary and "transformers" in summary  # the machine's record
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
        assert set(case["attention"]) == {"prompt", "decode"}, case["attention"]
        assert all("stock" in a and "tli" in a for a in case["attention"].values()), case["attention"]
    assert (tmp_path / "gpu_check.md").read_text().startswith("# tli GPU check")


def test_a_layer_that_fails_in_the_correctness_check_is_recorded_and_the_rest_kept(tmp_path):
    import gpu_kernels as gk
    from harness import Results

    bench = gk.Bench(Results(tmp_path / "r.json"), device=torch.device("cpu"), dtype=torch.float32, warmup=0,
                     reps=1, max_sets=1)  # fmt: skip
    layers = gk.Layers(bench, "smoke")
    case = gk.Case("smoke", 1, 8)

    class Broken(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("liger exploded")

    extra = {"liger": (Broken(), contextlib.nullcontext)}
    result = gk.check_correctness(bench, layers, case, extra)
    assert "liger exploded" in result["crashed"]["liger"]
    assert {"stock", "tli", "tli_fused_gate_up"} <= set(result["errors"]) and "liger" not in result["errors"]
    assert result["pass"], result["failures"]  # Liger is not judged: recorded, not failed
    assert any("liger: FAILED to run" in line for line in gk.correctness_lines(result))
    # A judged layer that does not run fails the check.
    judged = gk.check_correctness(bench, layers, case, {"mine": (Broken(), contextlib.nullcontext)}, judged=("mine",))
    assert not judged["pass"] and "mine/run" in judged["failures"]
