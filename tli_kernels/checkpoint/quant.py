"""Quantised (FP8) checkpoints, grown without dequantising.

Three published layouts, told apart by config.json's `quantization_config`:

  quant_method         weight      scale tensor (per module)          scale grid
  fp8                  F8_E4M3     weight_scale_inv  F32 or BF16      weight_block_size [br, bc] blocks
                                                                      (DeepSeek-V3, Qwen3-FP8); none: one
  compressed-tensors   F8_E4M3     weight_scale      F32/BF16/F16     strategy tensor | channel | block
                                   (+ input_scale when static)
  fbgemm_fp8           F8_E4M3     weight_scale      F32 [rows, 1]    per row (Llama-3.1-405B-FP8)

In every one the real weight is W[r, c] = f(q[r, c]) * s[r // br, c // bc] ("weight_scale_inv" is
DeepSeek's name for that multiplier, despite the "inv"). So a depth method maps each plan op on a
quantised weight to ops on its tensors, never touching an FP8 byte with arithmetic:

  weight op      FP8 weight      scale                          input/activation scale
  copy           bytes           bytes                          bytes
  scale by a     bytes           f32(s) * f32(a), in s's dtype  bytes
  zeros          zeros (hole)    bytes (the grid stays usable)  bytes
  average        refused: two FP8 grids have no common FP8 mean; --dtype bf16|fp32 dequantises
  uniform        refused (fresh weights would need quantising); --dtype bf16|fp32 dequantises

alpha is exact when it is a power of two (and the scaled scale stays a normal number); otherwise the
scale is rounded once to float32 and, for BF16/F16 scales, once more to that dtype: the plan's `scale`
op. `--dtype bf16|fp16|fp32` instead dequantises while streaming (the plan's `dequant` op, f32(q) *
f32(s) [* f32(alpha)], rounded to the output dtype: what transformers' Fp8Dequantize computes), drops
the scale tensors and the quantization_config: a plain model to train.

Layer-indexed entries of the quantisation config (`modules_to_not_convert`, `ignore`) follow the layer
map: output layer j lists what its source layer listed. An entry that names layers through a regular
expression cannot be rewritten and is refused.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.plan import OutTensor, TensorOp
from tli_kernels.checkpoint.safetensors_format import ARITHMETIC_DTYPES, TensorEntry

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_NAMES = ("weight_scale_inv", "weight_scale")
# Per-module tensors that travel with a quantised weight; input/activation scales quantise the input
# at run time and never take alpha.
COMPANIONS = SCALE_NAMES + ("input_scale", "activation_scale")
SUPPORTED = ("fp8", "compressed-tensors", "fbgemm_fp8")
# Where each method lists the modules it leaves unquantised (by name).
NOT_CONVERTED_KEYS = {"fp8": "modules_to_not_convert", "fbgemm_fp8": "modules_to_not_convert",
                      "compressed-tensors": "ignore"}  # fmt: skip


@dataclass(frozen=True)
class QuantScheme:
    method: str
    block: tuple[int, int] | None  # the config's scale block, where it states one
    config: dict  # the source's quantization_config

    @property
    def not_converted_key(self) -> str:
        return NOT_CONVERTED_KEYS[self.method]


def parse_scheme(config: dict, config_path: str) -> QuantScheme | None:
    """The source's quantisation scheme, or None for an unquantised model; one-line errors for what tli
    cannot grow without changing what the model computes."""
    q = config.get("quantization_config")
    if q is None or q == {}:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"quantization_config is a {type(q).__name__}, expected an object", config_path)
    method = q.get("quant_method", "?")
    if method not in SUPPORTED:
        raise CheckpointError(
            f"quantized checkpoints ({method}) are not supported: tli grows {', '.join(SUPPORTED)} (FP8) "
            "checkpoints; upscale the unquantized model",
            config_path,
        )
    block = None
    if method == "fp8":
        fmt = q.get("fmt", "e4m3")
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise CheckpointError(f"quantization_config fmt {fmt!r}: tli reads FP8 e4m3 weights only", config_path)
        block = _block(q.get("weight_block_size"), "weight_block_size", config_path)
    elif method == "compressed-tensors":
        block = _compressed_tensors_block(q, config_path)
    return QuantScheme(method, block, q)


def _block(value, what: str, config_path: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise CheckpointError(f"quantization_config {what} is {value!r}, expected two positive integers", config_path)
    return value[0], value[1]


def _compressed_tensors_block(q: dict, config_path: str) -> tuple[int, int] | None:
    if q.get("sparsity_config"):
        raise CheckpointError("compressed-tensors with a sparsity_config is not supported (FP8 only)", config_path)
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError("compressed-tensors quantization_config has no config_groups", config_path)
    blocks = set()
    for name, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict) or w.get("type") != "float" or w.get("num_bits") != 8:
            raise CheckpointError(
                f"compressed-tensors group {name!r}: tli grows 8-bit float weights only (got {w!r})", config_path
            )
        if w.get("strategy") not in ("tensor", "channel", "block"):
            raise CheckpointError(
                f"compressed-tensors group {name!r}: weight strategy {w.get('strategy')!r} is not supported "
                "(tensor, channel, block)",
                config_path,
            )
        if w.get("strategy") == "block":
            blocks.add(_block(w.get("block_structure"), "block_structure", config_path))
        for target in g.get("targets") or []:
            if _layer_index_pattern(str(target)):
                raise CheckpointError(
                    f"compressed-tensors group {name!r} targets {target!r}, which names layers: tli cannot carry "
                    "it through a new layer order",
                    config_path,
                )
    if len(blocks) > 1:
        raise CheckpointError(f"compressed-tensors groups use several block structures {sorted(blocks)}", config_path)
    return blocks.pop() if blocks else None


def companion(suffix: str) -> tuple[str, str] | None:
    """('self_attn.o_proj', 'weight_scale') for 'self_attn.o_proj.weight_scale'; None otherwise."""
    module, _, last = suffix.rpartition(".")
    return (module, last) if module and last in COMPANIONS else None


def scale_of(tensors: dict, weight_name: str) -> TensorEntry | None:
    """The scale tensor of a quantised weight (name ending in '.weight'), looked up in `tensors`."""
    base = weight_name[: -len("weight")]
    for s in SCALE_NAMES:
        if base + s in tensors:
            return tensors[base + s]
    return None


def scale_block(weight: TensorEntry, scale: TensorEntry, scheme: QuantScheme) -> tuple[int, int]:
    """The block [br, bc] of weight rows x columns that one scale element covers (checked against the
    scale's shape): the whole tensor, one row, or the scheme's block."""
    if len(weight.shape) != 2:
        raise CheckpointError(
            f"quantized weight has shape {list(weight.shape)}: tli grows 2-D FP8 weights only", weight.file, weight.name
        )
    rows, cols = weight.shape
    grid = list(scale.shape)
    if scheme.block is not None and grid == [-(-rows // scheme.block[0]), -(-cols // scheme.block[1])]:
        return scheme.block
    if math.prod(grid) == 1:
        return rows, cols
    if grid in ([rows, 1], [rows]):
        return 1, cols
    want = f"[{-(-rows // scheme.block[0])}, {-(-cols // scheme.block[1])}]" if scheme.block else f"[] or [{rows}, 1]"
    raise CheckpointError(
        f"scale {scale.name} has shape {grid} for a {rows}x{cols} weight; the {scheme.method} scheme wants {want}",
        scale.file,
        scale.name,
    )


def check_tensors(scheme: QuantScheme, tensors: dict, config_path: str) -> None:
    """Every FP8 weight has one arithmetic-dtype scale of the scheme's grid; every scale has its weight."""
    for name, t in tensors.items():
        if t.dtype in FP8_DTYPES:
            if not name.endswith(".weight"):
                raise CheckpointError(
                    "FP8 tensor that is not a module's .weight: tli cannot tell its scale", t.file, name
                )
            scale = scale_of(tensors, name)
            if scale is None:
                raise CheckpointError(f"FP8 weight without a {' or '.join(SCALE_NAMES)} tensor", t.file, name)
            if scale.dtype not in ARITHMETIC_DTYPES:
                raise CheckpointError(
                    f"scale dtype {scale.dtype}: tli reads F32, BF16 or F16 scales", scale.file, scale.name
                )
            scale_block(t, scale, scheme)
        elif name.endswith("weight_zero_point"):
            raise CheckpointError("asymmetric quantisation (zero points) is not supported", t.file, name)
        else:
            c = companion(name)
            if c is not None and c[1] in SCALE_NAMES:
                weight = tensors.get(name[: -len(c[1])] + "weight")
                if weight is None or weight.dtype not in FP8_DTYPES:
                    raise CheckpointError("scale tensor without an FP8 weight beside it", t.file, name)


class QuantPlanner:
    """Turns the ops of a plan on a quantised source into ops on FP8 weights and their scales.

    `build_plan` asks it for every tensor that is quantised or a quantised weight's companion
    (`handles`); everything else keeps its ordinary op."""

    def __init__(self, scheme: QuantScheme, tensors: dict, target_dtype: str | None):
        self.scheme = scheme
        self.tensors = tensors
        self.dequantize = target_dtype  # None: keep FP8; "BF16"/"F16"/"F32": dequantise to it

    @classmethod
    def for_layout(cls, layout, target_dtype: str | None) -> QuantPlanner | None:
        scheme = parse_scheme(layout.config, layout.config_path)
        if scheme is None:
            return None
        check_tensors(scheme, layout.tensors, layout.config_path)
        return cls(scheme, layout.tensors, target_dtype)

    # ---- tensors -------------------------------------------------------------------------------
    def handles(self, suffix: str, layer: dict) -> bool:
        """Is this layer-relative tensor a quantised weight or one of its companions?"""
        t = layer[suffix]
        if t.dtype in FP8_DTYPES:
            return True
        c = companion(suffix)
        weight = layer.get(f"{c[0]}.weight") if c else None
        return weight is not None and weight.dtype in FP8_DTYPES

    def layer_tensor(
        self,
        suffix: str,
        entries: list[dict],
        name: str,
        weight_op: Callable[[str], TensorOp],
        where: str,
    ) -> OutTensor | None:
        """The output tensor `name` (layer-relative `suffix`) of an output layer made from the source
        layers `entries` (suffix -> TensorEntry each), or None when dequantising drops it (a scale).
        weight_op(weight_suffix) is the op the plan's rule gives that weight as if it were unquantised."""
        c = companion(suffix)
        weight_suffix = f"{c[0]}.weight" if c else suffix
        op = weight_op(weight_suffix)
        weights = [e[weight_suffix] for e in entries]
        t0 = entries[0][suffix]
        if self.dequantize:
            if c is not None:
                return None
            return OutTensor(name, self.dequantize, t0.shape, self._dequant_op(op, weights))
        if op.kind == "zeros":
            new = TensorOp("zeros") if c is None else TensorOp("copy", src=[t0.name])
        elif op.kind == "copy":
            new = TensorOp("copy", src=[t0.name])
        elif op.kind == "scale" and not op.offset:
            new = TensorOp("scale", src=[t0.name], factor=op.factor) if c and c[1] in SCALE_NAMES else (
                TensorOp("copy", src=[t0.name]))  # fmt: skip
        else:
            what = {"average": "--init average", "uniform": "--init random"}.get(op.kind, f"a {op.kind} op")
            raise ValueError(
                f"{where}: {what} on an FP8-quantized weight ({weights[0].name}) would need new FP8 values on a new "
                "grid; use --init copy or zero, or --dtype bf16|fp32 to dequantise while growing"
            )
        return OutTensor(name, t0.dtype, t0.shape, new)

    def carry(self, t: TensorEntry) -> list[OutTensor] | None:
        """A tensor outside the layers: None when it is not quantisation's business (the ordinary carry
        applies), else its output tensors: its bytes, or, when dequantising, the weight dequantised and
        its scales dropped."""
        c = companion(t.name)
        if t.dtype not in FP8_DTYPES and not (c and self.handles_name(t.name)):
            return None
        if not self.dequantize:
            return [OutTensor(t.name, t.dtype, t.shape, TensorOp("copy", src=[t.name]))]
        if c is not None:
            return []
        return [OutTensor(t.name, self.dequantize, t.shape, self._dequant_op(TensorOp("copy", src=[t.name]), [t]))]

    def handles_name(self, name: str) -> bool:
        c = companion(name)
        w = self.tensors.get(name[: -len(c[1])] + "weight") if c else None
        return w is not None and w.dtype in FP8_DTYPES

    def _dequant_op(self, op: TensorOp, weights: list[TensorEntry]) -> TensorOp:
        if op.kind in ("zeros", "uniform", "fill"):
            return op
        pairs = []
        block = None
        for w in weights:
            s = scale_of(self.tensors, w.name)
            block = scale_block(w, s, self.scheme)
            pairs += [w.name, s.name]
        factor = op.factor if op.kind in ("scale", "average") else 1.0
        assert not op.offset, op
        return TensorOp("dequant", src=pairs, factor=factor, block=list(block))

    # ---- config --------------------------------------------------------------------------------
    def rewrite_config(self, new: dict, origin: list[int], n_src: int, prefix: str) -> None:
        """The output's quantization_config (in `new`, the output config): dropped when dequantising,
        else with every layer-indexed module name following the layer map."""
        if self.dequantize:
            new.pop("quantization_config", None)
            return
        q = copy.deepcopy(self.scheme.config)
        key = self.scheme.not_converted_key
        if isinstance(q.get(key), list):
            q[key] = renumber_module_list(q[key], origin, n_src, prefix, key)
        new["quantization_config"] = q


def _layer_index_pattern(entry: str) -> bool:
    """A regex entry that refers to layer numbers (compressed-tensors 're:...layers.3...')."""
    return entry.startswith("re:") and bool(re.search(r"layers?\W*\\?\.?\W*\d|\[\d", entry))


def renumber_module_list(entries: list, origin: list[int], n_src: int, prefix: str, key: str) -> list:
    """Module names of source layers -> the same modules in every output layer made from them; names
    outside the layers are kept in place (first), layer names follow in output layer order."""
    head = re.compile(re.escape(prefix) + r"\.(0|[1-9][0-9]*)\.(.+)\Z")
    outside, by_layer = [], {}
    for e in entries:
        if not isinstance(e, str):
            raise ValueError(f"quantization_config {key} holds {e!r}, expected module names")
        m = head.match(e)
        if m is None:
            if _layer_index_pattern(e):
                raise ValueError(
                    f"quantization_config {key} entry {e!r} names layers by a pattern: tli cannot carry it through "
                    "a new layer order"
                )
            outside.append(e)
            continue
        i = int(m.group(1))
        if i >= n_src:
            raise ValueError(f"quantization_config {key} entry {e!r} names layer {i}, but the model has {n_src}")
        by_layer.setdefault(i, []).append(m.group(2))
    out = list(outside)
    for j, s in enumerate(origin):
        out += [f"{prefix}.{j}.{rest}" for rest in by_layer.get(s, [])]
    return out


def plain_keys(layer: dict) -> set[str]:
    """A layer's tensor names without quantisation companions: an FP8 checkpoint may leave some
    layers' modules unquantised (Llama-3.1-405B-FP8: the first and last layers' MLPs)."""
    return {s for s in layer if companion(s) is None}


def same_storage(a: str, b: str) -> bool:
    """Two layers' copies of one tensor may differ in dtype only where one of them is FP8-quantized."""
    return a == b or a in FP8_DTYPES or b in FP8_DTYPES
