"""Conversion benchmark: `tli upscale --method tli --k 2` against `cp -r` of the source, mergekit's
passthrough with the same layer slices, and transformers' load -> edit -> save_pretrained, on dense
Llama-3.2-1B and -3B-shaped checkpoints; then a sparse Llama-3.1-405B-shaped one.

Every job is a shell command timed to "finished and on disk" (`CMD && sync`) under
`/usr/bin/time -v` (wall clock, peak RSS of the process tree, CPU time). Jobs run side by side in
one session, in alternating order, with the page cache warm (this machine does not allow dropping
caches); the output folder is removed and `sync`ed before each job.

    python benchmarks/bench_conversion.py --workdir /work/bench --reps 3 \
        --mergekit /work/venv-mergekit/bin/mergekit-yaml --out docs/bench_conversion.md

Writes the markdown table (--out) and the raw results as JSON next to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TLI = [sys.executable, "-m", "tli_kernels.cli.main"]
SIZES = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b"}

# transformers' way: load the whole model, edit the layer list, save it.
TRANSFORMERS_SCRIPT = r"""
import copy, sys, torch
from transformers import AutoModelForCausalLM
src, dst, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
layers, new = list(model.model.layers), []
for g in range(len(layers) // k):
    new += layers[g * k:(g + 1) * k]
    new.append(copy.deepcopy(layers[g * k + k - 1]))
new += layers[(len(layers) // k) * k:]
for i, layer in enumerate(new):
    layer.self_attn.layer_idx = i
model.model.layers = torch.nn.ModuleList(new)
model.config.num_hidden_layers = len(new)
if getattr(model.config, "layer_types", None):
    model.config.layer_types = [model.config.layer_types[0]] * len(new)
model.save_pretrained(dst)
"""


def sh(cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, **kw)


def timed(cmd: str) -> dict:
    """Run `cmd && sync` under /usr/bin/time -v: wall seconds, peak RSS (MiB), CPU seconds."""
    load = os.getloadavg()[0]
    done = subprocess.run(
        ["/usr/bin/time", "-v", "bash", "-c", f"{cmd} && sync"], capture_output=True, text=True, timeout=7200
    )
    if done.returncode != 0:
        raise RuntimeError(f"failed ({done.returncode}): {cmd}\n{done.stderr[-3000:]}")
    stats = dict(re.findall(r"^\s*(.+?): (.+)$", done.stderr, re.M))
    wall = stats["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall)))
    return {
        "wall_s": round(seconds, 2),
        "peak_rss_mib": round(int(stats["Maximum resident set size (kbytes)"]) / 1024, 1),
        "cpu_s": round(float(stats["User time (seconds)"]) + float(stats["System time (seconds)"]), 2),
        "load_before": round(load, 2),
    }


def disk_bytes(path: str) -> tuple[int, int]:
    """(apparent bytes, bytes actually allocated) of a folder."""
    apparent = allocated = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def clean(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    sh("sync")
    time.sleep(1.0)


def mergekit_config(src: str, n: int, k: int) -> str:
    slices = []
    for g in range(n // k):
        slices += [[g * k, g * k + k], [g * k + k - 1, g * k + k]]
    if n % k:
        slices.append([(n // k) * k, n])
    lines = ["slices:"]
    for a, b in slices:
        lines += ["  - sources:", f"      - model: {src}", f"        layer_range: [{a}, {b}]"]
    lines += ["merge_method: passthrough", "dtype: bfloat16", ""]
    return "\n".join(lines)


def environment(workdir: str, mergekit: str | None) -> dict:
    def version(mod: str, python: str = sys.executable) -> str:
        out = subprocess.run([python, "-c", f"import {mod}; print({mod}.__version__)"], capture_output=True, text=True)
        return out.stdout.strip() or "not installed"

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    fs = sh(f"df -T {shlex.quote(workdir)} | tail -1").stdout.split()
    commit = sh(f"git -C {REPO} rev-parse --short HEAD").stdout.strip()
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem / 2**20, 1),
        "kernel": platform.release(),
        "filesystem": f"{fs[1]} on {fs[0]}" if len(fs) > 1 else "?",
        "python": platform.python_version(),
        "tli_kernels": f"{version('tli_kernels')} ({commit})",
        "torch": version("torch"),
        "transformers": version("transformers"),
        "safetensors": version("safetensors"),
        "cp": sh("cp --version | head -1").stdout.strip(),
    }
    if mergekit:
        python = os.path.join(os.path.dirname(mergekit), "python")
        env["mergekit"] = sh(f"{shlex.quote(python)} -m pip show mergekit | grep ^Version").stdout.split()[-1:] or "?"
        env["mergekit"] = env["mergekit"][0] if env["mergekit"] else "?"
    return env


def dense_size(args, size: str) -> dict:
    from tli_kernels.checkpoint.synthetic import PRESETS, write_preset

    preset = SIZES[size]
    src = os.path.join(args.workdir, f"src-{size}")
    if not os.path.exists(os.path.join(src, "config.json")):
        print(f"writing dense {preset} to {src} ...", flush=True)
        shutil.rmtree(src, ignore_errors=True)
        write_preset(src, preset, fill="dense")
    n = PRESETS[preset]["num_hidden_layers"]
    out = os.path.join(args.workdir, "out")
    q = shlex.quote
    library = f"from tli_kernels.upscale import upscale; upscale({src!r}, {out!r}, 'tli', options=dict(k=2))"
    jobs = {
        "cp -r": f"cp -r {q(src)} {q(out)}",
        "tli (native)": " ".join(map(q, [*TLI, "upscale", src, out, "--method", "tli", "--k", "2", "--quiet"])),
        "tli library call (no CLI)": f"{q(sys.executable)} -c {q(library)}",
    }
    if args.python_engine:
        jobs["tli (python engine)"] = jobs["tli (native)"] + " --engine python"
    if args.mergekit:
        cfg = os.path.join(args.workdir, f"mergekit-{size}.yml")
        with open(cfg, "w") as f:
            f.write(mergekit_config(src, n, 2))
        jobs["mergekit passthrough"] = (
            f"{q(args.mergekit)} {q(cfg)} {q(out)} --no-copy-tokenizer --no-write-model-card --quiet"
        )
    if args.transformers:
        script = os.path.join(args.workdir, "transformers_tli.py")
        with open(script, "w") as f:
            f.write(TRANSFORMERS_SCRIPT)
        jobs["transformers load/edit/save"] = f"{q(sys.executable)} {q(script)} {q(src)} {q(out)} 2"
    runs: dict[str, list[dict]] = {name: [] for name in jobs}
    written: dict[str, int] = {}
    names = list(jobs)
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            if name not in ("cp -r", "tli (native)", "tli library call (no CLI)") and rep >= args.baseline_reps:
                continue  # the slow baselines: fewer repetitions
            clean(out)
            r = timed(jobs[name])
            written[name] = disk_bytes(out)[0]
            runs[name].append(r)
            print(f"  {size} rep {rep} {name:30s} {r}", flush=True)
    clean(out)
    paired = [t["wall_s"] / c["wall_s"] for t, c in zip(runs["tli (native)"], runs["cp -r"])]
    startup = timed(" ".join(map(q, [*TLI, "upscale", "--help"])) + " > /dev/null")
    return {
        "preset": preset,
        "cli_startup": startup,
        "source_bytes": disk_bytes(src)[0],
        "commands": jobs,
        "runs": runs,
        "bytes_written": written,
        "tli_over_cp_per_rep": [round(x, 3) for x in paired],
    }


def sparse_405b(args) -> dict:
    from safetensors import safe_open

    from tli_kernels.checkpoint.layout import CheckpointLayout
    from tli_kernels.checkpoint.synthetic import write_preset

    src = os.path.join(args.workdir, "src-405b-sparse")
    out = os.path.join(args.workdir, "out-405b")
    if not os.path.exists(os.path.join(src, "config.json")):
        shutil.rmtree(src, ignore_errors=True)
        write_preset(src, "llama-3.1-405b", fill="sparse")
    clean(out)
    cmd = " ".join(map(shlex.quote, [*TLI, "upscale", src, out, "--method", "tli", "--k", "2", "--quiet"]))
    run = timed(cmd)
    apparent, allocated = disk_bytes(out)
    layout = CheckpointLayout.open(out)  # our reader: headers, index, config all consistent
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    tensors = 0
    for name in shards:  # the safetensors library's reader
        with safe_open(os.path.join(out, name), "pt") as f:
            tensors += len(list(f.keys()))
    assert tensors == len(layout.tensors)
    src_apparent, src_allocated = disk_bytes(src)
    clean(out)
    return {
        "command": cmd,
        "run": run,
        "source_shards": len([f for f in os.listdir(src) if f.endswith(".safetensors")]),
        "source_apparent_bytes": src_apparent,
        "source_allocated_bytes": src_allocated,
        "output_layers": layout.num_layers,
        "output_shards": len(shards),
        "output_apparent_bytes": apparent,
        "output_allocated_bytes": allocated,
        "validated": f"safetensors.safe_open on all {len(shards)} shards ({tensors} tensors) + CheckpointLayout.open",
    }


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def markdown(results: dict) -> str:
    env = results["environment"]
    loads = [x["load_before"] for r in results["dense"].values() for runs in r["runs"].values() for x in runs]
    load = statistics.median(loads) if loads else float("nan")
    lines = [
        "## Conversion",
        "",
        f"Measured {env['date_utc']} UTC by `{results['command']}`.",
        "",
        f"Machine: {env['cpu']}, {env['cpus']} CPUs, {env['memory_gib']} GiB RAM, Linux {env['kernel']}, "
        f"{env['filesystem']}. Versions: Python {env['python']}, tli_kernels {env['tli_kernels']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, safetensors {env['safetensors']}"
        + (f", mergekit {env['mergekit']}" if "mergekit" in env else "")
        + f", {env['cp']}.",
        "",
        "Each job is timed until its output is on disk (`CMD && sync`) with `/usr/bin/time -v`; jobs alternate "
        "order between repetitions; the page cache is warm (dropping caches is not permitted here, so the source "
        "is read from memory by every job alike). Wall and CPU time are medians over the repetitions (min-max in "
        "brackets); peak RSS is the largest over them. The TLI job writes 1.4x the bytes `cp` writes (the "
        "injected layers). `tli (native)` is the command line (`tli upscale`), whose start-up imports torch "
        "(shown on its own); `tli library call` is `tli_kernels.upscale.upscale()` in a fresh interpreter. "
        "`cp` keeps what it writes in the page cache; the engine drops its output pages once written "
        "(docs/engine.md), which is why it overtakes `cp` once the output no longer fits comfortably in memory.",
        "",
        f"Load average (1 min) before the jobs: median {load:.1f}, from other work on the machine (a 2-CPU VM "
        "shared with other jobs); it is recorded per run in the JSON.",
        "",
        "| model | job | wall s | x cp | CPU s | peak RSS | bytes written |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["dense"].values():
        cp = statistics.median(x["wall_s"] for x in r["runs"]["cp -r"])
        for name, runs in r["runs"].items():
            if not runs:
                continue
            walls = [x["wall_s"] for x in runs]
            med = statistics.median(walls)
            rng = f" ({min(walls):.1f}-{max(walls):.1f})" if len(walls) > 1 else ""
            cpu = statistics.median(x["cpu_s"] for x in runs)
            rss = max(x["peak_rss_mib"] for x in runs)
            lines.append(
                f"| {r['preset']} ({gb(r['source_bytes'])}) | {name} | {med:.1f}{rng} | {med / cp:.2f} | {cpu:.1f} | "
                f"{rss:.0f} MiB | {gb(r['bytes_written'][name])} |"
            )
        paired = ", ".join(f"{x:.2f}" for x in r["tli_over_cp_per_rep"])
        lines.append(f"| | tli (native) / cp, each repetition | {paired} | | | | |")
        st = r["cli_startup"]
        lines.append(
            f"| | `tli upscale --help` alone (CLI start-up) | {st['wall_s']:.1f} | | {st['cpu_s']:.1f} | "
            f"{st['peak_rss_mib']:.0f} MiB | |"
        )
    if "sparse_405b" in results:
        s = results["sparse_405b"]
        lines += [
            "",
            f"Sparse Llama-3.1-405B layout ({s['source_shards']} shards, {gb(s['source_apparent_bytes'])} apparent, "
            f"{s['source_allocated_bytes'] / 2**20:.1f} MiB on disk), TLI K=2 to {s['output_layers']} layers: "
            f"{s['run']['wall_s']:.1f} s, peak RSS {s['run']['peak_rss_mib']:.0f} MiB, {s['output_shards']} shards, "
            f"{gb(s['output_apparent_bytes'])} apparent, {s['output_allocated_bytes'] / 2**20:.1f} MiB on disk; "
            f"validated with {s['validated']}.",
        ]
    lines += ["", "Commands (SRC/OUT as in the JSON next to this file):", ""]
    for size, r in results["dense"].items():
        for name, cmd in r["commands"].items():
            lines.append(f"- {size}, {name}: `{cmd} && sync`")
    if "sparse_405b" in results:
        lines.append(f"- 405B sparse: `{results['sparse_405b']['command']} && sync`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/tli-bench", help="sources and outputs go here (needs ~30 GB)")
    p.add_argument("--sizes", default="1b,3b", help="comma list of 1b, 3b (empty: none)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of cp and tli")
    p.add_argument("--baseline-reps", type=int, default=1, help="repetitions of mergekit/transformers/python")
    p.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="mergekit-yaml executable")
    p.add_argument("--no-transformers", dest="transformers", action="store_false")
    p.add_argument("--python-engine", action="store_true", help="also time --engine python")
    p.add_argument("--no-405b", dest="sparse_405b", action="store_false")
    p.add_argument("--out", default="docs/bench_conversion.md", help="markdown table; JSON written next to it")
    p.add_argument("--render", metavar="JSON", help="only re-render --out from an earlier run's JSON")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            text = markdown(json.load(f))
        with open(args.out, "w") as f:
            f.write(text)
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    results = {
        "command": "python benchmarks/bench_conversion.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
        "environment": environment(args.workdir, args.mergekit),
        "dense": {},
    }
    for size in filter(None, args.sizes.split(",")):
        results["dense"][size] = dense_size(args, size)
    if args.sparse_405b:
        results["sparse_405b"] = sparse_405b(args)
    results["environment"]["load_average_end"] = os.getloadavg()
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=2)
    with open(args.out, "w") as f:
        f.write(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
