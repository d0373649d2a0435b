"""The whole GPU benchmark in one call: kernels, decoder layers, an end-to-end training step and a small
conversion, on one H100/H200 in under 8 minutes, written to OUT/gpu_suite.json (rewritten after every
section, so a run that is cut off keeps what it measured) and OUT/gpu_suite.md (+ OUT/speedup.png).

    PYTHONPATH=. python benchmarks/gpu_suite.py --out $OUT/gpu                  # GPU, ~6-7 minutes
    TRITON_INTERPRET=1 python benchmarks/gpu_suite.py --smoke --out /tmp/suite  # CPU, tiny, ~1 minute

Sections, in this order (the most wanted first):
  1. rates: the bf16 matmul rate (8192^3) and the device copy bandwidth;
  2. for each model shape (Llama-3-8B, Llama-3.2-1B, Llama-3-70B: one decoder layer each) and each
     sequence length (batch 1 x 4096, 1024, 2048, 8192 tokens): each tli kernel against the eager ops
     (forward, backward), the layer forward and forward+backward (stock transformers, tli, tli with
     fused gate/up, torch.compile of stock and tli at --compile-seq, Liger when importable, the stock
     layer under tli's SDPA order as a same-attention control), the GEMM+attention reference (the layer's
     GEMMs unfused + the best attention alone) and peak memory; what SDPA runs; bf16 correctness once
     per model;
     after the first model:
  3. e2e: tokens/s of a TLI-upscaled 1B-shaped model's training step (forward, backward, AdamW),
     stock against apply_tli_kernels;
  4. conversion: `tli upscale` (native engine if built, else the Python engine) against `cp -r` on a
     SmolLM2-135M-shaped checkpoint.
A time budget (--budget-s, default 420 s from the process's start) is checked before each cell: what would not fit is
recorded as skipped, and the markdown is written at the end (or rebuilt from the JSON with --render).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_kernels as gk  # noqa: E402
import training_step  # noqa: E402
from harness import Results, describe_environment, markdown_table, refuse_interpreter_on_cuda  # noqa: E402

FULL = dict(models=["llama3_8b", "llama3_1b", "llama3_70b"], seqs=[4096, 1024, 2048, 8192], batch=1, compile_seq=4096)
SMOKE = dict(models=["smoke"], seqs=[16, 32], batch=1, compile_seq=16)


class Budget:
    """Seconds left of --budget-s, and a per-model estimate of what the next cell costs."""

    def __init__(self, results: Results, seconds: float):
        self.results, self.seconds = results, seconds
        self.last: dict[str, tuple[int, float]] = {}  # model -> (tokens, seconds) of its last cell

    def left(self) -> float:
        return self.seconds - self.results.elapsed()

    def estimate(self, model: str, tokens: int) -> float:
        if model not in self.last:
            return 30.0
        prev_tokens, prev_seconds = self.last[model]
        return 1.5 * prev_seconds * max(1.0, tokens / prev_tokens) ** 1.3  # attention grows faster than linear

    def allows(self, needed: float) -> bool:
        return self.left() > needed


def skip(results: Results, key: str, why: str) -> None:
    print(f"    {key} skipped: {why}", flush=True)
    results.put(key, {"skipped": why})
    results.save()


def model_sweep(bench: gk.Bench, model: str, args: argparse.Namespace, budget: Budget) -> None:
    results = bench.results
    base = f"models/{model}"
    if not budget.allows(40):
        skip(results, base, f"time budget: {budget.left():.0f} s left")
        return
    results.put(f"{base}/dims", gk.MODELS[model])
    try:
        layers = gk.Layers(bench, model)
    except Exception as error:  # e.g. out of memory: recorded, the other models still run
        results.put(f"{base}/build", {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
        results.save()
        return
    results.section(f"{base}/attention_backend", gk.attention_record, bench, gk.Case(model, args.batch, max(args.seqs)))
    extra, liger_calls, liger_missing = gk.liger_extra(bench, layers, not args.no_liger)
    results.put(
        f"{base}/liger", {"unavailable": liger_missing} if liger_missing else {"parts": ["rms_norm", "swiglu", "rope"]}
    )
    results.section(f"{base}/correctness", gk.check_correctness, bench, layers,
                    gk.Case(model, args.batch, min(args.seqs)), extra)  # fmt: skip
    for seq in args.seqs:
        case = gk.Case(model, args.batch, seq)
        key = f"{base}/seq_{seq}"
        estimate = budget.estimate(model, case.tokens)
        if not budget.allows(estimate):
            skip(results, key, f"time budget: {budget.left():.0f} s left, ~{estimate:.0f} s needed")
            continue
        started = time.perf_counter()
        compiled = (
            seq == args.compile_seq
            and not args.no_compile
            and model in args.compile_models
            and budget.allows(args.compile_reserve)
        )
        if seq == args.compile_seq and not args.no_compile and not compiled:
            results.put(f"{key}/compile_skipped", f"time budget or --compile-models: {budget.left():.0f} s left")
        if compiled:
            torch._dynamo.reset()  # a fresh cache per model: no recompiles, no dynamic shapes carried over
        results.section(f"{key}/kernels", gk.measure_kernels, bench, case)
        configs = gk.layer_configs(bench, layers, compiled=compiled, extra=extra, case=case)
        results.section(f"{key}/layer", gk.measure_layer, bench, layers, case, configs)
        results.section(f"{key}/gemm_attention_reference", gk.measure_gemm_attention_reference, bench, case)
        seconds = time.perf_counter() - started
        if not compiled:  # compile time says nothing about the next cell
            budget.last[model] = (case.tokens, seconds)
        results.put(f"{key}/seconds", round(seconds, 1))
        results.save()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()  # after an out-of-memory section too: the next cell starts clean
    if liger_calls:
        results.put(f"{base}/liger/rope_patched_calls", len(liger_calls))
    del layers, extra
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()


def conversion(workdir: str, smoke: bool, reps: int) -> dict:
    """tli upscale (native if built, else python) against cp -r on a small generated checkpoint."""
    import bench_conversion as bc

    from tli_kernels.checkpoint import executor_native
    from tli_kernels.checkpoint.synthetic import llama_config, write_checkpoint

    engine = "native" if executor_native.available() else "python"
    os.makedirs(workdir, exist_ok=True)
    src, out = os.path.join(workdir, "src"), os.path.join(workdir, "out")
    shape = dict(bc.SMOLLM2_135M, num_hidden_layers=4, vocab_size=1024) if smoke else bc.SMOLLM2_135M
    config = llama_config("llama-3.2-1b", **shape)
    write_checkpoint(src, config, fill="dense", num_shards=1)
    tli = bc.tli_commands(src, out)
    jobs = {
        "cp -r": f"cp -r {shlex.quote(src)} {shlex.quote(out)}",
        f"tli library call ({engine} engine)": tli[
            "tli library call (no CLI)" if engine == "native" else "tli library call, python engine"
        ],
    }
    runs, written = bc.run_jobs(jobs, out, reps=reps, baseline_reps=reps, fast=tuple(jobs), label="conversion")
    source_bytes = bc.disk_bytes(src)[0]
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "engine": engine,
        "engine_note": None
        if engine == "native"
        else f"native engine not built: {executor_native.unavailable_reason()}",
        "source": f"SmolLM2-135M-shaped synthetic checkpoint ({config['num_hidden_layers']} layers)",
        "source_bytes": source_bytes,
        "commands": jobs,
        "runs": runs,
        "bytes_written": written,
    }


# --------------------------------------------------------------------------------------- report
def markdown(data: dict) -> str:
    import bench_conversion as bc

    env, settings = data["environment"], data["settings"]
    device = (env.get("accelerator") or {}).get("name", "CPU (smoke run: timings mean nothing)")
    lines = [
        f"# tli GPU suite on {device} ({env['date_utc']} UTC)",
        "",
        describe_environment(env),
        "",
        f"Command: `{data['command']}`. dtype {settings['dtype']}; {settings['timing']}. Wall time "
        f"{data.get('wall_s', 'n/a')} s of a {settings['budget_s']} s budget.",
        "",
        "Baselines, each measured in the same run: the stock transformers layer (and the eager PyTorch ops it "
        "runs) for speed-ups (= stock time / time); the GEMM+attention reference (the layer's seven GEMMs "
        "timed alone, unfused, + the fastest attention kernel alone) for `/ GEMM+attn ref` (= time / "
        "reference time; 1.00x would be no cost outside GEMMs and attention; a fused GEMM can go below).",
        "",
        gk.rates_line(data.get("rates", {}), settings["dtype"]),
        "",
    ]
    for model, entry in (data.get("models") or {}).items():
        if "skipped" in entry:
            lines += [f"## {model}: skipped ({entry['skipped']})", ""]
            continue
        dims = entry.get("dims", {})
        if isinstance(entry.get("build"), dict) and "error" in entry["build"]:
            lines += [f"## {model}: the layer could not be built ({entry['build']['error']})", ""]
            continue
        lines += [
            f"## {model} decoder layer (hidden {dims.get('hidden')}, intermediate {dims.get('intermediate')}, "
            f"{dims.get('heads')} heads / {dims.get('kv_heads')} KV heads, head_dim {dims.get('head_dim')})",
            "",
            *gk.attention_lines(entry.get("attention_backend")),
        ]
        layer_rows, kernel_rows, skipped = [], [], []
        for key, cell in entry.items():
            if not key.startswith("seq_"):
                continue
            label = f"1x{key[4:]}"
            if "skipped" in cell:
                skipped.append(f"{label}: {cell['skipped']}")
                continue
            layer = cell.get("layer", {})
            if isinstance(layer, dict) and "error" not in layer:
                layer_rows += gk.layer_rows(label, layer, cell.get("gemm_attention_reference", {}))
            kernels = cell.get("kernels", {})
            if isinstance(kernels, dict) and "error" not in kernels:
                kernel_rows += gk.kernel_rows(label, kernels)
            for name in ("kernels", "layer", "gemm_attention_reference"):
                if isinstance(cell.get(name), dict) and "error" in cell[name]:
                    skipped.append(f"{label} {name}: failed, {cell[name]['error']}")
        if layer_rows:
            lines += [markdown_table(gk.LAYER_HEADERS, layer_rows), ""]
        if kernel_rows:
            lines += [markdown_table(gk.KERNEL_HEADERS, kernel_rows), ""]
        if skipped:
            lines += ["Not measured: " + "; ".join(skipped), ""]
        lines += gk.correctness_lines(entry.get("correctness", {}))
    e2e = data.get("e2e")
    if isinstance(e2e, dict):
        lines += ["## End to end: training step", ""]
        if "configs" in e2e:
            lines += [training_step.markdown(e2e), ""]
        else:
            lines += [f"Not measured: {e2e.get('skipped') or e2e.get('error')}", ""]
    conv = data.get("conversion")
    if isinstance(conv, dict):
        lines += ["## Conversion (small)", ""]
        if "runs" in conv:
            label = f"{conv['source']} ({conv['source_bytes'] / 1e9:.2f} GB)"
            rows = bc.conversion_rows(label, conv["source_bytes"], conv["runs"], conv["bytes_written"])
            lines += [
                f"Engine: {conv['engine']}{' (' + conv['engine_note'] + ')' if conv.get('engine_note') else ''}. "
                "Baseline: `cp -r` of the same source, same run; each job `CMD && sync`, median wall.",
                "",
                markdown_table(bc.CONVERSION_HEADERS, rows),
                "",
            ]
        else:
            lines += [f"Not measured: {conv.get('skipped') or conv.get('error')}", ""]
    return "\n".join(lines)


def plot(data: dict, out: Path) -> str | None:
    try:
        import plot as plotting

        return plotting.plot_gpu(data, str(out / "speedup.png"))
    except Exception as error:  # matplotlib missing: the JSON and markdown still stand
        return f"no plot: {type(error).__name__}: {error}"


# ------------------------------------------------------------------------------------------ main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_suite.json, gpu_suite.md, speedup.png")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1), to show it runs")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds from start after which no new cell starts (default 420)")  # fmt: skip
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(m for m in gk.MODELS if m != 'smoke')}")
    p.add_argument("--seqs", default=None, help="comma list of sequence lengths (batch 1)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--compile-seq", type=int, default=None, help="the sequence length timed under torch.compile")
    p.add_argument("--compile-models", default=None, help="models timed under torch.compile (default: all)")
    p.add_argument("--compile-reserve", type=float, default=None, help="compile only with this many s left")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-liger", action="store_true")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--no-conversion", action="store_true")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--workdir", default=None, help="scratch folder for the conversion (default: a temp folder)")
    p.add_argument("--render", action="store_true", help="only rebuild OUT/gpu_suite.md from OUT/gpu_suite.json")
    args = p.parse_args(argv)
    d = SMOKE if args.smoke else FULL
    args.models = args.models.split(",") if args.models else d["models"]
    unknown = [m for m in args.models if m not in gk.MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}")
    args.seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else d["seqs"]
    args.batch = args.batch or d["batch"]
    args.compile_seq = args.compile_seq or d["compile_seq"]
    args.compile_models = args.compile_models.split(",") if args.compile_models else args.models
    args.compile_reserve = args.compile_reserve if args.compile_reserve is not None else (0 if args.smoke else 180)
    args.budget_s = args.budget_s or (600 if args.smoke else 420)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 5)
    args.reps = args.reps if args.reps is not None else (1 if args.smoke else 30)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        import json

        (out / "gpu_suite.md").write_text(markdown(json.loads((out / "gpu_suite.json").read_text())))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    refuse_interpreter_on_cuda(device)
    if device.type != "cuda" and not args.smoke:
        print("gpu_suite: no CUDA device; use --smoke on CPU", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: OpenMP threads spinning against other work only add noise
        args.no_compile = True  # inductor on CPU needs a C++ toolchain and minutes; not what this checks
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    results = Results(
        out / "gpu_suite.json",
        since_process_start=True,  # the budget counts the imports too
        command="python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings={
            **{k: v for k, v in vars(args).items() if k not in ("out", "render")},
            "dtype": str(dtype),
            "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            "timing": "eager call: CUDA events per call after a sync, median of reps after warm-up, inputs "
            "rotated to overflow L2; kernel only: torch.profiler device time per call"
            if device.type == "cuda"
            else "perf_counter per call on CPU (smoke run: the timings mean nothing)",
            **gk.bench_flags(device),
        },
    )
    bench = gk.Bench(results, device=device, dtype=dtype, warmup=args.warmup, reps=args.reps,
                     max_sets=2 if args.smoke else 8)  # fmt: skip
    budget = Budget(results, args.budget_s)
    print(f"tli gpu_suite: {results.data['environment']['accelerator'] or 'CPU'} -> {out}", flush=True)
    results.section("rates", gk.measure_rates, bench, **gk.RATES["smoke" if args.smoke else "full"])
    for index, model in enumerate(args.models):
        model_sweep(bench, model, args, budget)
        if index == 0 and not args.no_e2e:
            spec = training_step.SPECS["smoke" if args.smoke else "full"]
            if budget.allows(60 if not args.smoke else 0):
                dt = dtype if device.type == "cuda" else torch.float32
                results.section("e2e", training_step.measure_training_step, spec, device, dt)
            else:
                skip(results, "e2e", f"time budget: {budget.left():.0f} s left")
    if not args.no_conversion:
        if budget.allows(30 if not args.smoke else 0):
            workdir = args.workdir or tempfile.mkdtemp(prefix="tli-suite-")
            results.section("conversion", conversion, os.path.join(workdir, "conversion"), args.smoke, 3)
        else:
            skip(results, "conversion", f"time budget: {budget.left():.0f} s left")
    with contextlib.suppress(Exception):
        results.put("plot", plot(results.data, out))
    results.put("wall_s", round(results.elapsed(), 1))
    results.save()
    text = markdown(results.data)
    (out / "gpu_suite.md").write_text(text)
    print(text, flush=True)
    failed = [m for m, e in (results.data.get("models") or {}).items() if e.get("correctness", {}).get("pass") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
