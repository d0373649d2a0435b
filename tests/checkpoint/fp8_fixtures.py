"""Tiny FP8 checkpoints in the three published layouts, written with the safetensors library (not by
tli), and the float64 dequantisation the tests compare against."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

FP8_MAX = 448.0  # largest finite float8_e4m3fn
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip

# name -> (quant_method, scale name, scale grid, scale dtype, static input scale)
SCHEMES = {
    "block-f32": ("fp8", "weight_scale_inv", "block", torch.float32, False),
    "block-bf16": ("fp8", "weight_scale_inv", "block", torch.bfloat16, False),
    "ct-tensor": ("compressed-tensors", "weight_scale", "tensor", torch.float32, True),
    "ct-channel": ("compressed-tensors", "weight_scale", "channel", torch.bfloat16, False),
    "fbgemm": ("fbgemm_fp8", "weight_scale", "channel", torch.float32, False),
}


def quantize(w: torch.Tensor, grid: str, block: tuple[int, int], scale_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, scale) with w ~= f32(q) * scale, the scale per block / row / tensor."""
    rows, cols = w.shape
    if grid == "tensor":
        br, bc = rows, cols
    elif grid == "channel":
        br, bc = 1, cols
    else:
        br, bc = block
    gr, gc = -(-rows // br), -(-cols // bc)
    scale = torch.empty(gr, gc, dtype=torch.float32)
    for i in range(gr):
        for j in range(gc):
            amax = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc].abs().max().item()
            scale[i, j] = amax / FP8_MAX if amax > 0 else 1.0
    scale = scale.to(scale_dtype)
    expanded = expand(scale.float(), rows, cols, br, bc)
    q = (w / expanded).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if grid == "tensor":
        scale = scale.reshape(1)
    return q, scale


def expand(scale: torch.Tensor, rows: int, cols: int, br: int, bc: int) -> torch.Tensor:
    grid = scale.reshape(-(-rows // br), -(-cols // bc))
    return grid.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]


def dequant64(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The real weight in float64 (exact: an FP8 value times a BF16/F32 scale fits a double)."""
    rows, cols = q.shape
    return q.to(torch.float64) * expand(scale.to(torch.float64), rows, cols, *block)


def save_fp8_model(
    path: str,
    scheme: str,
    *,
    layers: int = 6,
    block: tuple[int, int] = (16, 32),
    model_type: str = "qwen3",
    seed: int = 0,
    mtp: bool = False,
) -> str:
    """A random tiny model of `model_type`, its decoder linears quantised per `scheme` (SCHEMES).

    fbgemm follows Llama-3.1-405B-FP8: attention and the first and last layers' MLPs stay BF16 and are
    listed by name in modules_to_not_convert."""
    from transformers import AutoConfig, AutoModelForCausalLM

    method, scale_name, grid, scale_dtype, static = SCHEMES[scheme]
    config = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    keep = set()
    if scheme == "fbgemm":
        keep = {f"model.layers.{i}.{m}" for i in range(layers) for m in LINEARS[:4]}
        keep |= {f"model.layers.{i}.{m}" for i in (0, layers - 1) for m in LINEARS[4:]}
    out = {}
    for name, w in state.items():
        module = name[: -len(".weight")]
        rest = module.split(".", 3)[-1] if module.startswith("model.layers.") else ""
        if rest in LINEARS and module not in keep:
            q, s = quantize(w, grid, block, scale_dtype)
            out[name], out[f"{module}.{scale_name}"] = q, s
            if static:
                out[f"{module}.input_scale"] = torch.tensor([0.0625], dtype=scale_dtype)
        elif "norm" in name:
            out[name] = torch.empty_like(w).uniform_(0.5, 1.5).to(torch.bfloat16)
        else:
            out[name] = w.to(torch.bfloat16)
    if mtp:  # DeepSeek-V3 style: a multi-token-prediction module stored as layer `layers` (FP8 too)
        for name in [n for n in out if n.startswith("model.layers.1.")]:
            out[name.replace(".1.", f".{layers}.", 1)] = out[name].clone()
        q, s = quantize(torch.randn(64, 128) * 0.02, grid, block, scale_dtype)
        out[f"model.layers.{layers}.eh_proj.weight"], out[f"model.layers.{layers}.eh_proj.{scale_name}"] = q, s
        out[f"model.layers.{layers}.enorm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    os.makedirs(path, exist_ok=True)
    names = sorted(out)
    half = len(names) // 2  # two shards and an index: the sharded path
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, part in files.items():
        save_file({n: out[n].contiguous() for n in part}, os.path.join(path, fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in files.items() for n in part}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    cfg = config.to_dict()
    cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = quant_config(method, grid, block, static, sorted(keep))
    if mtp:
        cfg["num_nextn_predict_layers"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def quant_config(method: str, grid: str, block, static: bool, keep: list[str]) -> dict:
    if method == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    if method == "fbgemm_fp8":
        return {
            "quant_method": "fbgemm_fp8",
            "activation_scale_ub": 1200.0,
            "modules_to_not_convert": keep + ["lm_head"],
        }
    act = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": not static, "symmetric": True}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": grid, "dynamic": False, "symmetric": True},
                "input_activations": act,
            }
        },
        "ignore": ["lm_head"],
    }
