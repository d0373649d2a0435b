"""The short GPU check (the Python half of benchmarks/gpu_check.sh): what matters first, in a few minutes.

Sections, in this order, each written to OUT/gpu_check.json as soon as it ends (a run cut off keeps
what it measured), under a hard time budget checked before each one (what would not fit is recorded
as skipped):
  1. sdpa: what SDPA really runs for the Llama-3-8B and 1B attention shapes, training and decode:
     torch/cuDNN versions, switches, priority order, torch's choice for a stock call and for tli's;
  2. layer_8b: one Llama-3-8B decoder layer, bf16, batch 2 x 4096 tokens, forward and forward+backward:
     stock transformers, tli, tli with a learnable alpha (an injected layer), the stock layer under
     tli's SDPA order (same attention kernel: the control), Liger-Kernel's layer when importable, and
     the GEMM+attention reference (seven unfused GEMMs + the best attention kernel
     alone); peak memory; bf16 errors of output and every gradient against a float32 layer with the
     same weights, each tli layer within 2x stock's own error;
  3. generate: greedy `generate()` tokens/s of a Llama-3.2-1B-shaped model (random weights, bf16), stock
     against `apply_tli_kernels`, batch 1 (no mask) and batch 4 left-padded (the masked GQA path), with
     the SDPA backend each side runs for the prompt and the decode steps, and tli under torch's own SDPA
     order (stock's backend) as the same-backend control;
  4. layer_1b: the same as 2 for Llama-3.2-1B's layer (no torch.compile);
  5. layer_8b_compiled: torch.compile(stock) at the 8B shape, with what is left (its first compile
     takes tens of seconds), merged into layer_8b's table;
  6. kernels_8b: each tli kernel against the eager PyTorch ops at the 8B shape: eager-call and
     kernel-only (profiler) times, GB/s (the suite has these too: last).

    python benchmarks/gpu_check.py --out DIR [--budget-s 170]     # GPU
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke --out DIR   # CPU, tiny shapes, meaningless times
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_kernels as gk  # noqa: E402
from harness import Results, describe_environment, fmt, fmt_ratio, markdown_table, refuse_interpreter_on_cuda  # noqa: E402

FULL = {
    "layer_8b": gk.Case("llama3_8b", 2, 4096),
    "layer_1b": gk.Case("llama3_1b", 2, 4096),
    "generate": dict(model="llama3_1b", layers=16, vocab=128256, prompt=128, new_tokens=128, padded_batch=4),
}
SMOKE = {
    "layer_8b": gk.Case("smoke", 1, 16),
    "layer_1b": gk.Case("smoke", 1, 8),
    "generate": dict(model="smoke", layers=2, vocab=256, prompt=8, new_tokens=4, padded_batch=2, rounds=2),
}


class Budget:
    """Seconds left of the budget; runs a section only when it fits, and rewrites the markdown after
    each one (the shell script's hard timeout may end the process in the last section)."""

    def __init__(self, results: Results, seconds: float, markdown_path: Path):
        self.results, self.seconds, self.markdown_path = results, seconds, markdown_path

    def left(self) -> float:
        return self.seconds - self.results.elapsed()

    def run(self, key: str, needs: float, fn, *args, **kwargs):
        """Run a section if `needs` seconds are left, else record it as skipped."""
        if self.left() < needs:
            why = f"time budget: {self.left():.0f} s left of {self.seconds:.0f}, ~{needs:.0f} s needed"
            print(f"    {key} skipped: {why}", flush=True)
            self.results.put(key, {"skipped": why})
            self.results.save()
            return None
        value = self.results.section(key, fn, *args, **kwargs)
        self.results.put("wall_s", round(self.results.elapsed(), 1))
        self.results.save()
        self.markdown_path.write_text(markdown(self.results.data))
        return value


# ------------------------------------------------------------------------------------------ sections
def sdpa_section(bench: gk.Bench, cases: dict) -> dict:
    return {name: gk.attention_record(bench, case) for name, case in cases.items() if name.startswith("layer")}


def layer_section(bench: gk.Bench, case: gk.Case, *, compiled: bool, liger: bool) -> dict:
    """Correctness, then timings, then the GEMM+attention reference, of one decoder layer."""
    from tli_kernels.modules import patch_decoder_layer

    layers = gk.Layers(bench, case.model)
    learnable = copy.deepcopy(layers.stock)  # an injected layer under training: alpha a float32 parameter
    patch_decoder_layer(learnable, residual_scale=1.0, learnable=True)
    extra, _, liger_missing = gk.liger_extra(bench, layers, liger)
    extra["tli_learnable_alpha"] = (learnable, contextlib.nullcontext)
    out = {"case": vars(case), "dims": case.dims, "liger": liger_missing or "measured"}
    out["correctness"] = gk.check_correctness(bench, layers, case, extra, judged=("tli_learnable_alpha",))
    configs = gk.layer_configs(bench, layers, compiled=False, extra=extra, case=case)
    configs.pop("tli_fused_gate_up", None)  # the suite measures it; this check keeps to what was asked
    if compiled:
        configs["stock_compiled"] = (torch.compile(layers.stock), contextlib.nullcontext)
    out["layer"] = gk.measure_layer(bench, layers, case, configs)
    out["gemm_attention_reference"] = gk.measure_gemm_attention_reference(bench, case)
    reference = out["gemm_attention_reference"].get("reference_forward_backward_ms")
    for entry in out["layer"].values():
        if "forward_backward" in entry and reference:
            entry["forward_backward_over_reference"] = entry["forward_backward"]["median_ms"] / reference
    return out


def generate_section(bench: gk.Bench, spec: dict) -> dict:
    """Tokens/s of greedy generate() on the same weights, alternating, best of the rounds after a warm-up:
    stock; tli (its own SDPA order: cuDNN first for the prompt, not for one-token steps); and, on CUDA, tli
    under torch's own order, the same attention backend as stock (the control that separates the
    kernels from the backend). What SDPA runs for the prompt and for a decode step is recorded per side."""
    from transformers import LlamaForCausalLM

    from tli_kernels import ops
    from tli_kernels.integrations import apply_tli_kernels

    config = gk.llama_config(gk.MODELS[spec["model"]], num_hidden_layers=spec["layers"], vocab_size=spec["vocab"],
                             tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(bench.device):
        model = LlamaForCausalLM(config).to(bench.dtype).eval()
    generator = torch.Generator(device="cpu").manual_seed(0)
    prompts = {
        "batch 1, no padding": (torch.randint(0, spec["vocab"], (1, spec["prompt"]), generator=generator), None),
    }
    batch = spec["padded_batch"]
    ids = torch.randint(0, spec["vocab"], (batch, spec["prompt"]), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # left padding of 0, 8, 16... tokens: the masked (padded) attention path
        mask[row, : min(8 * row, spec["prompt"] - 1)] = 0
    prompts[f"batch {batch}, left-padded"] = (ids, mask)
    sides = {"stock": (False, contextlib.nullcontext), "tli": (True, contextlib.nullcontext)}
    if bench.device.type == "cuda":
        sides["tli_under_torch_sdpa_order"] = (True, lambda: ops.attention_backend("sdpa"))
    result = {"model": spec, "parameters": sum(p.numel() for p in model.parameters()), "cases": {}}
    for name, (ids, mask) in prompts.items():
        ids = ids.to(bench.device)
        mask = mask.to(bench.device) if mask is not None else torch.ones_like(ids)
        settings = dict(attention_mask=mask, max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                        do_sample=False, use_cache=True, pad_token_id=0)  # fmt: skip
        runs = {side: [] for side in sides}
        tokens = {}
        for round_ in range(spec.get("rounds", 3)):  # round 0 warms up (kernels built, graphs made), not counted
            for side, (patched, context) in sides.items():
                handle = apply_tli_kernels(model) if patched else None
                try:
                    with context():
                        bench.sync()
                        started = time.perf_counter()
                        with torch.no_grad():
                            out = model.generate(ids, **settings)
                        bench.sync()
                        seconds = time.perf_counter() - started
                finally:
                    if handle is not None:
                        handle.undo(fold=False)
                new = out[:, ids.shape[1] :]
                tokens[side] = new
                if round_:
                    runs[side].append(new.numel() / seconds)
        entry = {f"{k}_tokens_per_s": max(v) for k, v in runs.items()}
        entry["runs_tokens_per_s"] = runs
        entry["tli_over_stock"] = entry["tli_tokens_per_s"] / entry["stock_tokens_per_s"]
        if "tli_under_torch_sdpa_order" in runs:
            entry["same_backend_tli_over_stock"] = (
                entry["tli_under_torch_sdpa_order_tokens_per_s"] / entry["stock_tokens_per_s"]
            )
        entry["attention"] = generate_attention(bench, config, ids.shape[0], ids.shape[1], spec["new_tokens"],
                                                masked=bool((mask == 0).any()))  # fmt: skip
        # bf16 greedy decoding may part ways after a near tie; the share that agrees is recorded, not judged
        entry["same_tokens_fraction"] = (tokens["tli"] == tokens["stock"]).float().mean().item()
        result["cases"][name] = entry
    del model
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def generate_attention(bench: gk.Bench, config, batch: int, prompt: int, new_tokens: int, masked: bool) -> dict:
    """The backend SDPA picks for the prompt and for a decode step (cache of prompt + new tokens), for a
    stock call and for tli's (auto order and torch's order): `ops.sdpa_report`, shortened."""
    from tli_kernels import ops

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    out = {}
    for name, q_len in (("prompt", prompt), ("decode", 1)):
        kv_len = prompt if q_len > 1 else prompt + new_tokens
        q = torch.empty(batch, q_len, heads, head_dim, device=bench.device, dtype=bench.dtype).transpose(1, 2)
        kv = torch.empty(batch, kv_len, kv_heads, head_dim, device=bench.device, dtype=bench.dtype).transpose(1, 2)
        mask = torch.ones(batch, 1, q_len, kv_len, device=bench.device, dtype=torch.bool) if masked else None
        try:
            report = ops.sdpa_report(q, kv, kv, attn_mask=mask, causal=True)
            with ops.attention_backend("sdpa"):
                torch_order = ops.sdpa_report(q, kv, kv, attn_mask=mask, causal=True)
            out[name] = {"stock": report["stock_choice"], "tli": report["tli_choice"],
                         "tli_under_torch_sdpa_order": torch_order["tli_choice"],
                         "tli_priority_order": report.get("tli_priority_order")}  # fmt: skip
        except Exception as error:  # a record, not a measurement: never lose the section over it
            out[name] = {"error": f"{type(error).__name__}: {error}"}
    return out


# -------------------------------------------------------------------------------------- markdown
def markdown(data: dict) -> str:
    env, settings = data["environment"], data["settings"]
    device = (env.get("accelerator") or {}).get("name", "CPU (smoke run: timings mean nothing)")
    lines = [f"# tli GPU check on {device} ({env['date_utc']} UTC)", "", describe_environment(env), "",
             f"Command: `{data['command']}`; {settings['timing']}; wall {data.get('wall_s', 'n/a')} s of a "
             f"{settings['budget_s']} s budget.", ""]  # fmt: skip
    for name in ("layer_8b", "layer_1b"):
        entry = data.get(name) or {}
        lines += [f"## {name}", ""]
        if "layer" not in entry:
            lines += [f"Not measured: {entry.get('skipped') or entry.get('error')}", ""]
            continue
        case = entry["case"]
        label = f"{case['model']} {case['batch']}x{case['seq']}"
        lines += gk.attention_lines((data.get("sdpa") or {}).get(name))
        lines += [markdown_table(gk.LAYER_HEADERS, gk.layer_rows(label, entry["layer"],
                                                                 entry["gemm_attention_reference"])), ""]  # fmt: skip
        lines += gk.correctness_lines(entry.get("correctness", {}))
    gen = data.get("generate") or {}
    lines += ["## generate()", ""]
    if "cases" in gen:
        rows = []
        for name, c in gen["cases"].items():
            attn = c.get("attention") or {}

            def ran(side, attn=attn):
                return " / ".join(str((attn.get(k) or {}).get(side, "?")) for k in ("prompt", "decode"))

            control, same = c.get("tli_under_torch_sdpa_order_tokens_per_s"), c.get("same_backend_tli_over_stock")
            rows.append([name, fmt(c["stock_tokens_per_s"], ".0f"), ran("stock"), fmt(c["tli_tokens_per_s"], ".0f"),
                         ran("tli"), fmt_ratio(c["tli_over_stock"]), fmt(control, ".0f"), fmt_ratio(same),
                         f"{c['same_tokens_fraction']:.0%}"])  # fmt: skip
        rounds = gen["model"].get("rounds", 3) - 1
        lines += [f"Greedy, {gen['model']['new_tokens']} new tokens after a {gen['model']['prompt']}-token prompt, "
                  f"{gen['model']['model']}-shaped model with {gen['model']['layers']} layers "
                  f"({gen['parameters'] / 1e9:.2f}B parameters), best of {rounds} runs after a warm-up run. "
                  "SDPA backend as prompt / decode step; the same-backend ratio is tli under torch's own SDPA "
                  "order (the backend stock runs) over stock.", "",
                  markdown_table(["case", "stock tokens/s", "stock SDPA", "tli tokens/s", "tli SDPA", "tli / stock",
                                  "tli, torch's order, tokens/s", "same-backend tli / stock", "same tokens"], rows),
                  ""]  # fmt: skip
    else:
        lines += [f"Not measured: {gen.get('skipped') or gen.get('error')}", ""]
    kernels = data.get("kernels_8b") or {}
    if isinstance(kernels, dict) and "error" not in kernels and "skipped" not in kernels and kernels:
        case = (data.get("layer_8b") or {}).get("case") or {}
        label = f"{case.get('model')} {case.get('batch')}x{case.get('seq')}"
        lines += [f"## kernels ({label})", "", markdown_table(gk.KERNEL_HEADERS, gk.kernel_rows(label, kernels)), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds from process start (default 170)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-liger", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    refuse_interpreter_on_cuda(device)
    if device.type != "cuda" and not args.smoke:
        print("gpu_check: no CUDA device; use --smoke on CPU", file=sys.stderr)
        return 2
    budget_s = args.budget_s or (170.0 if not args.smoke else 600.0)
    reps = args.reps or (10 if not args.smoke else 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    cases = SMOKE if args.smoke else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(
        out / "gpu_check.json",
        since_process_start=True,
        command="python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings={"smoke": args.smoke, "budget_s": budget_s, "reps": reps, "dtype": str(dtype),
                  "triton_interpret": os.environ.get("TRITON_INTERPRET"), **gk.bench_flags(device),
                  "timing": "eager call: CUDA events per call after a sync, median of reps after warm-up; kernel "
                  "only: torch.profiler device time" if device.type == "cuda" else "CPU smoke run: "
                  "perf_counter, timings mean nothing"},
    )  # fmt: skip
    bench = gk.Bench(results, device=device, dtype=dtype, warmup=3 if not args.smoke else 0, reps=reps,
                     max_sets=4 if not args.smoke else 1)  # fmt: skip
    budget = Budget(results, budget_s, out / "gpu_check.md")
    compiled = not args.no_compile and device.type == "cuda"
    print(f"tli gpu_check: {results.data['environment']['accelerator'] or 'CPU'} -> {out}", flush=True)
    # The asked-for numbers first; torch.compile's first compile (tens of seconds) and the kernel table
    # (the suite has it too) only with what is left.
    budget.run("sdpa", 0, sdpa_section, bench, cases)
    budget.run("rates", 5, gk.measure_rates, bench, **gk.RATES["smoke" if args.smoke else "full"])
    budget.run("layer_8b", 25, layer_section, bench, cases["layer_8b"], compiled=False, liger=not args.no_liger)
    budget.run("generate", 25, generate_section, bench, cases["generate"])
    if args.smoke:  # the same code as layer_8b and the suite's kernel section: not run twice in the interpreter
        for key in ("layer_1b", "kernels_8b"):
            results.put(key, {"skipped": "smoke run: the code path of layer_8b / gpu_kernels.measure_kernels"})
    else:
        budget.run("layer_1b", 20, layer_section, bench, cases["layer_1b"], compiled=False, liger=not args.no_liger)
    if compiled:
        budget.run("layer_8b_compiled", 40, compiled_section, bench, cases["layer_8b"], results)
    if not args.smoke:
        budget.run("kernels_8b", 25, gk.measure_kernels, bench, cases["layer_8b"])
    results.put("wall_s", round(results.elapsed(), 1))
    results.save()
    text = markdown(results.data)
    (out / "gpu_check.md").write_text(text)
    print(text, flush=True)
    failed = [k for k in ("layer_8b", "layer_1b") if ((results.get(k) or {}).get("correctness") or {}).get("pass")
              is False]  # fmt: skip
    return 1 if failed else 0


def compiled_section(bench: gk.Bench, case: gk.Case, results: Results) -> dict:
    """torch.compile(stock) at the 8B shape, merged into layer_8b's table (ratios against its stock row)."""
    layers = gk.Layers(bench, case.model)
    torch._dynamo.reset()
    entry = gk.measure_layer(bench, layers, case, {"stock": (layers.stock, contextlib.nullcontext),
                                                    "stock_compiled": (torch.compile(layers.stock),
                                                                       contextlib.nullcontext)})  # fmt: skip
    layer_8b = results.get("layer_8b") or {}
    if "layer" in layer_8b and "forward" in entry.get("stock_compiled", {}):
        stock = layer_8b["layer"]["stock"]
        compiled = dict(entry["stock_compiled"])
        for key in ("forward", "forward_backward"):
            compiled[f"speedup_{key}"] = stock[key]["median_ms"] / compiled[key]["median_ms"]
        reference = layer_8b["gemm_attention_reference"].get("reference_forward_backward_ms")
        if reference:
            compiled["forward_backward_over_reference"] = compiled["forward_backward"]["median_ms"] / reference
        layer_8b["layer"]["stock_compiled"] = compiled
        results.put("layer_8b", layer_8b)
    return {"stock_again": entry.get("stock"), "stock_compiled": entry.get("stock_compiled"),
            "note": "timed with its own stock run; the stock_compiled row of layer_8b takes ratios against "
                    "layer_8b's stock row"}  # fmt: skip


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except Exception:  # the JSON keeps every finished section; say where it stopped
        traceback.print_exc()
        sys.exit(3)
