"""Shared machinery of the upscaling methods: a layer map in, a SurgeryPlan out.

A method decides, for every output decoder layer, where its weights come from (an `OutLayer`);
this module turns that into one op per output tensor, rewrites config.json and packs shards.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field

from tli_kernels.checkpoint.layout import BRANCH_OUTPUT_TENSORS, LAYER_PATTERN, CheckpointLayout
from tli_kernels.checkpoint.plan import OutTensor, SurgeryPlan, TensorOp, pack_shards, validate_plan
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


def layer_op(
    suffix: str, layer: OutLayer, entries: list[TensorEntry], name: str, common: CommonOptions, init_std: float
) -> TensorOp:
    """The op that makes tensor `suffix` of an output layer (entries: that tensor in each source layer)."""
    branch = suffix in BRANCH_OUTPUT_TENSORS
    factor = layer.alpha if branch else 1.0
    if layer.init == "zero" and branch:
        return TensorOp("zeros")
    if layer.init == "random":
        if suffix.endswith("bias"):
            return TensorOp("zeros")
        if len(entries[0].shape) < 2:  # norm weights: RMSNorm's identity
            return TensorOp("fill", value=1.0)
        return TensorOp("uniform", seed=derive_seed(common.seed, name), bound=init_std * math.sqrt(3.0) * factor)
    srcs = [e.name for e in entries]
    if len(srcs) > 1:
        return TensorOp("average", src=srcs, factor=factor)
    if factor != 1.0:
        return TensorOp("scale", src=srcs, factor=factor)
    return TensorOp("copy", src=srcs)


def build_plan(
    layout: CheckpointLayout,
    layers: list[OutLayer],
    *,
    method: str,
    options: dict,
    common: CommonOptions,
    config_update: dict | None = None,
    expand_layer=None,
) -> SurgeryPlan:
    """Turn a layer map into a plan. `expand_layer(j, layer, common)` may replace the per-layer tensors."""
    layout.check_decoder()
    init_std = float(layout.config.get("initializer_range", 0.02))
    before, after = [], []
    for t in layout.non_layer_tensors():
        (before if t.name.startswith("model.embed") else after).append(_carry(t, common))

    template = layout.layer_tensors(0)
    middle: list[OutTensor] = []
    for j, layer in enumerate(layers):
        if expand_layer is not None:
            middle.extend(expand_layer(j, layer, common))
            continue
        src_layers = [layout.layer_tensors(s) for s in layer.sources] or [template]
        for suffix, t0 in template.items():
            name = f"model.layers.{j}.{suffix}"
            entries = [sl[suffix] for sl in src_layers]
            op = layer_op(suffix, layer, entries, name, common, init_std)
            middle.append(OutTensor(name, out_dtype(t0.dtype, common), t0.shape, op))

    tensors = before + middle + after
    plan = SurgeryPlan(
        method=method,
        options={**options, "dtype": common.dtype, "shard_size": common.shard_size, "seed": common.seed},
        source=layout.identity(),
        config=rewrite_config(layout.config, layers, common, config_update),
        layers=[layer.provenance(j) for j, layer in enumerate(layers)],
        shards=pack_shards(tensors, common.shard_size),
        side_files=list(layout.side_files),
    )
    validate_plan(plan, layout.tensors)
    return plan


def _carry(t: TensorEntry, common: CommonOptions) -> OutTensor:
    return OutTensor(t.name, out_dtype(t.dtype, common), t.shape, TensorOp("copy", src=[t.name]))


def rewrite_config(config: dict, layers: list[OutLayer], common: CommonOptions, update: dict | None) -> dict:
    """config.json for the output: layer count and every per-layer entry follow the layer map."""
    n_src = config["num_hidden_layers"]
    new = copy.deepcopy(config)
    new["num_hidden_layers"] = len(layers)
    # Each output layer inherits per-layer settings from its (first) source layer; a random layer
    # takes those of the layer it was injected after.
    origin = [layer.sources[0] if layer.sources else layer.extra.get("after", 0) for layer in layers]
    for key in PER_LAYER_CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, list) and len(value) == n_src:
            new[key] = [value[s] for s in origin]
    mwl = config.get("max_window_layers")
    if isinstance(mwl, int):
        prefix = 0
        while prefix < len(origin) and origin[prefix] < mwl:
            prefix += 1
        new["max_window_layers"] = prefix
    target = DTYPE_OPTIONS[common.dtype]
    if target:
        for key in ("torch_dtype", "dtype"):
            if key in new or key == "dtype":
                new[key] = DTYPE_CONFIG_NAMES[target]
    if update:
        new.update(update)
    return new


def layer_index(name: str) -> int | None:
    m = LAYER_PATTERN.match(name)
    return int(m.group(1)) if m else None
