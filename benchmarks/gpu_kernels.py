"""The tli kernels and the patched decoder layer on one GPU, against stock transformers, torch.compile,
Liger-Kernel (when importable) and the floor, with bfloat16 correctness checks.

What it measures (Llama-3-8B decoder layer: hidden 4096, intermediate 14336, 32 heads / 8 KV heads,
batch 2 x 4096 tokens, bf16):
  * rates: the bf16 matmul rate (8192^3) and the device copy bandwidth (1 GiB copy, read + write);
  * kernels: each memory-bound tli kernel alone, forward and backward, against the eager PyTorch code
    transformers runs, as time, bandwidth over the minimum bytes moved, and share of the copy bandwidth;
  * layer: forward and forward+backward of the stock layer, the tli layer (also with the fused gate/up
    projection), the stock and tli layers under torch.compile,
    Liger-Kernel's layer, and the floor (the layer's GEMMs, timed and at the measured matmul rate, plus
    the attention kernel alone), with peak memory;
  * correctness: relative error (Frobenius) of output and every gradient against a float32 reference of
    the same weights; the tli layer passes when each error is below twice the stock bf16 layer's own.
Results go to OUT/gpu_kernels.json (rewritten after every section, so a cut-off run keeps what it had)
and OUT/gpu_kernels.md. The exit status is 1 when the correctness check fails on a full run.

On a GPU machine (one call, a few minutes on an H100/H200):
    python benchmarks/gpu_kernels.py --out results/gpu_kernels
On CPU, tiny shapes, to show it runs (TRITON_INTERPRET=1 runs the Triton kernels in the interpreter):
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --smoke --out /tmp/gpu_kernels_smoke
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import peak_memory, time_fn  # noqa: E402

SHAPES = {
    "llama3_8b": dict(
        hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, batch=2, seq=4096,
        matmul_n=8192, copy_bytes=1 << 30,
    ),
    "smoke": dict(
        hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, batch=1, seq=16,
        matmul_n=64, copy_bytes=1 << 20,
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------ utilities
def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), in float32."""
    expected = expected.detach().float()
    return ((actual.detach().float() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "flash_attn", "liger_kernel"):
        try:
            module = importlib.import_module(name)
        except Exception:  # not installed, or broken: either way not used
            out[name] = None
        else:
            out[name] = getattr(module, "__version__", "unknown")
    return out


def hardware(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "device": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    return {"device": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


def llama_config(shape: dict):
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        num_hidden_layers=1,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,  # Llama 3.1's, above the llama3 scaling's original 8192
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    config._attn_implementation = "sdpa"
    return config


class Bench:
    """The run's settings and results; `save` rewrites the JSON."""

    def __init__(self, args: argparse.Namespace):
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.shape = SHAPES["smoke" if args.smoke else "llama3_8b"]
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        self.warmup, self.reps = args.warmup, args.reps
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {
            "meta": {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "hardware": hardware(self.device),
                "versions": versions(),
                "smoke": args.smoke,
                "dtype": str(self.dtype),
                "shape": self.shape,
                "warmup": self.warmup,
                "reps": self.reps,
                "triton_interpret": os.environ.get("TRITON_INTERPRET"),
                "note": "" if self.device.type == "cuda" else
                "CPU smoke run: timings and bf16 errors mean nothing here (Triton's interpreter truncates "
                "float32 -> bf16 stores instead of rounding them)",
                "timing": "CUDA events per call, median of reps after warm-up" if self.device.type == "cuda" else
                "perf_counter per call (CPU)",
            },
        }  # fmt: skip

    def time(self, fn, setup=None) -> dict:
        return time_fn(fn, device=self.device, warmup=self.warmup, reps=self.reps, setup=setup)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def save(self) -> None:
        (self.out / "gpu_kernels.json").write_text(json.dumps(self.results, indent=2, default=str))


def section(bench: Bench, name: str, fn, *args):
    """Run one section; record its result or its error (a failing section does not end the run)."""
    started = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    try:
        bench.results[name] = fn(bench, *args)
    except Exception as error:  # recorded, not hidden: the JSON says which section failed and why
        bench.results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        print(f"    {name} failed: {type(error).__name__}: {error}", flush=True)
    bench.results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - started, 1)
    bench.save()
    return bench.results[name]


# ---------------------------------------------------------------------------------------- rates
def measure_rates(bench: Bench) -> dict:
    n = bench.shape["matmul_n"]
    a = torch.randn(n, n, device=bench.device, dtype=bench.dtype)
    b = torch.randn(n, n, device=bench.device, dtype=bench.dtype)
    matmul = bench.time(lambda: a @ b)
    src = torch.empty(bench.shape["copy_bytes"], dtype=torch.uint8, device=bench.device).random_(0, 255)
    dst = torch.empty_like(src)
    copy_time = bench.time(lambda: dst.copy_(src))
    return {
        "matmul_shape": [n, n, n],
        "matmul_tflops": 2 * n**3 / (matmul["median_ms"] / 1e3) / 1e12,
        "matmul": matmul,
        "copy_bytes_moved": 2 * src.numel(),
        "copy_gb_per_s": 2 * src.numel() / (copy_time["median_ms"] / 1e3) / 1e9,
        "copy": copy_time,
    }


# -------------------------------------------------------------------------------------- kernels
def _kernel_cases(bench: Bench):
    """(name, make inputs, tli fn, eager fn, forward bytes, backward bytes) at the layer's shapes."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from tli_kernels import ops

    s, dev, dt = bench.shape, bench.device, bench.dtype
    tokens, hidden, inter = s["batch"] * s["seq"], s["hidden"], s["intermediate"]
    e = torch.finfo(dt).bits // 8
    eps = 1e-5

    def leaf(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, device=dev) * scale + offset).to(dt).requires_grad_(True)

    def eager_rms_norm(x, w):  # LlamaRMSNorm.forward
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    config = llama_config(s)
    positions = torch.arange(s["seq"], device=dev)[None]
    cos, sin = LlamaRotaryEmbedding(config).to(dev)(torch.empty(1, device=dev, dtype=dt), positions)

    def eager_rope(q, k):  # transformers applies it on [B, H, S, D] views
        q_out, k_out = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos.to(q.dtype), sin.to(q.dtype))
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    qk = s["batch"] * s["seq"] * (s["heads"] + s["kv_heads"]) * s["head_dim"]
    return [
        (
            "rms_norm",
            lambda: [leaf(tokens, hidden), leaf(hidden, scale=0.2, offset=1.0)],
            lambda x, w: ops.rms_norm(x, w, eps),
            eager_rms_norm,
            2 * tokens * hidden * e,  # read x, write y
            3 * tokens * hidden * e,  # read dy, x; write dx
        ),
        (
            "add_rms_norm",
            lambda: [leaf(tokens, hidden), leaf(tokens, hidden), leaf(hidden, scale=0.2, offset=1.0)],
            lambda r, b, w: ops.add_rms_norm(r, b, w, eps),
            lambda r, b, w: (r + b, eager_rms_norm(r + b, w)),
            4 * tokens * hidden * e,  # read r, b; write r', y
            5 * tokens * hidden * e,  # read dy, dr', r'; write dr, db
        ),
        (
            "rope",
            lambda: [
                leaf(s["batch"], s["seq"], s["heads"], s["head_dim"]),
                leaf(s["batch"], s["seq"], s["kv_heads"], s["head_dim"]),
            ],
            lambda q, k: ops.apply_rope(q, k, cos.to(q.dtype), sin.to(q.dtype)),
            eager_rope,
            2 * qk * e,  # read and write q, k (cos/sin are 1/heads of that)
            2 * qk * e,
        ),
        (
            "swiglu",
            lambda: [leaf(tokens, inter, scale=2.0), leaf(tokens, inter)],
            ops.swiglu,
            lambda g, u: F.silu(g) * u,
            3 * tokens * inter * e,  # read g, u; write y
            5 * tokens * inter * e,  # read dy, g, u; write dg, du
        ),
    ]


def _measure_impl(bench: Bench, fn, inputs, ref_outs, ref_grads, grad_outs, fwd_bytes, bwd_bytes) -> dict:
    outs = as_tuple(fn(*inputs))
    low_grads = [g.to(o.dtype) for g, o in zip(grad_outs, outs, strict=True)]
    grads = torch.autograd.grad(outs, inputs, low_grads, retain_graph=True)
    forward = bench.time(lambda: fn(*inputs))
    backward = bench.time(lambda: torch.autograd.grad(outs, inputs, low_grads, retain_graph=True))
    entry = {
        "forward": forward,
        "backward": backward,
        "forward_gb_per_s": fwd_bytes / (forward["median_ms"] / 1e3) / 1e9,
        "backward_gb_per_s": bwd_bytes / (backward["median_ms"] / 1e3) / 1e9,
        "forward_rel_error": max(rel_error(o, r) for o, r in zip(outs, ref_outs, strict=True)),
        "backward_rel_error": max(rel_error(g, r) for g, r in zip(grads, ref_grads, strict=True)),
    }
    copy_bw = (bench.results.get("rates") or {}).get("copy_gb_per_s")
    if copy_bw:
        entry["forward_share_of_copy_bw"] = entry["forward_gb_per_s"] / copy_bw
        entry["backward_share_of_copy_bw"] = entry["backward_gb_per_s"] / copy_bw
    return entry


def measure_kernels(bench: Bench) -> dict:
    results = {}
    for name, make_inputs, tli_fn, eager_fn, fwd_bytes, bwd_bytes in _kernel_cases(bench):
        inputs = make_inputs()
        ref_inputs = [t.detach().float().requires_grad_(True) for t in inputs]
        ref_outs = as_tuple(eager_fn(*ref_inputs))
        grad_outs = [torch.randn_like(o) for o in ref_outs]
        ref_grads = torch.autograd.grad(ref_outs, ref_inputs, grad_outs)
        entry = {"forward_min_bytes": fwd_bytes, "backward_min_bytes": bwd_bytes}
        for impl, fn in (("tli", tli_fn), ("eager", eager_fn)):
            entry[impl] = _measure_impl(bench, fn, inputs, ref_outs, ref_grads, grad_outs, fwd_bytes, bwd_bytes)
        if name == "rope":  # the inference path: in place, no autograd
            q, k = (t.detach().clone() for t in inputs)
            with torch.no_grad():
                entry["tli_in_place_forward"] = bench.time(lambda fn=tli_fn, q=q, k=k: fn(q, k))
        results[name] = entry
    return results


# ---------------------------------------------------------------------------------------- layer
class Layers:
    """The same weights as a stock bf16 layer, a float32 reference and a tli-patched layer."""

    def __init__(self, bench: Bench):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        from tli_kernels.modules import patch_decoder_layer

        s = bench.shape
        self.config = llama_config(s)
        torch.manual_seed(0)
        with torch.device(bench.device):
            base = LlamaDecoderLayer(self.config, layer_idx=0)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        self.stock = base.to(bench.dtype).train()
        self.reference = copy.deepcopy(self.stock).float()  # the bf16 weights, computed in float32
        self.tli = copy.deepcopy(self.stock)
        patch_decoder_layer(self.tli)
        self.tli_fused = copy.deepcopy(self.stock)  # gate/up as one packed projection
        patch_decoder_layer(self.tli_fused, fuse_gate_up=True)

        generator = torch.Generator(device=bench.device).manual_seed(1)
        shape = (s["batch"], s["seq"], s["hidden"])
        self.x = torch.randn(shape, device=bench.device, generator=generator).to(bench.dtype)
        self.grad_out = torch.randn(shape, device=bench.device, generator=generator).to(bench.dtype)
        positions = torch.arange(s["seq"], device=bench.device)[None]
        rotary = LlamaRotaryEmbedding(self.config).to(bench.device)
        self.kwargs = {"attention_mask": None, "position_ids": positions}
        self.rope_low = rotary(self.x, positions)
        self.rope_fp32 = rotary(self.x.float(), positions)

    def run(self, layer, fp32: bool = False):
        x = (self.x.float() if fp32 else self.x).detach().requires_grad_(True)
        rope = self.rope_fp32 if fp32 else self.rope_low
        out = layer(x, position_embeddings=rope, **self.kwargs)
        params = [p for p in layer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out, [x, *params], self.grad_out.to(out.dtype))
        names = [n for n, p in layer.named_parameters() if p.requires_grad]
        return out, dict(zip(["input", *names], grads, strict=True))


def build_liger_layer(layers: Layers):
    """Liger-Kernel's RMSNorm and SwiGLU modules in a copy of the stock layer, and its RoPE function."""
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP, liger_rotary_pos_emb

    layer = copy.deepcopy(layers.stock)
    weight = layer.input_layernorm.weight
    for name in ("input_layernorm", "post_attention_layernorm"):
        old = getattr(layer, name)
        new = LigerRMSNorm(layers.config.hidden_size, eps=old.variance_epsilon).to(weight.device, weight.dtype)
        new.load_state_dict(old.state_dict())
        setattr(layer, name, new)
    mlp = LigerSwiGLUMLP(layers.config).to(weight.device, weight.dtype)
    mlp.load_state_dict(layer.mlp.state_dict())
    layer.mlp = mlp
    return layer, liger_rotary_pos_emb


@contextlib.contextmanager
def liger_rope(rope_fn, counter: list):
    """Liger patches transformers' module-level RoPE function; do it only while Liger's layer runs."""
    from transformers.models.llama import modeling_llama

    def counted(*args, **kwargs):
        counter.append(1)
        return rope_fn(*args, **kwargs)

    saved = modeling_llama.apply_rotary_pos_emb
    modeling_llama.apply_rotary_pos_emb = counted
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = saved


def check_correctness(bench: Bench, layers: Layers, extra: dict) -> dict:
    """Relative errors of bf16 layers against the float32 reference; tli must stay within 2x stock."""
    if bench.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # a true float32 reference
    ref_out, ref_grads = layers.run(layers.reference, fp32=True)
    errors = {}
    candidates = {
        "stock": (layers.stock, contextlib.nullcontext),
        "tli": (layers.tli, contextlib.nullcontext),
        "tli_fused_gate_up": (layers.tli_fused, contextlib.nullcontext),
    }
    candidates.update(extra)
    for name, (layer, context) in candidates.items():
        with context():
            out, grads = layers.run(layer)
        errors[name] = {"output": rel_error(out, ref_out)}
        errors[name].update({f"grad:{k}": rel_error(g, ref_grads[k]) for k, g in grads.items()})
        del out, grads
    slack = 1e-6  # float noise floor, so an exact (zero-error) stock layer does not fail a float32 smoke run
    failures = {
        f"{name}/{key}": {"error": value, "stock": errors["stock"][key]}
        for name in ("tli", "tli_fused_gate_up")
        for key, value in errors[name].items()
        if value > 2 * errors["stock"][key] + slack
    }
    criterion = "each tli layer's error <= 2 x the stock layer's error in the same dtype (+1e-6), output and grads"
    return {"criterion": criterion, "errors": errors, "pass": not failures, "failures": failures}


def measure_layer(bench: Bench, layers: Layers, configs: dict) -> dict:
    results = {}
    for name, (layer, context) in configs.items():
        x = layers.x.detach().requires_grad_(True)
        kwargs = dict(layers.kwargs, position_embeddings=layers.rope_low)

        def forward(layer=layer, x=x, kwargs=kwargs):
            return layer(x, **kwargs)

        def forward_backward(layer=layer, x=x, kwargs=kwargs):
            layer(x, **kwargs).backward(layers.grad_out)

        def clear(layer=layer, x=x):
            layer.zero_grad(set_to_none=True)
            x.grad = None

        entry = {}
        try:
            with context():
                started = time.perf_counter()
                clear()
                forward_backward()  # first call: compiles where compiling, builds Triton kernels
                bench.sync()
                entry["first_call_s"] = time.perf_counter() - started
                entry["forward"] = bench.time(forward)
                entry["forward_backward"] = bench.time(forward_backward, setup=clear)
                clear()
                entry["peak_memory_bytes"] = peak_memory(forward_backward, bench.device)
                clear()
        except Exception as error:
            entry["error"] = f"{type(error).__name__}: {error}"
            print(f"    layer config {name} failed: {entry['error']}", flush=True)
        results[name] = entry
    return results


def _time_gemms(bench: Bench, gemms: list, tokens: int) -> dict:
    dev, dt = bench.device, bench.dtype
    xs = [torch.randn(tokens, i, device=dev, dtype=dt, requires_grad=True) for i, _ in gemms]
    ws = [(torch.randn(o, i, device=dev, dtype=dt) * i**-0.5).requires_grad_(True) for i, o in gemms]
    gs = [torch.randn(tokens, o, device=dev, dtype=dt) for _, o in gemms]

    def forward():
        return [F.linear(x, w) for x, w in zip(xs, ws, strict=True)]

    def forward_backward():
        torch.autograd.backward(forward(), gs)

    def clear():
        for t in (*xs, *ws):
            t.grad = None

    return {"gemm_forward": bench.time(forward), "gemm_forward_backward": bench.time(forward_backward, setup=clear)}


def measure_floor(bench: Bench) -> dict:
    """The layer's GEMMs (timed alone, and at the measured matmul rate) plus the attention alone."""
    from tli_kernels import ops

    s, dev, dt = bench.shape, bench.device, bench.dtype
    tokens, hidden, inter = s["batch"] * s["seq"], s["hidden"], s["intermediate"]
    q_width, kv_width = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    gemms = [(hidden, q_width), (hidden, kv_width), (hidden, kv_width), (q_width, hidden),
             (hidden, inter), (hidden, inter), (inter, hidden)]  # (in, out): q k v o gate up down  # fmt: skip
    flops_forward = 2 * tokens * sum(i * o for i, o in gemms)
    result = {"gemm_flops_forward": flops_forward, **_time_gemms(bench, gemms, tokens)}
    rate = (bench.results.get("rates") or {}).get("matmul_tflops")
    if rate:
        result["gemm_forward_at_rate_ms"] = flops_forward / (rate * 1e12) * 1e3
        result["gemm_forward_backward_at_rate_ms"] = 3 * flops_forward / (rate * 1e12) * 1e3

    q = torch.randn(s["batch"], s["seq"], s["heads"], s["head_dim"], device=dev, dtype=dt).transpose(1, 2)
    k = torch.randn(s["batch"], s["kv_heads"], s["seq"], s["head_dim"], device=dev, dtype=dt)
    v = torch.randn_like(k)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    g = torch.randn(s["batch"], s["seq"], s["heads"], s["head_dim"], device=dev, dtype=dt)
    backends = ["sdpa", "sdpa_cudnn"] + (["flash_attn"] if ops.flash_attn_available() and dev.type == "cuda" else [])
    attention = {"auto_resolves_to": ops.resolve_backend(q)}
    for name in backends:
        try:
            with ops.attention_backend(name):
                fwd = bench.time(lambda: ops.attention(q, k, v, causal=True, scale=s["head_dim"] ** -0.5))
                fwd_bwd = bench.time(
                    lambda: ops.attention(q, k, v, causal=True, scale=s["head_dim"] ** -0.5).backward(g),
                    setup=lambda: [setattr(t, "grad", None) for t in (q, k, v)],
                )
            attention[name] = {"forward": fwd, "forward_backward": fwd_bwd}
        except Exception as error:
            attention[name] = {"error": f"{type(error).__name__}: {error}"}
    result["attention"] = attention
    timed = [a for a in attention.values() if isinstance(a, dict) and "forward" in a]
    if timed:
        best_fwd = min(a["forward"]["median_ms"] for a in timed)
        best_fwd_bwd = min(a["forward_backward"]["median_ms"] for a in timed)
        result["floor_forward_ms"] = result["gemm_forward"]["median_ms"] + best_fwd
        result["floor_forward_backward_ms"] = result["gemm_forward_backward"]["median_ms"] + best_fwd_bwd
        if rate:
            result["floor_forward_at_rate_ms"] = result["gemm_forward_at_rate_ms"] + best_fwd
            result["floor_forward_backward_at_rate_ms"] = result["gemm_forward_backward_at_rate_ms"] + best_fwd_bwd
    return result


def layer_sections(bench: Bench, args: argparse.Namespace) -> None:
    from tli_kernels import ops

    try:
        layers = Layers(bench)
    except Exception as error:  # recorded; the kernel and rate sections still stand
        error_text = f"{type(error).__name__}: {error}"
        bench.results["layer_build"] = {"error": error_text, "traceback": traceback.format_exc()}
        return
    bench.results["layer_build"] = {"attention_backend_auto": ops.resolve_backend(layers.x)}

    extra, liger_rope_calls = {}, []
    if not args.no_liger and bench.device.type == "cuda":
        try:
            liger_layer, rope_fn = build_liger_layer(layers)
            extra["liger"] = (liger_layer, lambda: liger_rope(rope_fn, liger_rope_calls))
        except Exception as error:  # not installed or incompatible: say so
            bench.results["liger"] = {"unavailable": f"{type(error).__name__}: {error}"}

    correctness = section(bench, "layer_correctness", check_correctness, layers, extra)

    configs = {
        "stock": (layers.stock, contextlib.nullcontext),
        "tli": (layers.tli, contextlib.nullcontext),
        "tli_fused_gate_up": (layers.tli_fused, contextlib.nullcontext),
    }
    if bench.device.type == "cuda" and ops.resolve_backend(layers.x) == "sdpa_cudnn":
        configs["tli_sdpa_default_order"] = (layers.tli, lambda: ops.attention_backend("sdpa"))
    configs.update(extra)
    if not args.no_compile:
        configs["stock_compiled"] = (torch.compile(layers.stock), contextlib.nullcontext)
        configs["tli_compiled"] = (torch.compile(layers.tli), contextlib.nullcontext)
    section(bench, "layer", measure_layer, layers, configs)
    if "liger" in extra:
        bench.results["liger"] = {"rope_patched_calls": len(liger_rope_calls), "parts": ["rms_norm", "swiglu", "rope"]}
    section(bench, "floor", measure_floor)
    bench.results["correctness_pass"] = bool(isinstance(correctness, dict) and correctness.get("pass"))


# --------------------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# tli kernels on {meta['hardware'].get('device')} ({meta['date']})",
        "",
        f"versions: {json.dumps(meta['versions'])}",
        f"shape: {json.dumps(meta['shape'])}, dtype {meta['dtype']}, {meta['timing']}",
        "",
    ]
    rates = results.get("rates", {})
    if "matmul_tflops" in rates:
        lines += [f"measured: matmul {rates['matmul_tflops']:.0f} TFLOP/s, copy {rates['copy_gb_per_s']:.0f} GB/s", ""]
    layer = results.get("layer", {})
    if layer and "error" not in layer:
        stock = layer.get("stock", {})
        lines += [
            "| layer | forward ms | fwd+bwd ms | vs stock fwd+bwd | peak MiB (fwd+bwd) |",
            "|---|---|---|---|---|",
        ]
        for name, entry in layer.items():
            if "forward" not in entry:
                lines.append(f"| {name} | {entry.get('error', 'n/a')} | | | |")
                continue
            fb = entry["forward_backward"]["median_ms"]
            ratio = stock["forward_backward"]["median_ms"] / fb if "forward_backward" in stock else float("nan")
            peak = entry.get("peak_memory_bytes")
            lines.append(
                f"| {name} | {entry['forward']['median_ms']:.3f} | {fb:.3f} | {ratio:.2f}x | {peak / 2**20:.0f} |"
                if peak is not None
                else f"| {name} | {entry['forward']['median_ms']:.3f} | {fb:.3f} | {ratio:.2f}x | n/a |"
            )
        floor = results.get("floor", {})
        if "floor_forward_ms" in floor:
            lines.append(
                f"| floor (GEMMs timed + attention) | {floor['floor_forward_ms']:.3f} | "
                f"{floor['floor_forward_backward_ms']:.3f} | | |"
            )
        if "floor_forward_at_rate_ms" in floor:
            lines.append(
                f"| floor (GEMMs at matmul rate + attention) | {floor['floor_forward_at_rate_ms']:.3f} | "
                f"{floor['floor_forward_backward_at_rate_ms']:.3f} | | |"
            )
        lines.append("")
    kernels = results.get("kernels", {})
    if kernels and "error" not in kernels:
        lines += [
            "| kernel | tli fwd ms | tli bwd ms | fwd GB/s (share of copy) | bwd GB/s (share) | eager fwd ms "
            "| eager bwd ms | rel err vs fp32, fwd tli / eager |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in kernels.items():
            tli, eager = entry["tli"], entry["eager"]
            lines.append(
                f"| {name} | {tli['forward']['median_ms']:.4f} | {tli['backward']['median_ms']:.4f} | "
                f"{tli['forward_gb_per_s']:.0f} ({tli.get('forward_share_of_copy_bw', float('nan')):.0%}) | "
                f"{tli['backward_gb_per_s']:.0f} ({tli.get('backward_share_of_copy_bw', float('nan')):.0%}) | "
                f"{eager['forward']['median_ms']:.4f} | {eager['backward']['median_ms']:.4f} | "
                f"{tli['forward_rel_error']:.2e} / {eager['forward_rel_error']:.2e} |"
            )
        lines.append("")
    correctness = results.get("layer_correctness", {})
    if "errors" in correctness:
        lines += [f"correctness ({correctness['criterion']}): {'PASS' if correctness['pass'] else 'FAIL'}"]
        for name, errs in correctness["errors"].items():
            worst = max((v, k) for k, v in errs.items() if k != "output")
            lines.append(f"- {name}: output {errs['output']:.2e}, worst gradient {worst[0]:.2e} ({worst[1]})")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_kernels.json and gpu_kernels.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few reps (runs on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    parser.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel even when importable")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 5
    if args.reps is None:
        args.reps = 2 if args.smoke else 30
    bench = Bench(args)
    if bench.device.type != "cuda":
        if not args.smoke:
            parser.error("the full shapes need a CUDA GPU; use --smoke on CPU")
        args.no_compile = True  # inductor on CPU needs a C++ toolchain and minutes; not what this checks
    print(f"tli gpu_kernels: {bench.results['meta']['hardware']} -> {bench.out}", flush=True)
    section(bench, "rates", measure_rates)
    section(bench, "kernels", measure_kernels)
    layer_sections(bench, args)
    bench.save()
    (bench.out / "gpu_kernels.md").write_text(markdown(bench.results))
    print(markdown(bench.results), flush=True)
    return 0 if bench.results.get("correctness_pass") or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
