"""Conversion benchmark: `tli upscale --method tli --k 2 --init copy` (the copying job, as mergekit
and transformers do it) against `cp -r` of the source, mergekit's passthrough with the same layer
slices, and transformers' load -> edit -> save_pretrained, on dense checkpoints of several sizes
(SmolLM2-135M-, Llama-3.2-1B-, -3B-shaped; -8B with cp and tli only); then a sparse Llama-3.1-405B-shaped one.

Every job is a shell command timed to "finished and on disk" (`CMD && sync`) by
benchmarks/harness.py's `run_process` (os.wait4: wall clock, CPU time, peak RSS of the process tree,
the numbers `/usr/bin/time -v` prints). Jobs run side by side in one session, in alternating order,
with the page cache warm (this machine does not allow dropping caches); the output folder is removed
and `sync`ed before each job. Throughput is bytes written per wall second, and source bytes per wall
second (the model converted per second).

    python benchmarks/bench_conversion.py --workdir /work/bench --reps 5 --python-engine \
        --mergekit /work/venv-mergekit/bin/mergekit-yaml --out docs/bench_conversion.md

Writes the markdown table (--out) and the raw results as JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import describe_environment, environment, fmt, markdown_table, run_process  # noqa: E402

TLI = [sys.executable, "-m", "tli_kernels.cli.main"]
# size -> synthetic preset (tli_kernels.checkpoint.synthetic); "smollm2-135m" is SmolLM2-135M's shape.
SIZES = {"135m": "smollm2-135m", "1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b"}
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    tie_word_embeddings=True,
)
# Jobs repeated --reps times; the others (slow baselines) --baseline-reps times.
FAST_JOBS = ("cp -r", "tli (native)", "tli library call (no CLI)")
# Sizes whose load-everything baselines do not fit this machine's memory next to other work.
NO_IN_MEMORY_BASELINES = ("8b",)

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


def sh(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)


def timed(cmd: str) -> dict:
    """`cmd && sync` with wall seconds, CPU seconds, peak RSS (MiB) and the load average before it."""
    return run_process(f"{cmd} && sync")


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


def tool_versions(workdir: str, mergekit: str | None) -> dict:
    """What the harness does not know: the file system, cp, mergekit."""
    fs = sh(f"df -T {shlex.quote(workdir)} | tail -1").stdout.split()
    out = {
        "filesystem": f"{fs[1]} on {fs[0]}" if len(fs) > 1 else "?",
        "cp": sh("cp --version | head -1").stdout.strip(),
    }
    if mergekit:
        python = os.path.join(os.path.dirname(mergekit), "python")
        version = sh(f"{shlex.quote(python)} -m pip show mergekit | grep ^Version").stdout.split()[-1:]
        out["mergekit"] = version[0] if version else "?"
    return out


def write_source(workdir: str, size: str) -> tuple[str, int]:
    """The dense source checkpoint of a size (written once, reused); returns (folder, layers)."""
    from tli_kernels.checkpoint.synthetic import PRESETS, llama_config, write_checkpoint, write_preset

    preset = SIZES[size]
    src = os.path.join(workdir, f"src-{size}")
    if preset == "smollm2-135m":
        config = llama_config("llama-3.2-1b", **SMOLLM2_135M)
        layers = config["num_hidden_layers"]
        writer = lambda: write_checkpoint(src, config, fill="dense", num_shards=1)  # noqa: E731
    else:
        layers = PRESETS[preset]["num_hidden_layers"]
        writer = lambda: write_preset(src, preset, fill="dense")  # noqa: E731
    if not os.path.exists(os.path.join(src, "config.json")):
        print(f"writing dense {preset} to {src} ...", flush=True)
        shutil.rmtree(src, ignore_errors=True)
        writer()
    return src, layers


def tli_commands(src: str, out: str) -> dict:
    """The tli jobs: the command line (native engine), the library call, the Python engine."""
    q = shlex.quote
    call = f"from tli_kernels.upscale import upscale; upscale({src!r}, {out!r}, 'tli', options=dict(k=2, init='copy')"
    cli = " ".join(map(q, [*TLI, "upscale", src, out, "--method", "tli", "--k", "2", "--init", "copy", "--quiet"]))
    return {
        "tli (native)": cli,
        "tli library call (no CLI)": f"{q(sys.executable)} -c {q(call + ')')}",
        "tli (python engine)": cli + " --engine python",
        "tli library call, python engine": f"{q(sys.executable)} -c {q(call + ', engine=' + repr('python') + ')')}",
    }


def run_jobs(
    jobs: dict, out: str, *, reps: int, baseline_reps: int, fast: tuple = FAST_JOBS, label: str = ""
) -> tuple[dict, dict]:
    """Jobs in `fast` `reps` times, the others `baseline_reps` times, alternating order between repetitions;
    returns (runs, bytes written)."""
    runs: dict[str, list[dict]] = {name: [] for name in jobs}
    written: dict[str, int] = {}
    names = list(jobs)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            if name not in fast and rep >= baseline_reps:
                continue
            clean(out)
            r = timed(jobs[name])
            written[name] = disk_bytes(out)[0]
            runs[name].append(r)
            print(f"  {label} rep {rep} {name:32s} {r}", flush=True)
    clean(out)
    return runs, written


def dense_size(args, size: str) -> dict:
    src, n = write_source(args.workdir, size)
    out = os.path.join(args.workdir, "out")
    q = shlex.quote
    tli = tli_commands(src, out)
    jobs = {"cp -r": f"cp -r {q(src)} {q(out)}", **{k: tli[k] for k in ("tli (native)", "tli library call (no CLI)")}}
    if args.python_engine:
        jobs["tli (python engine)"] = tli["tli (python engine)"]
    in_memory = size not in NO_IN_MEMORY_BASELINES
    if args.mergekit and in_memory:
        cfg = os.path.join(args.workdir, f"mergekit-{size}.yml")
        with open(cfg, "w") as f:
            f.write(mergekit_config(src, n, 2))
        jobs["mergekit passthrough"] = (
            f"{q(args.mergekit)} {q(cfg)} {q(out)} --no-copy-tokenizer --no-write-model-card --quiet"
        )
    if args.transformers and in_memory:
        script = os.path.join(args.workdir, "transformers_tli.py")
        with open(script, "w") as f:
            f.write(TRANSFORMERS_SCRIPT)
        jobs["transformers load/edit/save"] = f"{q(sys.executable)} {q(script)} {q(src)} {q(out)} 2"
    runs, written = run_jobs(jobs, out, reps=args.reps, baseline_reps=args.baseline_reps, label=size)
    paired = [t["wall_s"] / c["wall_s"] for t, c in zip(runs["tli (native)"], runs["cp -r"])]
    startup = timed(" ".join(map(q, [*TLI, "upscale", "--help"])) + " > /dev/null")
    return {
        "preset": SIZES[size],
        "cli_startup": startup,
        "source_bytes": disk_bytes(src)[0],
        "commands": jobs,
        "runs": runs,
        "bytes_written": written,
        "tli_over_cp_per_rep": [round(x, 3) for x in paired],
        "skipped": [] if in_memory else ["mergekit passthrough", "transformers load/edit/save"],
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
    cmd = " ".join(
        map(shlex.quote, [*TLI, "upscale", src, out, "--method", "tli", "--k", "2", "--init", "copy", "--quiet"])
    )
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


# --------------------------------------------------------------------------------------- report
def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def summarize(runs: list[dict]) -> dict:
    walls = [x["wall_s"] for x in runs]
    return {
        "wall_s": statistics.median(walls),
        "wall_min": min(walls),
        "wall_max": max(walls),
        "cpu_s": statistics.median(x["cpu_s"] for x in runs),
        "peak_rss_mib": max(x["peak_rss_mib"] for x in runs),
        "reps": len(runs),
    }


def rss_cell(runs: list[dict]) -> str:
    """Largest peak RSS over the runs; "<= floor" where the waiter's own RSS could account for it."""
    peak = max(x["peak_rss_mib"] for x in runs)
    floor = max((x.get("rss_floor_mib", 0) for x in runs), default=0)
    return f"<= {floor:.0f} MiB (waiter floor)" if floor and peak <= floor else f"{peak:.0f} MiB"


CONVERSION_HEADERS = ["model", "job", "wall s", "x cp (wall)", "GB/s written", "source GB/s", "CPU s", "peak RSS",
                      "bytes written"]  # fmt: skip


def conversion_rows(label: str, source_bytes: int, runs: dict, written: dict, baseline: str = "cp -r") -> list[list]:
    """One row per job: median wall (min-max), ratio to the baseline's median in the same run, throughput."""
    base = summarize(runs[baseline])["wall_s"] if runs.get(baseline) else None
    rows = []
    for name, job_runs in runs.items():
        if not job_runs:
            continue
        s = summarize(job_runs)
        spread = f" ({s['wall_min']:.2f}-{s['wall_max']:.2f})" if s["reps"] > 1 else ""
        rows.append([
            label, name, f"{s['wall_s']:.2f}{spread}", fmt(s["wall_s"] / base if base else None, ".2f"),
            f"{written[name] / s['wall_s'] / 1e9:.2f}", f"{source_bytes / s['wall_s'] / 1e9:.2f}",
            f"{s['cpu_s']:.1f}", rss_cell(job_runs), gb(written[name]),
        ])  # fmt: skip
    return rows


def markdown(results: dict) -> str:
    env = results["environment"]
    tools = env.get("tools", {})
    loads = [x["load_before"] for r in results["dense"].values() for runs in r["runs"].values() for x in runs]
    load = statistics.median(loads) if loads else float("nan")
    lines = [
        "## Conversion",
        "",
        f"Command: `{results['command']}`.",
        "",
        describe_environment(env)
        + f" Disk: {tools.get('filesystem', '?')}; {tools.get('cp', 'cp')}"
        + (f"; mergekit {tools['mergekit']}" if "mergekit" in tools else "")
        + ".",
        "",
        "Baseline: `cp -r` of the source, in the same run; `x cp` = median wall time / cp's median wall time "
        "(below 1 is faster than copying). Each job is timed until its output is on disk (`CMD && sync`): wall "
        "clock by the harness, CPU time and peak RSS of the process tree by GNU time (`/usr/bin/time`; the JSON "
        "names the source of each run's rusage); jobs alternate order between repetitions; "
        "the page cache is warm (dropping caches is not permitted here, so the source is read from memory by "
        "every job alike). Wall and CPU time are medians over the repetitions (min-max in brackets); peak RSS "
        "is the largest over them. GB/s written = bytes written / wall; source GB/s = source size / wall (the "
        "model converted per second). The TLI jobs write more bytes than `cp` (the injected layers: 1.4x at "
        "1B/3B, see the last column). "
        "`tli (native)` is the command line (`tli upscale`), whose start-up is shown on its own "
        "(`tli upscale --help`); "
        "`tli library call` is `tli_kernels.upscale.upscale()` in a fresh interpreter. `cp` keeps what it "
        "writes in the page cache; the engine drops its output pages once written (docs/engine.md), which is "
        "why it overtakes `cp` once the output no longer fits comfortably in memory.",
        "",
        f"Load average (1 min) before the jobs: median {load:.1f}, from other work on the machine; it is "
        "recorded per run in the JSON.",
        "",
    ]
    rows = []
    for r in results["dense"].values():
        label = f"{r['preset']} ({gb(r['source_bytes'])})"
        rows += conversion_rows(label, r["source_bytes"], r["runs"], r["bytes_written"])
        paired = ", ".join(f"{x:.2f}" for x in r["tli_over_cp_per_rep"])
        rows.append(["", "tli (native) / cp, each repetition", paired, "", "", "", "", "", ""])
        st = r["cli_startup"]
        rows.append([
            "", "`tli upscale --help` alone (CLI start-up)", f"{st['wall_s']:.2f}", "", "", "",
            f"{st['cpu_s']:.1f}", f"{st['peak_rss_mib']:.0f} MiB", "",
        ])  # fmt: skip
        if r.get("skipped"):
            rows.append(["", f"not run at this size (would not fit in RAM): {', '.join(r['skipped'])}"] + [""] * 7)
    lines.append(markdown_table(CONVERSION_HEADERS, rows))
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
    p.add_argument("--workdir", default="/tmp/tli-bench", help="sources and outputs go here (~30 GB; 8b: ~40 GB)")
    p.add_argument("--sizes", default="135m,1b,3b", help=f"comma list of {', '.join(SIZES)} (empty: none)")
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
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown {unknown}; choose from {', '.join(SIZES)}")
    os.makedirs(args.workdir, exist_ok=True)
    results = {
        "command": "python benchmarks/bench_conversion.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
        "environment": environment(tools=tool_versions(args.workdir, args.mergekit)),
        "dense": {},
    }
    json_path = os.path.splitext(args.out)[0] + ".json"
    for size in sizes:
        results["dense"][size] = dense_size(args, size)
        with open(json_path, "w") as f:  # partial results survive an interrupted run
            json.dump(results, f, indent=2)
    if args.sparse_405b:
        results["sparse_405b"] = sparse_405b(args)
    results["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    with open(args.out, "w") as f:
        f.write(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
