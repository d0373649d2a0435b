"""End to end: tokens/s of a whole upscaled model's training step (forward, backward, AdamW step), stock
transformers against the same model under `apply_tli_kernels`.

The model is built in memory: a Llama-3.2-1B-shaped LlamaForCausalLM with fewer source layers (random
weights, bf16), upscaled with TLI (K=2, copy init) through `tli_kernels.methods.tli.layer_map`, the
same layer map `tli upscale` writes. The tli configuration makes α of the injected layers learnable
(starting at 1, as `apply_tli_kernels(model, learnable_alpha=True)` does on a saved upscaled
checkpoint), so it trains what `tli train` trains. Every configuration starts from the same weights
and sees the same batches (several, rotated); the first step's loss is recorded to show they compute
the same function. Where tli's attention orders SDPA's backends differently from torch for this shape
(cuDNN first for training on Hopper when torch does not), the stock model also runs under tli's order:
the same attention kernel, so the table separates the kernels' share of a speed-up from the backend's.

Used by gpu_suite.py; on its own:
    python benchmarks/training_step.py                   # GPU
    TRITON_INTERPRET=1 python benchmarks/training_step.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_kernels import MODELS, llama_config  # noqa: E402
from harness import fmt, fmt_ratio, markdown_table, peak_memory, ratio, refuse_interpreter_on_cuda, time_fn  # noqa: E402


@dataclass(frozen=True)
class StepSpec:
    model: str  # a gpu_kernels.MODELS shape
    source_layers: int
    k: int
    vocab: int
    batch: int
    seq: int
    warmup: int
    reps: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


SPECS = {
    # Llama-3.2-1B's block and vocabulary (tied embeddings), 8 source layers -> 12: ~1.0B parameters.
    "full": StepSpec("llama3_1b", source_layers=8, k=2, vocab=128256, batch=2, seq=4096, warmup=3, reps=10),
    "smoke": StepSpec("smoke", source_layers=2, k=2, vocab=256, batch=1, seq=16, warmup=0, reps=1),
}
CONFIGS = ("stock", "stock_under_tli_sdpa_order", "tli", "tli_fused_gate_up")


def build_upscaled(spec: StepSpec, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, list[int]]:
    """A TLI-upscaled LlamaForCausalLM (copy init, α folded = 1) and the indices of its injected layers."""
    from transformers import LlamaForCausalLM

    from tli_kernels.methods.tli import layer_map

    config = llama_config(
        MODELS[spec.model], num_hidden_layers=spec.source_layers, vocab_size=spec.vocab, tie_word_embeddings=True
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    source = list(model.model.layers)
    layers, injected = [], []
    for index, out in enumerate(layer_map(spec.source_layers, spec.k, "copy", 1.0)):
        if out.role == "injected":
            injected.append(index)
            layer = copy.deepcopy(source[out.sources[0]])
        else:
            layer = source[out.sources[0]]
        layer.self_attn.layer_idx = index
        layers.append(layer)
    model.model.layers = nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[0]] * len(layers)
    return model.train(), injected


def _attention_query(model, spec: StepSpec, device, dtype) -> torch.Tensor:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (spec.batch, spec.seq, config.num_attention_heads, head_dim)
    return torch.empty(shape, device=device, dtype=dtype).transpose(1, 2)


def _step_config(model, name: str, injected: list[int], spec: StepSpec, batches: list, device) -> dict:
    from tli_kernels.integrations import apply_tli_kernels

    handle = None
    if not name.startswith("stock"):
        handle = apply_tli_kernels(
            model,
            residual_scales={i: 1.0 for i in injected},
            learnable_alpha=True,
            fuse_gate_up=name == "tli_fused_gate_up",
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=device.type == "cuda")
    losses = []

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    from tli_kernels import ops

    order = ops.tli_sdpa_order(_attention_query(model, spec, device, next(model.parameters()).dtype))
    try:
        with order if name == "stock_under_tli_sdpa_order" else contextlib.nullcontext():
            started = time.perf_counter()
            step(batches[0])  # first call: builds the Triton kernels, allocates optimizer state
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_call_s = time.perf_counter() - started
            timing = time_fn(step, device=device, warmup=spec.warmup, reps=spec.reps, inputs=[(b,) for b in batches])
            peak = peak_memory(lambda: step(batches[0]), device)
    finally:
        if handle is not None:
            handle.undo(fold=False)
    return {
        "first_call_s": first_call_s,
        "step": timing,
        "tokens_per_s": spec.tokens / (timing["median_ms"] / 1e3),
        "peak_memory_above_weights_bytes": peak,
        "first_loss": losses[0].item(),
        "learnable_alphas": 0 if name.startswith("stock") else len(injected),
    }


def measure_training_step(spec: StepSpec, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Step time and tokens/s of each configuration on the same weights and batches."""
    model, injected = build_upscaled(spec, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=generator).to(device) for _ in range(3)]
    result = {
        "spec": asdict(spec),
        "layers": len(model.model.layers),
        "injected_layers": injected,
        "parameters": n_params,
        "dtype": str(dtype),
        "optimizer": "torch.optim.AdamW (fused on CUDA), lr 1e-5, weight decay 0.1, states in the parameters' dtype",
        "configs": {},
    }
    from tli_kernels import ops

    query = _attention_query(model, spec, device, dtype)
    result["sdpa"] = ops.sdpa_report(query, query, query, causal=True)
    for name in CONFIGS:
        if name == "stock_under_tli_sdpa_order" and ops.sdpa_priority(query) is None:
            continue  # tli runs torch's own order here: the stock row is the control already
        model.load_state_dict(initial)
        try:
            result["configs"][name] = _step_config(model, name, injected, spec, batches, device)
        except Exception as error:  # recorded, the other configurations still run
            result["configs"][name] = {"error": f"{type(error).__name__}: {error}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stock = result["configs"].get("stock", {})
    for entry in result["configs"].values():
        if "step" in entry and "step" in stock:
            entry["speedup"] = ratio(stock["step"]["median_ms"], entry["step"]["median_ms"])
            entry["first_loss_minus_stock"] = entry["first_loss"] - stock["first_loss"]
    return result


def markdown(result: dict) -> str:
    spec = result["spec"]
    rows = []
    for name, entry in result["configs"].items():
        if "step" not in entry:
            rows.append([name, entry.get("error", "n/a"), "", "", "", ""])
            continue
        peak = entry.get("peak_memory_above_weights_bytes")
        rows.append([
            name, fmt(entry["step"]["median_ms"], ".1f"), f"{entry['tokens_per_s']:,.0f}",
            fmt_ratio(entry.get("speedup")), fmt(peak / 2**30 if peak is not None else None, ".2f"),
            f"{entry['first_loss']:.4f}",
        ])  # fmt: skip
    head = (
        f"Training step of a TLI-upscaled {spec['model']}-shaped model ({spec['source_layers']} -> {result['layers']} "
        f"layers, K={spec['k']}, {result['parameters'] / 1e6:,.1f}M parameters, {result['dtype']}), batch "
        f"{spec['batch']} x {spec['seq']} tokens, forward + backward + {result['optimizer']}. Baseline: the stock "
        f"transformers model, same weights and batches, same run; median of {spec['reps']} steps after "
        f"{spec['warmup']} warm-up steps, {len(result['configs'])} configurations one after another."
    )
    headers = ["configuration", "step ms", "tokens/s", "speed-up vs stock", "peak GiB above weights+optimizer",
               "first loss"]  # fmt: skip
    return head + "\n\n" + markdown_table(headers, rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    parser.add_argument("--out", help="write the result JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    refuse_interpreter_on_cuda(device)
    spec = SPECS["smoke" if args.smoke else "full"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = measure_training_step(spec, device, dtype)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
