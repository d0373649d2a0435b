"""The quality study's markdown tables and plots, made from its JSON document alone (so they can be
redrawn without rerunning anything: `python -m tli_kernels.training.report docs/quality_results.json`)."""

from __future__ import annotations

import json
import os
import sys


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _seconds(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def _runs(doc: dict) -> dict[str, dict]:
    return {r["name"]: r for r in doc["runs"]}


def markdown(doc: dict) -> str:
    p, m = doc["preset"], doc["machine"]
    tokens_per_step = p["seq_len"] * p["micro_batch"] * p["accum"]
    runs = _runs(doc)
    source = doc.get("source_description") or f"SmolLM2-135M (`{os.path.basename(doc.get('source') or '')}`)"
    lines = [
        "# Quality study results",
        "",
        *(
            ["**Unfinished**: the study was still running when this was written.", ""]
            if doc.get("status") == "running"
            else []
        ),  # fmt: skip
        f"Command: `{doc['command']}`  ",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores, torch threads {m['torch_threads']})"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; {m['date']}.  ",
        *([doc["environment_text"] + "  "] if doc.get("environment_text") else []),
        f"Source: {source}. Training: the King James train split, "
        f"{p['steps']} AdamW steps of {tokens_per_step} tokens ({p['micro_batch'] * p['accum']} windows of "
        f"{p['seq_len']}), {p['steps'] * tokens_per_step:,} tokens in all, the same windows in the same order for "
        f"every run; lr {p['lr']:g}, {p['warmup']} warm-up steps, cosine to {p['min_lr_ratio']:g} x lr, "
        f"weight decay 0.1, clipping 1.0, {doc.get('precision', 'fp32')}"
        + (", tli kernels" if doc.get("kernels") else "")
        + ".  ",
        f"Held-out loss (nats/token): the first {p['eval_tokens']} tokens of the King James held-out split "
        f"(never trained on), windows of {p['seq_len']}.",
        *(_timing(doc)),
        "",
        *_base_lines(doc.get("base")),
        *_problems(doc),
    ]
    order = doc.get("trained_order") or []
    if order:
        src = runs.get("source", {}).get("trained")
        src_final = src["evals"][-1]["heldout_loss"] if src else None
        lines += [
            f"## Held-out loss after upscaling (step 0) and after {p['steps']} steps",
            "",
            f"| run | method | layers | params | step 0 | step {p['steps']} | vs source trained | s/step |",
            "|---|---|--:|--:|--:|--:|--:|--:|",
        ]
        for name in order:
            r = runs[name]
            t = r["trained"]
            final = t["evals"][-1]["heldout_loss"]
            delta = "–" if src_final is None or name == "source" else f"{final - src_final:+.4f}"
            lines.append(
                f"| {name} | {r['describe']} | {r['layers']} | {r['parameters'] / 1e6:.1f}M | "
                f"{_fmt(r['initial_loss'])} | **{_fmt(final)}** | {delta} | {_seconds(t['seconds_per_step'])} |"
            )
        lines += ["", "Held-out loss during training:", ""]
        steps = [e["step"] for e in runs[order[0]]["trained"]["evals"]]
        lines.append("| run | " + " | ".join(f"step {s}" for s in steps) + " |")
        lines.append("|---|" + "--:|" * len(steps))
        for name in order:
            evals = {e["step"]: e["heldout_loss"] for e in runs[name]["trained"]["evals"]}
            lines.append(f"| {name} | " + " | ".join(_fmt(evals.get(s)) for s in steps) + " |")
        lines += _seed_table(runs, order, p)
        learnt = [(n, runs[n]["trained"]["alphas"]) for n in order if runs[n]["trained"].get("alphas")]
        for name, alphas in learnt:
            base = _base_alpha(runs[name])
            values = ", ".join(f"{i}: {base * a:.3f}" for i, a in alphas.items())
            lines += ["", f"Learnt alpha of {name} (effective, per injected layer): {values}."]
        lines.append("")

    lines += _initial_tables(doc)
    return "\n".join(lines) + "\n"


def _timing(doc: dict) -> list[str]:
    if doc.get("elapsed_s") is None:
        return []
    budget = f" of a {doc['budget_s']:g} s budget" if doc.get("budget_s") is not None else ""
    return [f"Time: {doc['elapsed_s']:.0f} s from the start of the command{budget}."]


def _base_lines(base: dict | None) -> list[str]:
    """The base model made for the study: its size, pretraining and time."""
    if not base:
        return []
    spec = base["spec"]
    evals = base.get("evals") or []
    held = f", held-out loss {evals[-1]['heldout_loss']:.4f} (bf16/fp32 as trained)" if evals else ""
    return [
        "## Base model",
        "",
        f"{base['describe']}: {base['parameters'] / 1e6:.1f}M parameters. Pretrained from scratch with tli's "
        f"trainer: {spec['steps']} steps of {base['tokens_per_step']} tokens (windows of {spec['seq_len']}), "
        f"{base['epochs']:.1f} passes over the {base['train_tokens']:,}-token train split, lr {spec['lr']:g} "
        f"({spec['warmup']} warm-up steps, cosine to {spec['min_lr_ratio']:g} x){held}; "
        f"{base['seconds_pretrain']:.0f} s of training ({base['seconds_per_step'] * 1000:.0f} ms/step), "
        f"{base['seconds']:.0f} s with the tokenizer and data.",
        "",
    ]


def _problems(doc: dict) -> list[str]:
    lines = []
    for title, key, field in (("Failed runs", "failures", "error"), ("Failed checks", "check_failures", "message"),
                              ("Skipped", "skipped", "reason")):  # fmt: skip
        items = doc.get(key) or []
        if items:
            lines += [f"{title}:", ""]
            lines += [f"- {i['name']}" + (f" ({i['stage']})" if i.get("stage") else "") + f": {i[field]}"
                      for i in items]  # fmt: skip
            lines.append("")
    return lines


def _seed_table(runs: dict, order: list[str], p: dict) -> list[str]:
    """Runs repeated with other data orders: final loss per seed, the mean, and the gap to the source."""
    seeds: dict[str, dict[int, float]] = {}
    for name in order:
        base, _, seed = name.partition("-seed")
        if seed.isdigit():
            seeds.setdefault(base, {})[int(seed)] = runs[name]["trained"]["evals"][-1]["heldout_loss"]
    for base in seeds:
        if base in runs and runs[base].get("trained"):
            seeds[base][p.get("seed", 0)] = runs[base]["trained"]["evals"][-1]["heldout_loss"]
    if not seeds:
        return []
    all_seeds = sorted({s for v in seeds.values() for s in v})
    lines = [
        "",
        f"Repeated with other data orders (held-out loss at step {p['steps']}; the gap is to the source model "
        "trained on the same data order):",
        "",
        "| run | " + " | ".join(f"seed {s}" for s in all_seeds) + " | mean | gap to source, per seed |",
        "|---|" + "--:|" * (len(all_seeds) + 2),
    ]
    source = seeds.get("source", {})
    for base, per_seed in seeds.items():
        cells = [_fmt(per_seed.get(s)) for s in all_seeds]
        mean = sum(per_seed.values()) / len(per_seed)
        gaps = ", ".join(f"{per_seed[s] - source[s]:+.4f}" for s in all_seeds if s in per_seed and s in source)
        lines.append(f"| {base} | " + " | ".join(cells) + f" | {mean:.4f} | {gaps if base != 'source' else '–'} |")
    return lines


def _base_alpha(run: dict) -> float:
    return float((run.get("options") or {}).get("alpha", 1.0))


def _initial_tables(doc: dict) -> list[str]:
    p = doc["preset"]
    runs = _runs(doc)
    if "source" not in runs:
        return []
    source = runs["source"]["initial_loss"]
    lines = [
        "## TLI right after upscaling (step 0), by K, init and alpha",
        "",
        f"Source model: {source:.4f}. `zero` is the identity (= block expansion / LLaMA Pro), whatever alpha.",
        "",
    ]
    alphas = p["grid_alphas"]
    for k in p["grid_ks"]:
        zero = runs.get(f"tli-k{k}-zero")
        any_run = runs.get(f"tli-k{k}-copy-a{alphas[0]:g}")
        depth = f", {any_run['layers']} layers, {any_run['parameters'] / 1e6:.1f}M parameters" if any_run else ""
        lines += [f"K = {k}{depth}:", "", "| init | " + " | ".join(f"alpha {a:g}" for a in alphas) + " |"]
        lines.append("|---|" + "--:|" * len(alphas))
        for init in ("copy", "average", "random"):
            cells = [_fmt(runs.get(f"tli-k{k}-{init}-a{a:g}", {}).get("initial_loss")) for a in alphas]
            lines.append(f"| {init} | " + " | ".join(cells) + " |")
        if zero:
            lines.append("| zero | " + " | ".join(_fmt(zero["initial_loss"]) for _ in alphas) + " |")
        lines.append("")
    others = [r for r in doc["runs"] if not r["name"].startswith(("source", "tli-"))]
    if others:
        lines += [
            "Other methods at step 0:",
            "",
            "| run | method | layers | params | step 0 |",
            "|---|---|--:|--:|--:|",
        ]
        for r in others:
            lines.append(
                f"| {r['name']} | {r['describe']} | {r['layers']} | {r['parameters'] / 1e6:.1f}M | "
                f"{_fmt(r['initial_loss'])} |"
            )
        lines.append("")
    return lines


def plots(doc: dict, out: str) -> list[str]:
    """quality_loss.png (held-out loss against steps) and quality_init.png (step 0 by alpha)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    runs = _runs(doc)
    p = doc["preset"]
    written = []
    order = [n for n in doc.get("trained_order") or [] if "-seed" not in n]  # repeats would only clutter it
    if order:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        cmap = plt.get_cmap("tab20")
        for ax, zoom in zip(axes, (False, True)):
            for j, name in enumerate(order):
                evals = runs[name]["trained"]["evals"]
                xs = [e["step"] for e in evals]
                ys = [e["heldout_loss"] for e in evals]
                style = {"color": cmap(j % 20)}
                if name.startswith("source"):
                    style = {"color": "black" if name == "source" else "gray", "linestyle": "--", "linewidth": 2}
                ax.plot(xs, ys, marker="o", markersize=3, label=name, **style)
            ax.set_xlabel(f"training step ({p['seq_len'] * p['micro_batch'] * p['accum']} tokens each)")
            ax.set_ylabel("held-out loss (nats/token)")
            ax.grid(alpha=0.3)
            if zoom:
                finals = [runs[n]["trained"]["evals"][-1]["heldout_loss"] for n in order]
                lo, hi = min(finals), max(finals)
                pad = max(0.02, (hi - lo) * 0.3)
                ax.set_ylim(lo - pad, hi + pad)
                ax.set_xlim(p["steps"] * 0.4, p["steps"] * 1.02)
                ax.set_title("zoom on the end of training")
            else:
                what = "the base Llama" if doc.get("base") else "SmolLM2-135M"
                ax.set_title(f"{what} upscaled, continued pretraining on King James")
        axes[1].legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        path = os.path.join(out, "quality_loss.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if not p["grid_ks"]:
        return written
    if "source" not in runs:
        return written
    fig, axes = plt.subplots(1, len(p["grid_ks"]), figsize=(4.5 * len(p["grid_ks"]), 4), sharey=True, squeeze=False)
    source = runs["source"]["initial_loss"]
    for ax, k in zip(axes[0], p["grid_ks"]):
        for init, color in (("copy", "C0"), ("average", "C1"), ("random", "C2")):
            pts = [(a, runs[f"tli-k{k}-{init}-a{a:g}"]["initial_loss"]) for a in p["grid_alphas"]
                   if f"tli-k{k}-{init}-a{a:g}" in runs]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=init)
        ax.axhline(source, color="black", linestyle="--", label="source = zero init")
        ax.set_xscale("log")
        ax.set_xlabel("alpha")
        ax.set_title(f"K = {k}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out loss at step 0")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "quality_init.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "docs/quality_results.json"
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    out = os.path.dirname(path) or "."
    with open(os.path.join(out, "quality_results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(doc))
    plots(doc, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
