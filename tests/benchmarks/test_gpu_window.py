"""benchmarks/gpu_window.sh --cpu-smoke, the GPU window's one command rehearsed on a CPU at tiny shapes (its
timings mean nothing): every section of gpu_check.json is filled, the layers pass their correctness check
in float16 under the interpreter, generate() gives the same tokens stock and patched and records the
backends, the test selection it runs on the GPU collects, the quality preset's smoke size runs and
writes its results, and the window writes no more files than the device tool brings back (8). A layer
that fails in the correctness check (Liger's, say) is recorded as failed and the others' errors kept."""

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


def test_gpu_window_cpu_smoke(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, TRITON_INTERPRET="1", TLI_QUALITY_WORKDIR=str(tmp_path / "study"))
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_window.sh"), "--cpu-smoke", str(out)],
                         env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.json", "gpu_check.md", "pytest.log", "quality_results.json", "quality_results.md",
                     "run.log", "summary.txt"]  # fmt: skip
    summary = (out / "summary.txt").read_text()
    assert summary.count("exit 0") == 3, summary  # the check, the test selection, the quality preset
    assert "pytest: " in summary and "tests collected" in summary, summary
    assert "torch" in summary and "transformers" in summary  # the machine's record
    assert "tests collected" in (out / "pytest.log").read_text()
    data = json.loads((out / "gpu_check.json").read_text())
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
    assert (out / "gpu_check.md").read_text().startswith("# tli GPU check")
    quality = json.loads((out / "quality_results.json").read_text())
    assert quality["preset_name"] == "gpu-window-smoke", quality["preset_name"]
    trained = [r for r in quality["runs"] if r.get("trained")]
    assert {"source", "tli-k2-zero"} <= {r["name"] for r in trained}, [r["name"] for r in quality["runs"]]
    assert "[quality]" in (out / "run.log").read_text()


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
