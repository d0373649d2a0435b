"""Recipe benchmark: one mergekit passthrough recipe over two Llama-3.2-1B-shaped models, run by
`tli upscale RECIPE.yml` and by `mergekit-yaml RECIPE.yml` side by side in one session, with `cp -r`
of one source as the floor; then the two outputs compared tensor by tensor.

The recipe takes layers [0, 12) of model A and [4, 16) of model B (two different random models of
the same shape, `tli_kernels.checkpoint.synthetic`, bf16): 24 layers, the SOLAR-like two-model
merge. Jobs are timed to "on disk" (`CMD && sync`) by benchmarks/harness.py's `run_process` (wall,
CPU, peak RSS of the process tree), in alternating order, page cache warm, output removed and synced
before each job (bench_conversion.py's protocol). The comparison streams one tensor at a time
(safetensors + torch): names, dtypes, bits (-0.0 vs +0.0 counted separately).

    python benchmarks/bench_recipe.py --workdir /work/bench-recipe --reps 3 \
        --mergekit /work/venvs/mergekit/bin/mergekit-yaml --out docs/bench_recipe.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_conversion import TLI, clean, disk_bytes, gb, rss_cell, summarize, timed, tool_versions  # noqa: E402
from harness import describe_environment, environment, markdown_table  # noqa: E402

PRESET = "llama-3.2-1b"
SLICES = (("a", 0, 12), ("b", 4, 16))


def write_sources(workdir: str) -> dict[str, str]:
    from tli_kernels.checkpoint.synthetic import write_preset

    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        path = os.path.join(workdir, f"src-1b-{name}")
        if not os.path.exists(os.path.join(path, "config.json")):
            print(f"writing dense {PRESET} (seed {seed}) to {path} ...", flush=True)
            shutil.rmtree(path, ignore_errors=True)
            write_preset(path, PRESET, fill="dense", seed=seed)
        out[name] = path
    return out


def recipe_text(sources: dict[str, str]) -> str:
    lines = ["slices:"]
    for name, a, b in SLICES:
        lines += ["  - sources:", f"      - model: {sources[name]}", f"        layer_range: [{a}, {b}]"]
    return "\n".join(lines + ["merge_method: passthrough", "dtype: bfloat16", ""])


def compare_outputs(ours: str, theirs: str) -> dict:
    """Tensor by tensor, one at a time: equal bits, equal but for the sign of zero, or different."""
    import glob

    import torch
    from safetensors import safe_open

    def index(path):
        return {k: f for f in glob.glob(os.path.join(path, "*.safetensors")) for k in safe_open(f, "pt").keys()}

    a, b = index(ours), index(theirs)
    result = {
        "tensors": len(a),
        "same_names": set(a) == set(b),
        "identical": 0,
        "sign_of_zero_only": 0,
        "different": [],
    }
    for name in sorted(set(a) & set(b)):
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            result["different"].append(name)
        elif torch.equal(x.view(torch.int16), y.view(torch.int16)):
            result["identical"] += 1
        elif torch.equal(x, y):  # equal as numbers: only -0.0 against +0.0
            result["sign_of_zero_only"] += 1
        else:
            result["different"].append(name)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/tli-bench-recipe", help="two 2.5 GB sources and an output (~9 GB)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of cp and tli")
    p.add_argument("--mergekit-reps", type=int, default=2, help="repetitions of mergekit")
    p.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="mergekit-yaml executable")
    p.add_argument("--out", default="docs/bench_recipe.md", help="markdown; the JSON goes next to it")
    args = p.parse_args(argv)
    if not args.mergekit:
        p.error("--mergekit: give the mergekit-yaml executable (pip install mergekit in its own venv)")
    os.makedirs(args.workdir, exist_ok=True)
    sources = write_sources(args.workdir)
    recipe = os.path.join(args.workdir, "recipe.yml")
    with open(recipe, "w") as f:
        f.write(recipe_text(sources))
    out = os.path.join(args.workdir, "out")
    q = shlex.quote
    jobs = {
        "cp -r (source A)": f"cp -r {q(sources['a'])} {q(out)}",
        "tli upscale RECIPE (native)": " ".join(map(q, [*TLI, "upscale", recipe, out, "--quiet"])),
        "mergekit-yaml RECIPE": f"{q(args.mergekit)} {q(recipe)} {q(out)} --no-copy-tokenizer --quiet",
    }
    runs: dict[str, list] = {k: [] for k in jobs}
    written: dict[str, int] = {}
    names = list(jobs)
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            if name.startswith("mergekit") and rep >= args.mergekit_reps:
                continue
            clean(out)
            r = timed(jobs[name])
            written[name] = disk_bytes(out)[0]
            runs[name].append(r)
            print(f"rep {rep} {name:30s} {r}", flush=True)
    # the outputs side by side, tensor by tensor
    ours, theirs = os.path.join(args.workdir, "out-tli"), os.path.join(args.workdir, "out-mergekit")
    for path, cmd in ((ours, jobs["tli upscale RECIPE (native)"]), (theirs, jobs["mergekit-yaml RECIPE"])):
        clean(path)
        timed(cmd.replace(q(out), q(path)))
    comparison = compare_outputs(ours, theirs)
    clean(ours), clean(theirs), clean(out)
    results = {
        "command": "python benchmarks/bench_recipe.py " + " ".join(map(q, argv or sys.argv[1:])),
        "environment": environment(tools=tool_versions(args.workdir, args.mergekit)),
        "recipe": recipe_text({"a": "A", "b": "B"}),
        "source_bytes": disk_bytes(sources["a"])[0] + disk_bytes(sources["b"])[0],
        "commands": jobs,
        "runs": runs,
        "bytes_written": written,
        "comparison": comparison,
    }
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    with open(args.out, "w") as f:
        f.write(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    env, runs = results["environment"], results["runs"]
    tools = env.get("tools", {})
    base = summarize(runs["cp -r (source A)"])["wall_s"]
    tli = summarize(runs["tli upscale RECIPE (native)"])
    mk = summarize(runs["mergekit-yaml RECIPE"])
    rows = []
    for name, job_runs in runs.items():
        s = summarize(job_runs)
        spread = f" ({s['wall_min']:.2f}-{s['wall_max']:.2f})" if s["reps"] > 1 else ""
        rows.append([name, f"{s['wall_s']:.2f}{spread}", f"{s['wall_s'] / base:.2f}", f"{s['cpu_s']:.1f}",
                     rss_cell(job_runs), gb(results["bytes_written"][name]), s["reps"]])  # fmt: skip
    c = results["comparison"]
    verdict = (
        f"{c['tensors']} tensors, same names: {c['same_names']}; bit-identical {c['identical']}, "
        f"equal but for the sign of zero {c['sign_of_zero_only']}, different {len(c['different'])}"
    )
    lines = [
        "## Recipes: tli vs mergekit",
        "",
        f"Command: `{results['command']}`.",
        "",
        describe_environment(env) + f" Disk: {tools.get('filesystem', '?')}; mergekit {tools.get('mergekit', '?')}.",
        "",
        "The recipe (A, B: two Llama-3.2-1B-shaped bf16 checkpoints with different random weights, "
        f"{gb(results['source_bytes'])} together):",
        "",
        "```yaml",
        results["recipe"].rstrip(),
        "```",
        "",
        "Each job timed to on-disk (`CMD && sync`), alternating order, page cache warm; wall and CPU are medians "
        "(min-max), peak RSS the largest over the repetitions; `x cp` = median wall / the median wall of `cp -r` "
        "of source A in the same run.",
        "",
        markdown_table(["job", "wall s", "x cp", "CPU s", "peak RSS", "bytes written", "reps"], rows),
        "",
        f"tli / mergekit, same run: wall {tli['wall_s'] / mk['wall_s']:.3f}x ({mk['wall_s'] / tli['wall_s']:.1f}x "
        f"faster), peak RSS {max(x['peak_rss_mib'] for x in runs['tli upscale RECIPE (native)']):.0f} MiB vs "
        f"{max(x['peak_rss_mib'] for x in runs['mergekit-yaml RECIPE']):.0f} MiB.",
        "",
        f"Outputs compared tensor by tensor: {verdict}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
