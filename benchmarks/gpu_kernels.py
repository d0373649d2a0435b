"""The tli kernels and the patched decoder layer on one GPU, against stock transformers, torch.compile,
Liger-Kernel (when importable) and the GEMM+attention reference, with bfloat16 correctness checks.

This file holds the measurements (used by `gpu_suite.py` for its sweep over model shapes and sequence
lengths) and, run as a script, measures one shape: a Llama-3-8B decoder layer (hidden 4096,
intermediate 14336, 32 heads / 8 KV heads), batch 2 x 4096 tokens, bf16:
  * rates: the bf16 matmul rate (8192^3) and the device copy bandwidth (1 GiB copy, read + write);
  * kernels: each memory-bound tli kernel alone, forward and backward, against the eager PyTorch code
    transformers runs, as time (the eager call, launch included, and the kernels alone from the
    profiler), bandwidth over the minimum bytes moved, and share of the copy bandwidth; inputs rotate
    over enough sets to overflow L2 (benchmarks/harness.py);
  * layer: forward and forward+backward of the stock layer, the tli layer (also with the fused gate/up
    projection), the stock and tli layers under torch.compile, Liger-Kernel's layer, the stock layer
    under tli's SDPA backend order (a same-attention control) and the GEMM+attention reference (the
    layer's seven GEMMs unfused, timed and at the measured matmul rate, plus the fastest attention
    kernel alone: not a bound, a yardstick), with peak memory; what SDPA runs, inside and outside tli;
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
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    Results,
    describe_environment,
    device_time,
    fmt,
    fmt_ratio,
    fp32_matmul_precision,
    markdown_table,
    matmul_precision_flags,
    peak_memory,
    ratio,
    refuse_interpreter_on_cuda,
    rotation_sets,
    time_fn,
)

# Decoder-layer shapes of the Llama 3 family (rope_factor: the llama3 RoPE scaling factor of that release).
MODELS = {
    "llama3_1b": dict(hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, rope_factor=32.0),
    "llama3_8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, rope_factor=8.0),
    "llama3_70b": dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, head_dim=128, rope_factor=8.0),
    "smoke": dict(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, rope_factor=8.0),
}
RATES = {"full": dict(matmul_n=8192, copy_bytes=1 << 30), "smoke": dict(matmul_n=64, copy_bytes=1 << 20)}
KERNELS = ("rms_norm", "add_rms_norm", "rope", "swiglu")


@dataclass(frozen=True)
class Case:
    """One model shape at one batch x sequence length."""

    model: str
    batch: int
    seq: int

    @property
    def dims(self) -> dict:
        return MODELS[self.model]

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


# ------------------------------------------------------------------------------------ utilities
def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), in float32."""
    expected = expected.detach().float()
    return ((actual.detach().float() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def llama_config(dims: dict, num_hidden_layers: int = 1, **overrides):
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        head_dim=dims["head_dim"],
        num_hidden_layers=num_hidden_layers,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,  # Llama 3.1's, above the llama3 scaling's original 8192
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": dims["rope_factor"],
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        **overrides,
    )
    config._attn_implementation = "sdpa"
    return config


class Bench:
    """Device, dtype, repetitions and the Results document every measurement writes into."""

    def __init__(self, results: Results, *, device: torch.device, dtype: torch.dtype, warmup: int, reps: int,
                 max_sets: int = 8):  # fmt: skip
        self.results, self.device, self.dtype = results, device, dtype
        self.warmup, self.reps, self.max_sets = warmup, reps, max_sets

    def time(self, fn, setup=None, inputs=None) -> dict:
        """The eager call: launch and dispatch included (CUDA events around each call after a sync)."""
        return time_fn(fn, device=self.device, warmup=self.warmup, reps=self.reps, setup=setup, inputs=inputs)

    def kernel_time(self, fn, setup=None, inputs=None) -> dict | None:
        """The kernels alone (profiler device time per call); None off CUDA, the error if the profiler fails
        (the eager-call column still stands)."""
        try:
            reps = max(3, self.reps // 3)
            return device_time(fn, device=self.device, warmup=1, reps=reps, setup=setup, inputs=inputs)
        except Exception as error:
            return {"error": f"{type(error).__name__}: {error}"}

    def sets(self, bytes_per_set: int) -> int:
        """How many input sets to rotate (enough to overflow the last-level cache)."""
        return rotation_sets(bytes_per_set, self.device, maximum=self.max_sets)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def rates(self) -> dict:
        return self.results.get("rates") or {}

    def cuda_flags(self) -> dict:
        if self.device.type != "cuda":
            return {}
        return matmul_precision_flags()


# ---------------------------------------------------------------------------------------- rates
def measure_rates(bench: Bench, matmul_n: int, copy_bytes: int) -> dict:
    n = matmul_n
    a = torch.randn(n, n, device=bench.device, dtype=bench.dtype)
    b = torch.randn(n, n, device=bench.device, dtype=bench.dtype)
    matmul = bench.time(lambda: a @ b)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=bench.device).random_(0, 255)
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
@dataclass
class KernelCase:
    name: str
    make_inputs: object  # () -> list of leaf tensors
    tli: object  # the tli op
    eager: object  # the PyTorch code transformers runs
    forward_bytes: int  # minimum bytes a forward must move
    backward_bytes: int
    set_bytes: int  # bytes of one input set (inputs + outputs), for the rotation


def kernel_cases(case: Case, device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    """The four memory-bound ops of a layer at this case's shapes: tli against transformers' eager code."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from tli_kernels import ops

    d = case.dims
    tokens, hidden, inter = case.tokens, d["hidden"], d["intermediate"]
    e = torch.finfo(dtype).bits // 8
    eps = 1e-5

    def leaf(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, device=device) * scale + offset).to(dtype).requires_grad_(True)

    def eager_rms_norm(x, w):  # LlamaRMSNorm.forward
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def eager_add_rms_norm(r, b, w):  # the stock layer: residual + branch, then the next norm
        s = r + b
        return s, eager_rms_norm(s, w)

    config = llama_config(d)
    positions = torch.arange(case.seq, device=device)[None]
    cos, sin = LlamaRotaryEmbedding(config).to(device)(torch.empty(1, device=device, dtype=dtype), positions)

    def eager_rope(q, k):  # transformers applies it on [B, H, S, D] views
        q_out, k_out = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos.to(q.dtype), sin.to(q.dtype))
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    qk = tokens * (d["heads"] + d["kv_heads"]) * d["head_dim"]
    return [
        KernelCase(
            "rms_norm",
            lambda: [leaf(tokens, hidden), leaf(hidden, scale=0.2, offset=1.0)],
            lambda x, w: ops.rms_norm(x, w, eps),
            eager_rms_norm,
            2 * tokens * hidden * e,  # read x, write y
            3 * tokens * hidden * e,  # read dy, x; write dx
            3 * tokens * hidden * e,
        ),
        KernelCase(
            "add_rms_norm",
            lambda: [leaf(tokens, hidden), leaf(tokens, hidden), leaf(hidden, scale=0.2, offset=1.0)],
            lambda r, b, w: ops.add_rms_norm(r, b, w, eps),
            eager_add_rms_norm,
            4 * tokens * hidden * e,  # read r, b; write r', y
            5 * tokens * hidden * e,  # read dy, dr', r'; write dr, db
            6 * tokens * hidden * e,
        ),
        KernelCase(
            "rope",
            lambda: [
                leaf(case.batch, case.seq, d["heads"], d["head_dim"]),
                leaf(case.batch, case.seq, d["kv_heads"], d["head_dim"]),
            ],
            lambda q, k: ops.apply_rope(q, k, cos.to(q.dtype), sin.to(q.dtype)),
            eager_rope,
            2 * qk * e,  # read and write q, k (cos/sin are 1/heads of that)
            2 * qk * e,
            3 * qk * e,
        ),
        KernelCase(
            "swiglu",
            lambda: [leaf(tokens, inter, scale=2.0), leaf(tokens, inter)],
            ops.swiglu,
            lambda g, u: F.silu(g) * u,
            3 * tokens * inter * e,  # read g, u; write y
            5 * tokens * inter * e,  # read dy, g, u; write dg, du
            4 * tokens * inter * e,
        ),
    ]


def _measure_impl(bench: Bench, fn, sets, ref_outs, ref_grads, grad_outs, kc: KernelCase) -> dict:
    """Forward and backward of one implementation, rotating over the input sets; errors on set 0."""
    graphs = []  # (outputs, inputs, output gradients) per set: the backward replays these graphs
    for inputs in sets:
        outs = as_tuple(fn(*inputs))
        low = [g.to(o.dtype, copy=True) for g, o in zip(grad_outs, outs, strict=True)]
        graphs.append((outs, inputs, low))
    grads = torch.autograd.grad(*graphs[0], retain_graph=True)

    def backward(outs, inputs, low):
        return torch.autograd.grad(outs, inputs, low, retain_graph=True)

    forward = bench.time(fn, inputs=sets)
    backward_time = bench.time(backward, inputs=graphs)
    entry = {
        "forward": forward,  # eager call: launch and dispatch included
        "backward": backward_time,
        "forward_kernel_only": bench.kernel_time(fn, inputs=sets),
        "backward_kernel_only": bench.kernel_time(backward, inputs=graphs),
        "forward_gb_per_s": kc.forward_bytes / (forward["median_ms"] / 1e3) / 1e9,
        "backward_gb_per_s": kc.backward_bytes / (backward_time["median_ms"] / 1e3) / 1e9,
        "forward_rel_error": max(rel_error(o, r) for o, r in zip(graphs[0][0], ref_outs, strict=True)),
        "backward_rel_error": max(rel_error(g, r) for g, r in zip(grads, ref_grads, strict=True)),
    }
    for direction, moved in (("forward", kc.forward_bytes), ("backward", kc.backward_bytes)):
        kernel = entry[f"{direction}_kernel_only"] or {}
        if kernel.get("kernel_ms", 0) > 0:
            entry[f"{direction}_kernel_only_gb_per_s"] = moved / (kernel["kernel_ms"] / 1e3) / 1e9
    copy_bw = bench.rates.get("copy_gb_per_s")
    if copy_bw:
        for key in ("forward_gb_per_s", "backward_gb_per_s", "forward_kernel_only_gb_per_s",
                    "backward_kernel_only_gb_per_s"):  # fmt: skip
            if key in entry:
                entry[key.replace("gb_per_s", "share_of_copy_bw")] = entry[key] / copy_bw
    return entry


def measure_kernels(bench: Bench, case: Case) -> dict:
    results = {}
    for kc in kernel_cases(case, bench.device, bench.dtype):
        sets = [kc.make_inputs() for _ in range(bench.sets(kc.set_bytes))]
        ref_inputs = [t.detach().float().requires_grad_(True) for t in sets[0]]
        ref_outs = as_tuple(kc.eager(*ref_inputs))
        grad_outs = [torch.randn_like(o) for o in ref_outs]
        ref_grads = torch.autograd.grad(ref_outs, ref_inputs, grad_outs)
        entry = {"forward_min_bytes": kc.forward_bytes, "backward_min_bytes": kc.backward_bytes}
        for impl, fn in (("tli", kc.tli), ("eager", kc.eager)):
            entry[impl] = _measure_impl(bench, fn, sets, ref_outs, ref_grads, grad_outs, kc)
        entry["speedup_forward"] = ratio(entry["eager"]["forward"]["median_ms"], entry["tli"]["forward"]["median_ms"])
        entry["speedup_backward"] = ratio(
            entry["eager"]["backward"]["median_ms"], entry["tli"]["backward"]["median_ms"]
        )
        if kc.name == "rope":  # the inference path: in place, no autograd
            plain = [tuple(t.detach().clone() for t in inputs) for inputs in sets]
            with torch.no_grad():
                entry["tli_in_place_forward"] = bench.time(kc.tli, inputs=plain)
        results[kc.name] = entry
        del sets, ref_inputs, ref_outs, grad_outs, ref_grads
    return results


# ---------------------------------------------------------------------------------------- layer
class Layers:
    """One model shape's decoder layer: the stock bf16 layer, tli-patched copies, and (on demand) a
    float32 reference with the same bf16 weights."""

    def __init__(self, bench: Bench, model: str):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        from tli_kernels.modules import patch_decoder_layer

        self.bench, self.model = bench, model
        self.config = llama_config(MODELS[model])
        torch.manual_seed(0)
        with torch.device(bench.device):
            base = LlamaDecoderLayer(self.config, layer_idx=0)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        self.stock = base.to(bench.dtype).train()
        self.tli = copy.deepcopy(self.stock)
        patch_decoder_layer(self.tli)
        self.tli_fused = copy.deepcopy(self.stock)  # gate/up as one packed projection
        patch_decoder_layer(self.tli_fused, fuse_gate_up=True)
        self.rotary = LlamaRotaryEmbedding(self.config).to(bench.device)

    def inputs(self, case: Case, sets: int = 1) -> dict:
        """Rotated layer inputs x, one output gradient per set, RoPE tables in bf16 and float32."""
        bench = self.bench
        generator = torch.Generator(device=bench.device).manual_seed(1)
        shape = (case.batch, case.seq, self.config.hidden_size)
        xs = [torch.randn(shape, device=bench.device, generator=generator).to(bench.dtype) for _ in range(sets)]
        grads = [torch.randn(shape, device=bench.device, generator=generator).to(bench.dtype) for _ in range(sets)]
        positions = torch.arange(case.seq, device=bench.device)[None]
        return {
            "xs": xs,
            "grads": grads,
            "kwargs": {"attention_mask": None, "position_ids": positions},
            "rope": self.rotary(xs[0], positions),
            "rope_fp32": self.rotary(xs[0].float(), positions),
        }

    def run(self, layer, inputs: dict, fp32: bool = False):
        """Output and every gradient (input and parameters) of one forward+backward on set 0."""
        x = (inputs["xs"][0].float() if fp32 else inputs["xs"][0]).detach().requires_grad_(True)
        rope = inputs["rope_fp32"] if fp32 else inputs["rope"]
        out = layer(x, position_embeddings=rope, **inputs["kwargs"])
        params = [p for p in layer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out, [x, *params], inputs["grads"][0].to(out.dtype))
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


def check_correctness(bench: Bench, layers: Layers, case: Case, extra: dict, judged: tuple = ()) -> dict:
    """Relative errors of bf16 layers against the float32 reference; each tli layer (tli, tli_fused_gate_up
    and the `judged` names among `extra`) must stay within 2x stock's."""
    with fp32_matmul_precision("ieee"):  # a true float32 reference (no TF32)
        inputs = layers.inputs(case)
        reference = copy.deepcopy(layers.stock).float()  # the bf16 weights, computed in float32
        ref_out, ref_grads = layers.run(reference, inputs, fp32=True)
        del reference
        errors = {}
        candidates = {
            "stock": (layers.stock, contextlib.nullcontext),
            "tli": (layers.tli, contextlib.nullcontext),
            "tli_fused_gate_up": (layers.tli_fused, contextlib.nullcontext),
        }
        candidates.update(extra)
        crashed = {}
        for name, (layer, context) in candidates.items():
            try:
                with context():
                    out, grads = layers.run(layer, inputs)
            except Exception as error:  # one candidate failing (Liger, say) must not lose the others' errors
                crashed[name] = f"{type(error).__name__}: {error}"[:500]
                continue
            errors[name] = {"output": rel_error(out, ref_out)}
            # (a learnable alpha's gradient has no counterpart in the stock layer: not compared)
            errors[name].update({f"grad:{k}": rel_error(g, ref_grads[k]) for k, g in grads.items() if k in ref_grads})
            del out, grads
    slack = 1e-6  # float noise floor, so an exact (zero-error) stock layer does not fail a float32 smoke run
    stock = errors.get("stock", {})
    failures = {
        f"{name}/{key}": {"error": value, "stock": stock.get(key)}
        for name in ("tli", "tli_fused_gate_up", *judged)
        for key, value in errors.get(name, {}).items()
        if key not in stock or value > 2 * stock[key] + slack
    }
    # A judged layer (or stock, the yardstick) that did not run fails the check; an unjudged one (Liger) is
    # recorded as failed and the rest kept.
    failures.update({f"{name}/run": {"error": crashed[name]} for name in ("stock", "tli", "tli_fused_gate_up",
                                                                           *judged) if name in crashed})  # fmt: skip
    criterion = "each tli layer's error <= 2 x the stock layer's error in the same dtype (+1e-6), output and grads"
    return {
        "case": vars(case),
        "criterion": criterion,
        "errors": errors,
        "crashed": crashed,
        "pass": not failures,
        "failures": failures,
    }


def measure_layer(bench: Bench, layers: Layers, case: Case, configs: dict) -> dict:
    """Forward and forward+backward of each configuration, rotating the layer input, and peak memory."""
    x_bytes = case.tokens * layers.config.hidden_size * torch.finfo(bench.dtype).bits // 8
    inputs = layers.inputs(case, sets=bench.sets(2 * x_bytes))
    results = {}
    for name, (layer, context) in configs.items():
        xs = [x.detach().requires_grad_(True) for x in inputs["xs"]]
        pairs = list(zip(xs, inputs["grads"], strict=True))
        kwargs = dict(inputs["kwargs"], position_embeddings=inputs["rope"])

        def forward(x, g, layer=layer, kwargs=kwargs):
            return layer(x, **kwargs)

        def forward_backward(x, g, layer=layer, kwargs=kwargs):
            layer(x, **kwargs).backward(g)

        def clear(x=None, g=None, layer=layer, xs=xs):
            layer.zero_grad(set_to_none=True)
            for t in xs:
                t.grad = None

        entry = {}
        try:
            with context():
                started = time.perf_counter()
                clear()
                forward_backward(*pairs[0])  # first call: compiles where compiling, builds Triton kernels
                bench.sync()
                entry["first_call_s"] = time.perf_counter() - started
                entry["forward"] = bench.time(forward, inputs=pairs)
                entry["forward_backward"] = bench.time(forward_backward, setup=clear, inputs=pairs)
                clear()
                entry["peak_memory_bytes"] = peak_memory(lambda p=pairs[0]: forward_backward(*p), bench.device)
                clear()
        except Exception as error:
            entry["error"] = f"{type(error).__name__}: {error}"
            entry["traceback"] = traceback.format_exc()
            print(f"    layer config {name} failed: {entry['error']}", flush=True)
        results[name] = entry
    _add_ratios(results)
    return results


def _add_ratios(results: dict) -> None:
    """speedup_* = stock time / this time, within the same run."""
    stock = results.get("stock", {})
    for entry in results.values():
        for key in ("forward", "forward_backward"):
            if key in entry and key in stock:
                entry[f"speedup_{key}"] = ratio(stock[key]["median_ms"], entry[key]["median_ms"])


def _time_gemms(bench: Bench, gemms: list, tokens: int) -> dict:
    dev, dt = bench.device, bench.dtype
    sets = bench.sets(sum(tokens * (i + o) for i, o in gemms) * torch.finfo(dt).bits // 8)
    ws = [(torch.randn(o, i, device=dev, dtype=dt) * i**-0.5).requires_grad_(True) for i, o in gemms]
    rotated = []
    for _ in range(sets):
        xs = [torch.randn(tokens, i, device=dev, dtype=dt, requires_grad=True) for i, _ in gemms]
        gs = [torch.randn(tokens, o, device=dev, dtype=dt) for _, o in gemms]
        rotated.append((xs, gs))

    def forward(xs, gs):
        return [F.linear(x, w) for x, w in zip(xs, ws, strict=True)]

    def forward_backward(xs, gs):
        torch.autograd.backward(forward(xs, gs), gs)

    def clear(xs, gs):
        for t in (*xs, *ws):
            t.grad = None

    return {
        "gemm_forward": bench.time(forward, inputs=rotated),
        "gemm_forward_backward": bench.time(forward_backward, setup=clear, inputs=rotated),
    }


def measure_gemm_attention_reference(bench: Bench, case: Case) -> dict:
    """The GEMM+attention reference: the layer's seven GEMMs timed alone, unfused (and at the measured
    matmul rate), plus the fastest attention kernel alone. Not a bound (a fused QKV or gate/up GEMM can
    beat it): the time a layer would take if everything outside its GEMMs and attention were free."""
    from tli_kernels import ops

    d, dev, dt = case.dims, bench.device, bench.dtype
    tokens, hidden, inter = case.tokens, d["hidden"], d["intermediate"]
    q_width, kv_width = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    gemms = [(hidden, q_width), (hidden, kv_width), (hidden, kv_width), (q_width, hidden),
             (hidden, inter), (hidden, inter), (inter, hidden)]  # (in, out): q k v o gate up down  # fmt: skip
    flops_forward = 2 * tokens * sum(i * o for i, o in gemms)
    result = {"gemm_flops_forward": flops_forward, **_time_gemms(bench, gemms, tokens)}
    rate = bench.rates.get("matmul_tflops")
    if rate:
        result["gemm_forward_at_rate_ms"] = flops_forward / (rate * 1e12) * 1e3
        result["gemm_forward_backward_at_rate_ms"] = 3 * flops_forward / (rate * 1e12) * 1e3

    qkv_bytes = tokens * (q_width + 2 * kv_width) * torch.finfo(dt).bits // 8
    rotated = []
    for _ in range(bench.sets(2 * qkv_bytes)):
        q = torch.randn(case.batch, case.seq, d["heads"], d["head_dim"], device=dev, dtype=dt).transpose(1, 2)
        k = torch.randn(case.batch, d["kv_heads"], case.seq, d["head_dim"], device=dev, dtype=dt)
        v = torch.randn_like(k)
        g = torch.randn(case.batch, case.seq, d["heads"], d["head_dim"], device=dev, dtype=dt)
        rotated.append((*(t.requires_grad_(True) for t in (q, k, v)), g))
    scale = d["head_dim"] ** -0.5

    def attend(q, k, v, g):
        return ops.attention(q, k, v, causal=True, scale=scale)

    def attend_backward(q, k, v, g):
        attend(q, k, v, g).backward(g)

    def clear(q, k, v, g):
        for t in (q, k, v):
            t.grad = None

    backends = ["sdpa", "sdpa_cudnn"] + (["flash_attn"] if ops.flash_attn_available() and dev.type == "cuda" else [])
    attention = {"auto_resolves_to": ops.resolve_backend(rotated[0][0])}
    for name in backends:
        try:
            with ops.attention_backend(name):
                fwd = bench.time(attend, inputs=rotated)
                fwd_bwd = bench.time(attend_backward, setup=clear, inputs=rotated)
            attention[name] = {"forward": fwd, "forward_backward": fwd_bwd}
        except Exception as error:
            attention[name] = {"error": f"{type(error).__name__}: {error}"}
    result["attention"] = attention
    timed = [a for a in attention.values() if isinstance(a, dict) and "forward" in a]
    if timed:
        best_fwd = min(a["forward"]["median_ms"] for a in timed)
        best_fwd_bwd = min(a["forward_backward"]["median_ms"] for a in timed)
        result["reference_forward_ms"] = result["gemm_forward"]["median_ms"] + best_fwd
        result["reference_forward_backward_ms"] = result["gemm_forward_backward"]["median_ms"] + best_fwd_bwd
        if rate:
            result["reference_forward_at_rate_ms"] = result["gemm_forward_at_rate_ms"] + best_fwd
            result["reference_forward_backward_at_rate_ms"] = result["gemm_forward_backward_at_rate_ms"] + best_fwd_bwd
    return result


def layer_configs(bench: Bench, layers: Layers, *, compiled: bool, extra: dict, case: Case | None = None) -> dict:
    """name -> (layer, context) for the layer timings. Where tli's attention reorders SDPA's backends
    for this case's shape, two controls: the stock layer under tli's order (same attention kernel) and
    tli under torch's own order, so the table separates the attention backend from the kernels."""
    from tli_kernels import ops

    configs = {
        "stock": (layers.stock, contextlib.nullcontext),
        "tli": (layers.tli, contextlib.nullcontext),
        "tli_fused_gate_up": (layers.tli_fused, contextlib.nullcontext),
    }
    if case is not None:
        q = attention_query(bench, case)
        if ops.sdpa_priority(q) is not None:
            configs["stock_under_tli_sdpa_order"] = (layers.stock, lambda q=q: ops.tli_sdpa_order(q))
            configs["tli_under_torch_sdpa_order"] = (layers.tli, lambda: ops.attention_backend("sdpa"))
    configs.update(extra)
    if compiled:
        configs["stock_compiled"] = (torch.compile(layers.stock), contextlib.nullcontext)
        configs["tli_compiled"] = (torch.compile(layers.tli), contextlib.nullcontext)
    return configs


def liger_extra(bench: Bench, layers: Layers, enabled: bool) -> tuple[dict, list, str | None]:
    """Liger's layer as an extra configuration when it is importable (CUDA only); else why not."""
    if not enabled or bench.device.type != "cuda":
        return {}, [], "not requested" if not enabled else "CUDA only"
    calls: list = []
    try:
        layer, rope_fn = build_liger_layer(layers)
    except Exception as error:  # not installed or incompatible: say so
        return {}, calls, f"{type(error).__name__}: {error}"
    return {"liger": (layer, lambda: liger_rope(rope_fn, calls))}, calls, None


# --------------------------------------------------------------------------------------- tables
def layer_rows(label: str, layer: dict, reference: dict) -> list[list]:
    """Rows of the layer table: times, speed-up over stock (same run), time over the GEMM+attention
    reference, peak memory."""
    rows = []
    ref_f, ref_fb = reference.get("reference_forward_ms"), reference.get("reference_forward_backward_ms")
    for name, entry in layer.items():
        if "forward" not in entry:
            rows.append([label, name, entry.get("error", "n/a"), "", "", "", "", "", ""])
            continue
        f, fb = entry["forward"]["median_ms"], entry["forward_backward"]["median_ms"]
        peak = entry.get("peak_memory_bytes")
        rows.append([
            label, name, fmt(f), fmt(fb), fmt_ratio(entry.get("speedup_forward")),
            fmt_ratio(entry.get("speedup_forward_backward")), fmt_ratio(ratio(f, ref_f)),
            fmt_ratio(ratio(fb, ref_fb)), fmt(peak / 2**20 if peak is not None else None, ".0f"),
        ])  # fmt: skip
    if ref_f is not None:
        rows.append([label, "reference: unfused GEMMs timed + best attention", fmt(ref_f), fmt(ref_fb),
                     "", "", "1.00x", "1.00x", ""])  # fmt: skip
    if "reference_forward_at_rate_ms" in reference:
        rows.append([
            label, "reference: GEMMs at the measured matmul rate + best attention",
            fmt(reference["reference_forward_at_rate_ms"]), fmt(reference["reference_forward_backward_at_rate_ms"]),
            "", "", "", "", "",
        ])  # fmt: skip
    return rows


LAYER_HEADERS = ["case", "layer", "fwd ms", "fwd+bwd ms", "fwd speed-up vs stock", "fwd+bwd speed-up vs stock",
                 "fwd / GEMM+attn ref", "fwd+bwd / GEMM+attn ref", "peak MiB (fwd+bwd)"]  # fmt: skip
KERNEL_HEADERS = ["case", "kernel", "tli fwd ms: eager call / kernel only", "stock fwd ms: eager / kernels",
                  "fwd speed-up (eager)", "tli bwd ms: eager / kernel", "stock bwd ms: eager / kernels",
                  "bwd speed-up (eager)", "tli fwd GB/s, kernel only (share of copy)",
                  "tli bwd GB/s, kernel only (share)", "rel err vs fp32 fwd, tli / stock"]  # fmt: skip


def _ms_pair(entry: dict, direction: str) -> str:
    kernel = entry.get(f"{direction}_kernel_only") or {}
    return f"{fmt(entry[direction]['median_ms'], '.4f')} / {fmt(kernel.get('kernel_ms'), '.4f')}"


def _gb(entry: dict, direction: str) -> str:
    key = f"{direction}_kernel_only_gb_per_s"
    if key not in entry:  # off CUDA: no kernel-only time
        key = f"{direction}_gb_per_s"
    share = entry.get(key.replace("gb_per_s", "share_of_copy_bw"))
    return f"{entry[key]:.0f} ({fmt(share, '.0%')})"


def kernel_rows(label: str, kernels: dict) -> list[list]:
    """Kernel table rows. "eager call" brackets each call with CUDA events after a sync (Python and
    launch included); "kernel only" is the profiler's device time of the kernels it launched."""
    rows = []
    for name, entry in kernels.items():
        if not isinstance(entry, dict) or "tli" not in entry:
            continue
        tli, eager = entry["tli"], entry["eager"]
        rows.append([
            label, name, _ms_pair(tli, "forward"), _ms_pair(eager, "forward"), fmt_ratio(entry.get("speedup_forward")),
            _ms_pair(tli, "backward"), _ms_pair(eager, "backward"), fmt_ratio(entry.get("speedup_backward")),
            _gb(tli, "forward"), _gb(tli, "backward"),
            f"{tli['forward_rel_error']:.2e} / {eager['forward_rel_error']:.2e}",
        ])  # fmt: skip
    return rows


def attention_lines(record: dict | None) -> list[str]:
    """What SDPA ran (markdown), from `attention_record`."""
    if not isinstance(record, dict) or "training" not in record:
        return []
    lines = []
    for name, r in record.items():
        lines.append(
            f"- SDPA, {name} shape (q {r['shape']['q']}, kv {r['shape']['k']}): torch {r['torch']}, cuDNN "
            f"{r['cudnn']}, enabled {[k for k, v in r['enabled'].items() if v]}, priority order "
            f"{r['priority_order_before']}; stock call runs **{r['stock_choice']}**, tli runs "
            f"**{r['tli_choice']}** (tli's order: {r.get('tli_priority_order', 'n/a')})"
        )
    return [*lines, ""]


def correctness_lines(correctness: dict) -> list[str]:
    if "errors" not in correctness:
        return []
    verdict = "PASS" if correctness["pass"] else "FAIL"
    lines = [f"Correctness ({correctness['criterion']}): **{verdict}**", ""]
    for name, errs in correctness["errors"].items():
        worst = max((v, k) for k, v in errs.items() if k != "output")
        lines.append(f"- {name}: output {errs['output']:.2e}, worst gradient {worst[0]:.2e} ({worst[1]})")
    for name, why in (correctness.get("crashed") or {}).items():
        lines.append(f"- {name}: FAILED to run: {why}")
    return lines + [""]


def rates_line(rates: dict, dtype: str) -> str:
    if "matmul_tflops" not in rates:
        return ""
    shape = "x".join(map(str, rates["matmul_shape"]))
    return (
        f"Measured rates: {dtype} matmul {rates['matmul_tflops']:.0f} TFLOP/s ({shape}), "
        f"device copy {rates['copy_gb_per_s']:.0f} GB/s (read + write)."
    )


def markdown(results: dict) -> str:
    settings = results["settings"]
    env = results["environment"]
    device = (env.get("accelerator") or {}).get("name", "CPU")
    lines = [
        f"# tli kernels on {device} ({env['date_utc']} UTC)",
        "",
        describe_environment(env),
        "",
        f"Case: {settings['case']}, dtype {settings['dtype']}, {settings['timing']}. Baseline: the stock "
        "transformers layer / the eager PyTorch ops it runs, timed in the same run; speed-up = stock time / time.",
        "",
        rates_line(results.get("rates", {}), settings["dtype"]),
        "",
    ]
    case = settings["case"]
    label = f"{case['model']} {case['batch']}x{case['seq']}"
    layer = results.get("layer", {})
    if isinstance(layer, dict) and "error" not in layer and layer:
        reference = results.get("gemm_attention_reference", {})
        lines += [markdown_table(LAYER_HEADERS, layer_rows(label, layer, reference)), ""]
    kernels = results.get("kernels", {})
    if isinstance(kernels, dict) and "error" not in kernels and kernels:
        lines += [markdown_table(KERNEL_HEADERS, kernel_rows(label, kernels)), ""]
    lines += attention_lines(results.get("attention_backend"))
    lines += correctness_lines(results.get("layer_correctness", {}))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def layer_sections(bench: Bench, case: Case, args: argparse.Namespace, prefix: str = "") -> None:
    """correctness, layer and the GEMM+attention reference of one case, each a section of bench.results."""
    results = bench.results
    try:
        layers = Layers(bench, case.model)
    except Exception as error:  # recorded; the kernel and rate sections still stand
        results.put(prefix + "layer_build", {"error": f"{type(error).__name__}: {error}",
                                             "traceback": traceback.format_exc()})  # fmt: skip
        results.save()
        return
    results.section(prefix + "attention_backend", attention_record, bench, case)
    extra, liger_calls, liger_missing = liger_extra(bench, layers, not args.no_liger)
    correctness = results.section(prefix + "layer_correctness", check_correctness, bench, layers, case, extra)
    configs = layer_configs(bench, layers, compiled=not args.no_compile, extra=extra, case=case)
    results.section(prefix + "layer", measure_layer, bench, layers, case, configs)
    results.put(prefix + "liger", {"unavailable": liger_missing} if liger_missing else
                {"rope_patched_calls": len(liger_calls), "parts": ["rms_norm", "swiglu", "rope"]})  # fmt: skip
    results.section(prefix + "gemm_attention_reference", measure_gemm_attention_reference, bench, case)
    results.put(prefix + "correctness_pass", bool(isinstance(correctness, dict) and correctness.get("pass")))
    results.save()


def attention_query(bench: Bench, case: Case, q_len: int | None = None) -> torch.Tensor:
    """An (empty) query of this case's attention, [B, Hq, S, D] as the layer makes it."""
    d = case.dims
    shape = (case.batch, q_len or case.seq, d["heads"], d["head_dim"])
    return torch.empty(shape, device=bench.device, dtype=bench.dtype).transpose(1, 2)


def attention_record(bench: Bench, case: Case) -> dict:
    """What SDPA runs for this case (training/prefill, causal) and for one decode step against a cache of
    case.seq tokens: torch and cuDNN versions, the switches, the priority order, and torch's backend
    choice for a stock call and for tli's (`tli_kernels.ops.sdpa_report`)."""
    from tli_kernels import ops

    d = case.dims
    records = {}
    for name, q_len in (("training", case.seq), ("decode", 1)):
        q = attention_query(bench, case, q_len)
        kv = torch.empty(case.batch, case.seq, d["kv_heads"], d["head_dim"], device=bench.device,
                         dtype=bench.dtype).transpose(1, 2)  # fmt: skip
        records[name] = ops.sdpa_report(q, kv, kv, causal=True)
    return records


def bench_flags(device: torch.device) -> dict:
    """Settings that change what is measured: the float32 matmul precision (CUDA)."""
    return matmul_precision_flags() if device.type == "cuda" else {}


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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    refuse_interpreter_on_cuda(device)
    if device.type != "cuda":
        if not args.smoke:
            parser.error("the full shapes need a CUDA GPU; use --smoke on CPU")
        args.no_compile = True  # inductor on CPU needs a C++ toolchain and minutes; not what this checks
    case = Case("smoke", 1, 16) if args.smoke else Case("llama3_8b", 2, 4096)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    out = Path(args.out)
    results = Results(
        out / "gpu_kernels.json",
        settings={
            "smoke": args.smoke,
            "case": vars(case),
            "dims": case.dims,
            "dtype": str(dtype),
            "warmup": args.warmup,
            "reps": args.reps,
            "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            "timing": "eager call: CUDA events per call after a sync, median of reps after warm-up, inputs "
            "rotated; kernel only: torch.profiler device time per call" if device.type == "cuda"
            else "perf_counter per call (CPU smoke run: timings and bf16 errors mean nothing here)",
            **bench_flags(device),
        },
    )  # fmt: skip
    bench = Bench(results, device=device, dtype=dtype, warmup=args.warmup, reps=args.reps,
                  max_sets=2 if args.smoke else 8)  # fmt: skip
    print(f"tli gpu_kernels: {results.data['environment']['accelerator'] or 'CPU'} -> {out}", flush=True)
    results.section("rates", measure_rates, bench, **RATES["smoke" if args.smoke else "full"])
    results.section("kernels", measure_kernels, bench, case)
    layer_sections(bench, case, args)
    text = markdown(results.data)
    (out / "gpu_kernels.md").write_text(text)
    print(text, flush=True)
    return 0 if results.data.get("correctness_pass") or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
