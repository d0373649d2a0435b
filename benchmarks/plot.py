"""Plots from any results JSON of this folder (matplotlib, Agg backend: no display needed).

    python benchmarks/plot.py OUT/gpu_suite.json --out docs/bench_speedup.png      # or gpu_kernels.json
    python benchmarks/plot.py docs/bench_conversion.json --out docs/bench_conversion.png

GPU results (gpu_suite.json, or gpu_kernels.json with its single case): speed-up of each layer
configuration over the stock transformers layer against sequence length, one panel per model shape,
forward+backward solid and forward dashed, and the GEMM+attention reference's speed-up (stock /
reference: a layer whose work outside its unfused GEMMs and attention were free) in grey. Conversion
results (bench_conversion.json): source GB converted per second against model size, and peak RSS against
model size, one line per job.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402


def _gpu_models(data: dict) -> dict:
    """model -> {seq: cell} from either results format."""
    if "models" in data:
        return {
            model: {int(k[4:]): cell for k, cell in entry.items() if k.startswith("seq_") and "layer" in cell}
            for model, entry in data["models"].items()
            if isinstance(entry, dict) and "skipped" not in entry
        }
    case = data["settings"]["case"]  # gpu_kernels.json: one case at the top level
    return {
        case["model"]: {
            case["seq"]: {
                "layer": data.get("layer", {}),
                "gemm_attention_reference": data.get("gemm_attention_reference", {}),
            }
        }
    }


def plot_gpu(data: dict, path: str) -> str:
    models = {m: cells for m, cells in _gpu_models(data).items() if cells}
    if not models:
        raise ValueError("no layer timings in these results")
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, (model, cells) in zip(axes[0], models.items()):
        seqs = sorted(cells)
        names = sorted({n for s in seqs for n, e in cells[s]["layer"].items() if isinstance(e, dict) and n != "stock"})
        for i, name in enumerate(names):
            for key, style in (("speedup_forward_backward", "-"), ("speedup_forward", "--")):
                pts = [(s, cells[s]["layer"][name].get(key)) for s in seqs if name in cells[s]["layer"]]
                pts = [(s, y) for s, y in pts if y is not None]
                if pts:
                    label = f"{name} ({'fwd+bwd' if key == 'speedup_forward_backward' else 'fwd'})"
                    ax.plot(*zip(*pts), style, marker="o", color=f"C{i}", label=label)
        reference = []
        for s in seqs:
            stock = cells[s]["layer"].get("stock", {}).get("forward_backward", {}).get("median_ms")
            f = cells[s].get("gemm_attention_reference", {}).get("reference_forward_backward_ms")
            if stock and f:
                reference.append((s, stock / f))
        if reference:
            ax.plot(*zip(*reference), ":", marker="s", color="grey", label="GEMM+attention reference (fwd+bwd)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.set_xlabel("sequence length (tokens, batch as run)")
        ax.set_ylabel("speed-up over stock transformers layer")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    env = data.get("environment", {})
    device = (env.get("accelerator") or {}).get("name", "CPU")
    fig.suptitle(f"Decoder layer speed-up, {device}, {env.get('date_utc', '')} UTC")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_conversion(data: dict, path: str) -> str:
    sizes = sorted(data["dense"].values(), key=lambda r: r["source_bytes"])
    jobs = sorted({name for r in sizes for name, runs in r["runs"].items() if runs}, key=lambda n: (n != "cp -r", n))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, name in enumerate(jobs):
        pts = []
        for r in sizes:
            runs = r["runs"].get(name) or []
            if runs:
                wall = statistics.median(x["wall_s"] for x in runs)
                rss = max(x["peak_rss_mib"] for x in runs)
                pts.append((r["source_bytes"] / 1e9, r["source_bytes"] / wall / 1e9, rss))
        if not pts:
            continue
        x, gbps, rss = zip(*pts)
        style = dict(marker="o", color=f"C{i}", label=name, linestyle="--" if name == "cp -r" else "-")
        left.plot(x, gbps, **style)
        right.plot(x, rss, **style)
    ticks = [r["source_bytes"] / 1e9 for r in sizes]
    for ax in (left, right):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ticks, [f"{t:.2f}\n{r['preset']}" for t, r in zip(ticks, sizes)], fontsize=8)
        ax.set_xlabel("source checkpoint size (GB)")
        ax.grid(alpha=0.3, which="both")
    left.set_ylabel("source GB converted per second (median)")
    right.set_ylabel("peak RSS (MiB)")
    right.set_yscale("log")
    left.legend(fontsize=7)
    env = data.get("environment", {})
    machine = env.get("machine", {})
    fig.suptitle(
        f"Conversion (TLI K=2) vs cp -r, {machine.get('cpus', '?')} CPUs, {env.get('date_utc', '')} UTC "
        "(each job until on disk, warm page cache)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a results JSON (gpu_suite.json, gpu_kernels.json, bench_conversion.json)")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    path = plot_conversion(data, args.out) if "dense" in data else plot_gpu(data, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
