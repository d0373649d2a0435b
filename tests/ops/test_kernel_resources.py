"""Every tli kernel compiled for sm_90 (H100/H200) on this CPU with the launch configuration its launcher
uses at hidden sizes 576 to 65536: no spills to local memory (benchmarks/kernel_resources.py reads the
registers and stack from the cubin). Before the norms were walked in column chunks, the backward spilled
320 bytes a thread at hidden 8192 and 1080 at 16384 (Llama-3.1-405B)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_no_kernel_spills_on_sm90(tmp_path):
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel carries no NVIDIA toolchain (ptxas, cuobjdump)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), TRITON_DEFAULT_FP_FUSION="1")
    out = tmp_path / "resources.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_resources.py"), "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.exists(), run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == {"rms_norm", "rope", "swiglu", "scaled_add"}
    assert [r for r in rows if "error" in r] == []
    spilling = [(r["kernel"], r["case"], r["stack_bytes"]) for r in rows if r["stack_bytes"] or r["local_bytes"]]
    assert spilling == []
    widest = [r for r in rows if r["kernel"] == "_rms_norm_bwd_kernel" and "N=65536" in r["case"]]
    assert widest and all(not r["constexprs"]["ONE_PASS"] for r in widest)
