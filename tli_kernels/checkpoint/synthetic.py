"""Checkpoints with real Llama-3 layouts and made-up data, for tests and benchmarks.

`dense` writes random bf16 weights (normal, std 0.02; norms near 1) so every byte is real;
`sparse` writes the real headers and leaves the data as holes, so a 405B-shaped checkpoint
(~812 GB apparent, 191 shards like the hub's Llama-3.1-405B) costs a few MB of disk; `special`
is dense with values over the whole float range plus NaN, infinities, subnormals and signed zeros
(for the engines' byte-identity tests). Tensor order and names follow Hugging Face's
LlamaForCausalLM, shards follow its model-0000i-of-0000n naming with an index.

    python -m tli_kernels.checkpoint.synthetic --preset llama-3.1-405b --sparse DIR
    python -m tli_kernels.checkpoint.synthetic --preset llama-3.2-1b DIR           # dense, 2.5 GB
    python -m tli_kernels.checkpoint.synthetic --preset llama-3.1-405b --quant fbgemm-fp8 --sparse DIR

`--quant fbgemm-fp8` gives Llama-3.1-405B-FP8's layout (quant_method fbgemm_fp8): the MLP weights of
layers 1 .. N-2 in F8_E4M3, each followed by its per-row F32 `weight_scale` [rows, 1]; attention and
the first and last layers' MLPs stay BF16 and are listed by name in `modules_to_not_convert` (with
lm_head). `--quant fp8-block` quantises every decoder linear the DeepSeek-V3 / Qwen3-FP8 way
(quant_method fp8, F32 `weight_scale_inv` per 128 x 128 block) on the Llama shapes: not a published
Llama checkpoint, a block-scale layout at Llama-3.1-405B's size. Dense FP8 data is random bytes of
finite E4M3 values with scales near 0.02 / 448.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from tli_kernels.checkpoint.executor_python import f32_to_bytes
from tli_kernels.checkpoint.plan import shard_file_names
from tli_kernels.checkpoint.safetensors_format import build_header, tensor_nbytes

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
PRESETS: dict[str, dict] = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_factor=32.0,
        shards=1,
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        rope_factor=32.0,
        shards=2,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rope_factor=8.0,
        shards=4,
    ),
    "llama-3.1-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rope_factor=8.0,
        shards=30,
    ),
    "llama-3.1-405b": dict(
        hidden_size=16384,
        intermediate_size=53248,
        num_hidden_layers=126,
        num_attention_heads=128,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rope_factor=8.0,
        shards=191,
    ),
}


def llama_config(preset: str, **overrides) -> dict:
    """A config.json dict for a Llama-3 preset; overrides replace any field (e.g. num_hidden_layers)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    p = {k: v for k, v in PRESETS[preset].items() if k not in ("rope_factor", "shards")}
    p.update(overrides)
    rope = {**_LLAMA3_ROPE, "factor": PRESETS[preset]["rope_factor"], "rope_theta": 500000.0}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "rms_norm_eps": 1e-05,
        "rope_parameters": rope,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
        **p,
    }


def llama_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in Hugging Face order for a Llama config."""
    h, i = config["hidden_size"], config["intermediate_size"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (config["vocab_size"], h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (config["vocab_size"], h)))
    return out


FILLS = ("dense", "sparse", "special")
QUANTS = ("fbgemm-fp8", "fp8-block")
BLOCK = 128
_MLP = ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")
_ATTN = ("self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")


def block_fp8_layout(config: dict, dtype: str = "BF16") -> tuple[list[tuple[str, tuple[int, ...], str]], dict]:
    """Every decoder linear in F8_E4M3 with an F32 `weight_scale_inv` per 128 x 128 block (quant_method fp8)."""
    out = []
    for name, shape in llama_tensors(config):
        if name.startswith("model.layers.") and len(shape) == 2:
            grid = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
            out += [(name, shape, "F8_E4M3"), (name + "_scale_inv", grid, "F32")]
        else:
            out.append((name, shape, dtype))
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
    return out, quant


def fbgemm_fp8_layout(config: dict, dtype: str = "BF16") -> tuple[list[tuple[str, tuple[int, ...], str]], dict]:
    """(name, shape, dtype) of Llama-3.1-405B-FP8's tensors for `config`, and its quantization_config."""
    n = config["num_hidden_layers"]
    quantized = {f"model.layers.{i}.{m}" for i in range(1, n - 1) for m in _MLP}
    out = []
    for name, shape in llama_tensors(config):
        module = name[: -len(".weight")]
        if module in quantized:
            out += [(name, shape, "F8_E4M3"), (module + ".weight_scale", (shape[0], 1), "F32")]
        else:
            out.append((name, shape, dtype))
    keep = [f"model.layers.{i}.{m}" for i in range(n) for m in _ATTN + (_MLP if i in (0, n - 1) else ())]
    quant = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": keep + ["lm_head"]}
    return out, quant


def write_checkpoint(
    path: str,
    config: dict,
    *,
    fill: str = "dense",
    dtype: str = "BF16",
    num_shards: int | None = None,
    seed: int = 0,
    norm_dtype: str | None = None,
    quant: str | None = None,
) -> list[str]:
    """Write config.json + safetensors shards (+ index when sharded). Returns the shard paths.

    Shards are cut greedily at total / num_shards bytes, so there are exactly num_shards of them
    when the tensors allow it. norm_dtype gives 1-D tensors (norms) their own dtype (mixed-dtype
    checkpoints).
    """
    if fill not in FILLS:
        raise ValueError(f"fill {fill!r}: choose one of {', '.join(FILLS)}")
    tensors = [(n, s, (norm_dtype or dtype) if len(s) == 1 else dtype) for n, s in llama_tensors(config)]
    if quant is not None:
        if quant not in QUANTS:
            raise ValueError(f"quant {quant!r}: choose one of {', '.join(QUANTS)}")
        layout = fbgemm_fp8_layout if quant == "fbgemm-fp8" else block_fp8_layout
        tensors, quant_config = layout(config, dtype)
        config = {**config, "quantization_config": quant_config}
    total = sum(tensor_nbytes(d, s) for _, s, d in tensors)
    num_shards = num_shards or 1
    target = math.ceil(total / num_shards)
    groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    used = 0
    for name, shape, dt in tensors:
        nbytes = tensor_nbytes(dt, shape)
        if groups[-1] and used + nbytes > target and len(groups) < num_shards:
            groups.append([])
            used = 0
        groups[-1].append((name, shape, dt))
        used += nbytes
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = shard_file_names(len(groups))
    weight_map = {}
    for fname, group in zip(names, groups):
        header = build_header([(n, dt, s) for n, s, dt in group], {"format": "pt"})
        with open(os.path.join(path, fname), "wb") as f:
            f.write(header)
            for name, shape, dt in group:
                nbytes = tensor_nbytes(dt, shape)
                weight_map[name] = fname
                if fill == "sparse":
                    f.seek(nbytes, os.SEEK_CUR)
                    continue
                _write_random(f, shape, dt, rng, special=fill == "special", scale=name.endswith(SCALE_SUFFIXES))
            f.truncate(f.tell())
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return [os.path.join(path, n) for n in names]


def write_preset(path: str, preset: str, *, fill: str = "dense", layers: int | None = None, **kwargs) -> list[str]:
    """A Llama-3 preset's checkpoint with the hub's shard count (layers: fewer layers, same shapes)."""
    config = llama_config(preset, **({"num_hidden_layers": layers} if layers else {}))
    shards = PRESETS[preset]["shards"]
    if layers:
        shards = max(1, round(shards * layers / PRESETS[preset]["num_hidden_layers"]))
    return write_checkpoint(path, config, fill=fill, num_shards=kwargs.pop("num_shards", shards), **kwargs)


# Values that stress rounding: the float16/bfloat16 edges, subnormals, signed zeros, non-finite.
SPECIAL_VALUES = np.array(
    [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, -65520.0, 3.3895314e38, 1e-40, -1e-42, 2.0**-24,
     2.0**-25, 3 * 2.0**-26, 6.1e-5, 1.00390625, 1.01171875, 5.96e-8],
    dtype=np.float32,
)  # fmt: skip


SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv")


def _write_random(
    f, shape: tuple[int, ...], dtype: str, rng: np.random.Generator, special: bool = False, scale: bool = False
) -> None:
    n = math.prod(shape)
    if dtype == "F8_E4M3":  # finite E4M3 bytes (0x7F / 0xFF are NaN): any byte but those
        for start in range(0, n, 1 << 22):
            b = rng.integers(0, 126, min(1 << 22, n - start), dtype=np.uint8)
            f.write((b + (rng.random(len(b)) < 0.5).astype(np.uint8) * np.uint8(128)).tobytes())
        return
    if scale:  # an FP8 weight's scale (per row or per block), F32
        f.write((np.float32(0.02 / 448) * (1 + rng.random(n, dtype=np.float32))).tobytes())
        return
    norm = len(shape) == 1
    chunk = 1 << 22
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        x = rng.standard_normal(k, dtype=np.float32) * np.float32(0.02)
        if special:
            with np.errstate(over="ignore"):
                x = x * np.exp(rng.standard_normal(k, dtype=np.float32) * np.float32(8.0)).astype(np.float32)
            picks = rng.random(k) < 0.05
            x[picks] = rng.choice(SPECIAL_VALUES, int(picks.sum()))
            nan = rng.random(k) < 0.002  # NaNs with odd payloads too
            x.view(np.uint32)[nan] = np.uint32(0x7F800001) + rng.integers(0, 1 << 22, int(nan.sum()), dtype=np.uint32)
        elif norm:
            x += np.float32(1.0)
        if dtype == "F32":
            f.write(x.tobytes())
        else:
            f.write(_narrow_keep_nan_bits(x, dtype))


def _narrow_keep_nan_bits(x: np.ndarray, dtype: str) -> bytes:
    """f32 -> BF16/F16 bytes, keeping NaN payload bits (a source may hold any NaN, not just canonical ones)."""
    out = np.frombuffer(f32_to_bytes(x, dtype), dtype=np.uint16).copy()
    nan = np.isnan(x)
    if nan.any():
        bits = x.view(np.uint32)[nan]
        if dtype == "BF16":
            out[nan] = (bits >> 16).astype(np.uint16) | np.uint16(0x0001)  # stays a NaN
        else:
            out[nan] = np.uint16(0x7C00) | ((bits >> 13) & 0x3FF).astype(np.uint16) | np.uint16(0x0001)
    return out.tobytes()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tli_kernels.checkpoint.synthetic",
        description="Write a checkpoint with a real Llama-3 layout and random (or no) data.",
    )
    p.add_argument("dir", help="output folder (created)")
    p.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--sparse", action="store_const", dest="fill", const="sparse", help="headers only, data as holes")
    kind.add_argument("--special", action="store_const", dest="fill", const="special", help="NaN/inf/subnormal data")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (same shapes)")
    p.add_argument("--shards", type=int, default=None, help="number of shards (default: the hub's)")
    p.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"])
    p.add_argument(
        "--quant",
        default=None,
        choices=QUANTS,
        help="an FP8 layout (fbgemm-fp8: Llama-3.1-405B-FP8's; fp8-block: 128x128 block scales)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.path.exists(args.dir) and os.listdir(args.dir):
        print(f"{args.dir} exists and is not empty", file=sys.stderr)
        return 1
    kwargs = {"num_shards": args.shards} if args.shards else {}
    paths = write_preset(
        args.dir,
        args.preset,
        fill=args.fill or "dense",
        layers=args.layers,
        dtype=args.dtype,
        seed=args.seed,
        quant=args.quant,
        **kwargs,
    )
    apparent = sum(os.path.getsize(q) for q in paths)
    real = sum(os.stat(q).st_blocks * 512 for q in paths)
    print(f"wrote {args.dir}: {len(paths)} shard(s), {apparent / 1e9:.1f} GB apparent, {real / 1e9:.3f} GB on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
