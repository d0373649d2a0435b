"""Measure `tli upscale` on the sparse Llama-3.1-405B-FP8 layout (checkpoint/synthetic.py, fbgemm_fp8; or
the 405B shapes with 128 x 128 block scales, fp8-block):
wall time, CPU time and peak RSS of the CLI process (GNU time), then check the output with the
safetensors library's reader, tli's own reader, and that modules_to_not_convert names exactly the
output's unquantised linears.

    PYTHONPATH=. python tools/measure_fp8_layouts.py WORKDIR [--quant fbgemm-fp8|fp8-block] [--max-memory 64MiB]
        [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys


def disk_bytes(path: str) -> tuple[int, int]:
    apparent = allocated = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def timed(argv: list[str]) -> dict:
    fmt = "TLI_TIME wall=%e user=%U sys=%S rss_kb=%M"
    p = subprocess.run(["/usr/bin/time", "-f", fmt, *argv], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {p.stderr[-2000:]}")
    m = re.search(r"TLI_TIME wall=([\d.]+) user=([\d.]+) sys=([\d.]+) rss_kb=(\d+)", p.stderr)
    return {"wall_s": float(m[1]), "cpu_s": float(m[2]) + float(m[3]), "peak_rss_mib": int(m[4]) / 1024}


def check_output(out: str) -> dict:
    from safetensors import safe_open

    from tli_kernels.checkpoint.layout import CheckpointLayout

    layout = CheckpointLayout.open(out)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    dtypes = {}
    for name in shards:
        with safe_open(os.path.join(out, name), "pt") as f:
            for k in f.keys():
                dtypes[k] = str(f.get_slice(k).get_dtype())
    assert len(dtypes) == len(layout.tensors)
    q = layout.config["quantization_config"]
    n = layout.config["num_hidden_layers"]
    linears = [f"model.layers.{i}.{m}" for i in range(n) for m in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
    unquantized = {m for m in linears if dtypes[m + ".weight"] != "F8_E4M3"}
    assert set(q.get("modules_to_not_convert", [])) - {"lm_head"} == unquantized
    fp8 = sum(1 for d in dtypes.values() if d == "F8_E4M3")
    return {"layers": n, "shards": len(shards), "tensors": len(dtypes), "fp8_weights": fp8,
            "not_converted": len(q.get("modules_to_not_convert", []))}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--max-memory", default="64MiB")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quant", default="fbgemm-fp8", choices=["fbgemm-fp8", "fp8-block"])
    args = p.parse_args(argv)
    from tli_kernels.checkpoint.synthetic import write_preset

    src = os.path.join(args.workdir, f"src-405b-{args.quant}-sparse")
    if not os.path.exists(os.path.join(src, "config.json")):
        shutil.rmtree(src, ignore_errors=True)
        write_preset(src, "llama-3.1-405b", fill="sparse", quant=args.quant, num_shards=109)
    src_apparent, src_allocated = disk_bytes(src)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}
    source = {"shards": 109, "apparent_bytes": src_apparent, "allocated_bytes": src_allocated}
    results = {"machine": machine, "source": source, "jobs": []}
    jobs = {
        "tli k=2 copy": ["--method", "tli", "--k", "2", "--init", "copy"],
        "tli k=2 copy alpha 0.5": ["--method", "tli", "--k", "2", "--init", "copy", "--alpha", "0.5"],
        "tli k=2 zero": ["--method", "tli", "--k", "2", "--init", "zero"],
    }
    for name, opts in jobs.items():
        out = os.path.join(args.workdir, "out")
        argv_ = [sys.executable, "-m", "tli_kernels.cli.main", "upscale", src, out, *opts,
                 "--max-memory", args.max_memory, "--quiet"]  # fmt: skip
        runs = []
        for _ in range(args.reps):
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"])
            runs.append(timed(argv_))
        apparent, allocated = disk_bytes(out)
        checked = check_output(out)
        shutil.rmtree(out, ignore_errors=True)
        results["jobs"].append({"job": name, "command": " ".join(argv_[1:]), "runs": runs, "output": checked,
                                "output_apparent_bytes": apparent, "output_allocated_bytes": allocated})  # fmt: skip
        print(json.dumps(results["jobs"][-1]), flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
