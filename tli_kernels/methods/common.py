"""Shared machinery of the upscaling methods: a layer map in, a SurgeryPlan out.

A method decides, for every output decoder layer, where its weights come from (an `OutLayer`);
this module turns that into one op per output tensor, rewrites config.json and packs shards.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field

from tli_kernels.architectures import Architecture
from tli_kernels.architectures.layer_kinds import layout_config
from tli_kernels.architectures.structure import renumber_trailing, trailing_layers
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.plan import OutTensor, SurgeryPlan, TensorOp, pack_shards, validate_plan
from tli_kernels.checkpoint.quant import QuantPlanner
from tli_kernels.checkpoint.safetensors_format import ARITHMETIC_DTYPES, TensorEntry

INITS = ("copy", "average", "zero", "random")
DTYPE_OPTIONS = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
DTYPE_CONFIG_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
# Config entries that hold one value per decoder layer, remapped with the layers.
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")


@dataclass
class CommonOptions:
    """Options every method shares (the executor-independent part of `tli upscale`)."""

    shard_size: int = 5_000_000_000
    dtype: str = "keep"
    seed: int = 0

    def __post_init__(self):
        if self.dtype not in DTYPE_OPTIONS:
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPE_OPTIONS)}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size {self.shard_size}: must be positive")


@dataclass
class OutLayer:
    """One output decoder layer. role: original | duplicate | injected."""

    role: str
    sources: list[int]
    init: str = "copy"
    alpha: float = 1.0
    extra: dict = field(default_factory=dict)

    def provenance(self, index: int) -> dict:
        entry = {"index": index, "role": self.role, "source": list(self.sources)}
        if self.role == "injected":
            entry["init"], entry["alpha"] = self.init, self.alpha
        return entry


def check_int_option(name: str, value, low: int, high: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"--{name} {value!r}: must be an integer")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"--{name} {value}: must be {bound}{why}")
    return value


def check_alpha(alpha) -> float:
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"--alpha {alpha}: must be a finite number")
    return alpha


def derive_seed(seed: int, name: str) -> int:
    """A per-tensor 63-bit seed, stable across runs, machines and executors."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def out_dtype(src_dtype: str, common: CommonOptions) -> str:
    target = DTYPE_OPTIONS[common.dtype]
    return target if target and src_dtype in ARITHMETIC_DTYPES else src_dtype


def init_std(layout: CheckpointLayout) -> float:
    """The config's initializer_range, checked (it sets the spread of `--init random`)."""
    value = layout.config.get("initializer_range", 0.02)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(
            f"initializer_range is {value!r}: --init random needs a positive number", layout.config_path
        )
    return float(value)


def layer_op(
    suffix: str,
    layer: OutLayer,
    entries: list[TensorEntry],
    name: str,
    common: CommonOptions,
    arch: Architecture,
    std: float | None,
) -> TensorOp:
    """The op that makes tensor `suffix` of an output layer (entries: that tensor in each source layer).

    alpha scales a branch through its output tensors, or, where a norm follows the branch, through that
    norm's weight (stored as scale - norm_offset, hence the offset)."""
    branch = arch.branch_of(suffix)
    target = arch.alpha_target(suffix)
    factor = layer.alpha if target is not None else 1.0
    offset = arch.norm_offset if target is not None and target[1] == "norm" and factor != 1.0 else 0.0
    if layer.init == "zero" and branch is not None:
        return TensorOp("zeros")
    if layer.init == "random":
        assert std is not None
        if suffix.endswith("bias"):
            return TensorOp("zeros")
        if len(entries[0].shape) < 2:  # norm weights: the norm's identity (alpha on a post norm)
            return TensorOp("fill", value=(1.0 * factor) - arch.norm_offset)
        return TensorOp("uniform", seed=derive_seed(common.seed, name), bound=std * math.sqrt(3.0) * factor)
    srcs = [e.name for e in entries]
    if len(srcs) > 1:
        return TensorOp("average", src=srcs, factor=factor, offset=offset)
    if factor != 1.0:
        return TensorOp("scale", src=srcs, factor=factor, offset=offset)
    return TensorOp("copy", src=srcs)


def source_layers(layout: CheckpointLayout, layer: OutLayer, j: int) -> list[dict[str, TensorEntry]]:
    """The source layers an output layer is made from, checked to be alike (average of an MoE and a
    dense layer, say, is refused). A random layer takes the structure of the layer it follows."""
    if not layer.sources:
        return [layout.layer_tensors(layer.extra.get("after", 0))]
    layers = [layout.layer_tensors(s) for s in layer.sources]
    first = layers[0]
    for s, other in zip(layer.sources[1:], layers[1:]):
        if other.keys() != first.keys() or any(other[k].shape != first[k].shape for k in first):
            raise ValueError(
                f"output layer {j} would average source layers {layer.sources[0]} and {s}, whose tensors differ "
                f"(e.g. a dense and an MoE layer): use --init copy or zero"
            )
    return layers


def build_plan(
    layout: CheckpointLayout,
    layers: list[OutLayer],
    *,
    method: str,
    options: dict,
    common: CommonOptions,
    config_update: dict | None = None,
    expand_layer=None,
    carry=None,
) -> SurgeryPlan:
    """Turn a layer map into a plan. `expand_layer(j, layer, common)` may replace the per-layer tensors,
    `carry(t, common)` the output tensor made from a tensor outside the layers (a recipe's embeddings and
    head may come from different models, scaled)."""
    layout.check_decoder()
    arch, prefix = layout.architecture, layout.layer_prefix
    std = init_std(layout) if any(layer.init == "random" for layer in layers) else None
    quant = QuantPlanner.for_layout(layout, DTYPE_OPTIONS[common.dtype])  # None unless FP8 (quant.py)
    if quant is not None and (expand_layer is not None or carry is not None):
        what = "a recipe" if carry is not None else f"--method {method}"
        raise CheckpointError(
            f"{what} does not take FP8-quantized sources yet (tli, dus, block-expansion, stack and passthrough do)",
            layout.config_path,
        )
    before, after = [], []
    trailing = trailing_layers(layout.config)
    for t in layout.non_layer_tensors():
        outs = quant.carry(t) if quant is not None else None
        for out in [(carry or _carry)(t, common)] if outs is None else outs:
            out.name = renumber_trailing(out.name, prefix, layout.num_layers, len(layers), trailing)
            (before if arch.is_embedding(out.name) else after).append(out)

    middle: list[OutTensor] = []
    for j, layer in enumerate(layers):
        if expand_layer is not None:
            middle.extend(expand_layer(j, layer, common))
            continue
        src_layers = source_layers(layout, layer, j)
        for suffix, t0 in src_layers[0].items():
            name = f"{prefix}.{j}.{suffix}"
            entries = [sl[suffix] for sl in src_layers]
            if quant is not None and quant.handles(suffix, src_layers[0]):
                # An FP8 weight or its scale: the op the rule gives the weight, mapped onto them (alpha
                # into the scale tensor).
                def weight_op(w, layer=layer, j=j, src_layers=src_layers):
                    return layer_op(w, layer, [sl[w] for sl in src_layers], f"{prefix}.{j}.{w}", common, arch, std)

                out = quant.layer_tensor(suffix, src_layers, name, weight_op, f"output layer {j}")
                middle.extend([out] if out is not None else [])
                continue
            op = layer_op(suffix, layer, entries, name, common, arch, std)
            middle.append(OutTensor(name, out_dtype(t0.dtype, common), t0.shape, op))

    tensors = before + middle + after
    plan = SurgeryPlan(
        method=method,
        options={**options, "dtype": common.dtype, "shard_size": common.shard_size, "seed": common.seed},
        source=layout.identity(),
        config=rewrite_config(layout, layers, common, config_update, quant),
        layers=[layer.provenance(j) for j, layer in enumerate(layers)],
        shards=pack_shards(tensors, common.shard_size),
        side_files=list(layout.side_files),
    )
    validate_plan(plan, layout.tensors)
    return plan


def _carry(t: TensorEntry, common: CommonOptions) -> OutTensor:
    return OutTensor(t.name, out_dtype(t.dtype, common), t.shape, TensorOp("copy", src=[t.name]))


def rewrite_config(
    layout: CheckpointLayout,
    layers: list[OutLayer],
    common: CommonOptions,
    update: dict | None,
    quant: QuantPlanner | None = None,
) -> dict:
    """config.json for the output: layer count and every per-layer entry follow the layer map."""
    config = layout.config
    n_src = layout.num_layers
    new = copy.deepcopy(config)
    for key in layout.architecture.count_keys:
        if key in new:
            new[key] = len(layers)
    # Each output layer inherits per-layer settings from its (first) source layer; a random layer
    # takes those of the layer it was injected after.
    origin = [layer.sources[0] if layer.sources else layer.extra.get("after", 0) for layer in layers]
    for key in dict.fromkeys(PER_LAYER_CONFIG_KEYS + layout.architecture.per_layer_keys):
        value = per_layer_values(layout, key)
        if value is not None:
            new[key] = [value[s] for s in origin]
    if layout.architecture.proven_by == "instance check":
        _refuse_unknown_layer_entries(layout, origin)
    mwl = config.get("max_window_layers")
    if isinstance(mwl, int) and not isinstance(mwl, bool):
        prefix = 0
        while prefix < len(origin) and origin[prefix] < mwl:
            prefix += 1
        new["max_window_layers"] = prefix
    moe_layout = layout.architecture.moe_layout
    if moe_layout == "mlp_only_layers":
        structure = layout._structure()
        new["mlp_only_layers"] = [j for j, s in enumerate(origin) if not structure.is_moe_layer(s)]
        new["decoder_sparse_step"] = 1
    elif moe_layout is not None:
        try:
            new.update(layout_config(moe_layout, layout.model_type, origin, layout._structure().is_moe_layer))
        except ValueError as e:
            raise CheckpointError(str(e), layout.config_path) from None
    target = DTYPE_OPTIONS[common.dtype]
    if target:
        for key in ("torch_dtype", "dtype"):
            if key in new or key == "dtype":
                new[key] = DTYPE_CONFIG_NAMES[target]
    if quant is not None:
        quant.rewrite_config(new, origin, n_src, layout.layer_prefix)
    if update:
        new.update(update)
    assert n_src == layout.num_layers
    return new


def _refuse_unknown_layer_entries(layout: CheckpointLayout, origin: list[int]) -> None:
    """A generic architecture's config may hold per-layer entries tli cannot interpret (one value per
    layer, or a list of layer indices); carrying them unchanged could change what a moved layer does.
    Refuse unless the layer map leaves every layer where it was."""
    if origin == list(range(layout.num_layers)):
        return
    n = layout.num_layers
    known = set(PER_LAYER_CONFIG_KEYS)
    for key, value in layout.config.items():
        if key in known or not isinstance(value, list) or not value:
            continue
        per_layer = len(value) == n
        indices = key.endswith(("_layers", "_idxs", "_indices")) and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n for v in value
        )
        if per_layer or indices:
            raise CheckpointError(
                f"{key} looks like a per-layer setting of {layout.model_type!r}, which tli has no entry for: "
                f"it cannot carry it through a new layer order",
                layout.config_path,
            )


def per_layer_values(layout: CheckpointLayout, key: str) -> list | None:
    """The source's per-layer list `key`: from config.json, or, for an entry the architecture declares
    per-layer but the file leaves to a default (an older Gemma3 config with only a sliding-window
    pattern, say), as transformers' config class computes it."""
    n = layout.num_layers
    value = layout.config.get(key)
    if isinstance(value, list):
        if len(value) != n:
            raise CheckpointError(f"{key} has {len(value)} entries for {n} layers", layout.config_path)
        return value
    if value is not None or key not in layout.architecture.per_layer_keys:
        return None
    computed = _config_class_value(layout, key)
    return computed if isinstance(computed, list) and len(computed) == n else None


def _config_class_value(layout: CheckpointLayout, key: str):
    try:
        from transformers import AutoConfig

        config = AutoConfig.for_model(**{k: v for k, v in layout.config.items() if k != "transformers_version"})
    except Exception:  # noqa: BLE001 - a config transformers cannot build has no computed default to use
        return None
    return getattr(config, key, None)
