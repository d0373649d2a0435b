"""Checkpoints with real Llama-3 layouts and made-up data, for tests and benchmarks.

`dense` writes random bf16 weights (normal, std 0.02; norms near 1) so every byte is real;
`sparse` writes the real headers and leaves the data as holes, so a 405B-shaped checkpoint
(~812 GB apparent) costs a few MB of disk. Tensor order and names follow Hugging Face's
LlamaForCausalLM, shards follow its model-0000i-of-0000n naming with an index.
"""

from __future__ import annotations

import json
import math
import os

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


def write_checkpoint(
    path: str, config: dict, *, fill: str = "dense", dtype: str = "BF16", num_shards: int | None = None, seed: int = 0
) -> list[str]:
    """Write config.json + safetensors shards (+ index when sharded). Returns the shard paths."""
    if fill not in ("dense", "sparse"):
        raise ValueError(f"fill {fill!r}: choose dense or sparse")
    tensors = llama_tensors(config)
    total = sum(tensor_nbytes(dtype, s) for _, s in tensors)
    num_shards = num_shards or 1
    target = math.ceil(total / num_shards)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        nbytes = tensor_nbytes(dtype, shape)
        if groups[-1] and used + nbytes > target and len(groups) < num_shards:
            groups.append([])
            used = 0
        groups[-1].append((name, shape))
        used += nbytes
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = shard_file_names(len(groups))
    weight_map = {}
    for fname, group in zip(names, groups):
        header = build_header([(n, dtype, s) for n, s in group], {"format": "pt"})
        with open(os.path.join(path, fname), "wb") as f:
            f.write(header)
            for name, shape in group:
                nbytes = tensor_nbytes(dtype, shape)
                weight_map[name] = fname
                if fill == "sparse":
                    f.seek(nbytes, os.SEEK_CUR)
                    continue
                _write_random(f, name, shape, dtype, rng)
            f.truncate(f.tell())
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return [os.path.join(path, n) for n in names]


def _write_random(f, name: str, shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> None:
    n = math.prod(shape)
    norm = len(shape) == 1
    chunk = 1 << 22
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        x = rng.standard_normal(k, dtype=np.float32) * np.float32(0.02)
        if norm:
            x += np.float32(1.0)
        f.write(f32_to_bytes(x, dtype))
