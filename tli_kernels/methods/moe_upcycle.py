"""Sparse upcycling of a dense model into its MoE sibling: Llama/Mistral -> Mixtral, Qwen2 -> Qwen2-MoE,
Qwen3 -> Qwen3-MoE.

Every layer's MLP is copied into E experts and a router (E x hidden) is added, initialised small and
random. The targets renormalise the top-k routing weights to sum to 1 (Mixtral always; Qwen MoE with
`norm_topk_prob: true`, which the output config sets), so identical experts make the upcycled model
compute exactly the source function at init, whatever the router says. Qwen2-MoE also has a shared
expert behind a sigmoid gate: it starts as a copy of the MLP with its down projection zeroed (the
identity-injection idea applied to the shared expert), so it adds nothing until trained.
The checkpoint uses the per-expert tensor names transformers writes and reads.
"""

from __future__ import annotations

import copy
import math

from tli_kernels.architectures.registry import MLP_TENSORS, MOE_SIBLINGS
from tli_kernels.architectures.spec import Architecture
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.plan import OutTensor, TensorOp
from tli_kernels.checkpoint.quant import parse_scheme
from tli_kernels.methods.common import (
    CommonOptions,
    OutLayer,
    build_plan,
    check_int_option,
    derive_seed,
    init_std,
    out_dtype,
)


def _check_source(layout: CheckpointLayout, sibling: Architecture) -> None:
    target = sibling.moe
    template = layout.layer_tensors(0)
    path = layout.config_path
    extra = sorted(s for s in template if s.startswith("mlp.") and s not in MLP_TENSORS)
    if extra or any(s not in template for s in MLP_TENSORS):
        bad = extra[0] if extra else next(s for s in MLP_TENSORS if s not in template)
        raise CheckpointError(f"{sibling.name} experts are gate/up/down projections; no slot for {bad}", path)
    biases = {s.split(".")[1] for s in template if s.startswith("self_attn.") and s.endswith(".bias")}
    allowed = {"none": set(), "qkv": {"q_proj", "k_proj", "v_proj"}, "config": biases}[target.attention_bias]
    if target.attention_bias == "qkv" and biases != allowed:
        raise CheckpointError(
            f"{sibling.name} has q/k/v biases and no o_proj bias; this model's attention biases are "
            f"{sorted(biases) or 'none'}",
            path,
        )
    if not biases <= allowed:
        raise CheckpointError(f"{sibling.name} attention has no bias but layer 0 has {sorted(biases)[0]} bias", path)


def plan(layout: CheckpointLayout, common: CommonOptions, *, experts: int = 8, top_k: int = 2):
    layout.check_decoder()
    if parse_scheme(layout.config, layout.config_path) is not None:  # checkpoint/quant.py
        raise CheckpointError("--method moe-upcycle does not take FP8-quantized sources yet", layout.config_path)
    check_int_option("experts", experts, 1, 1024)
    check_int_option("top-k", top_k, 1, experts, f" (cannot route to more than --experts {experts})")
    sibling = MOE_SIBLINGS.get(layout.model_type)
    if sibling is None:
        pairs = ", ".join(f"{a} -> {b.name}" for a, b in MOE_SIBLINGS.items())
        raise CheckpointError(
            f"moe-upcycle turns a dense model into its MoE sibling ({pairs}); "
            f"model_type {layout.model_type!r} has none in transformers",
            layout.config_path,
        )
    target = sibling.moe
    _check_source(layout, sibling)

    hidden = layout.layer_tensors(0)["mlp.gate_proj.weight"].shape[1]  # the router is experts x hidden
    intermediate = layout.layer_tensors(0)["mlp.gate_proj.weight"].shape[0]
    bound = init_std(layout) * math.sqrt(3.0)  # the routers start at random
    prefix_of = layout.layer_prefix

    def expand(j: int, layer: OutLayer, common: CommonOptions) -> list[OutTensor]:
        src = layout.layer_tensors(layer.sources[0])
        prefix = f"{prefix_of}.{j}."
        out: list[OutTensor] = []

        def carry(name: str, t, op: TensorOp | None = None) -> None:
            out.append(OutTensor(prefix + name, out_dtype(t.dtype, common), t.shape, op or TensorOp("copy", [t.name])))

        def random(name: str, shape: tuple[int, ...]) -> None:
            full = prefix + name
            op = TensorOp("uniform", seed=derive_seed(common.seed, full), bound=bound)
            out.append(OutTensor(full, out_dtype(src["mlp.gate_proj.weight"].dtype, common), shape, op))

        for suffix, t in src.items():
            if suffix not in MLP_TENSORS:
                carry(suffix, t)
        random(target.router, (experts, hidden))
        for e in range(experts):
            for suffix, short in target.names.items():
                carry(target.expert.format(e=e, w=short), src[suffix])
        if target.shared_expert:
            for suffix in MLP_TENSORS:
                zero = suffix == "mlp.down_proj.weight"
                carry(suffix.replace("mlp.", "mlp.shared_expert."), src[suffix], TensorOp("zeros") if zero else None)
            random("mlp.shared_expert_gate.weight", (1, hidden))
        return out

    layers = [OutLayer("original", [i]) for i in range(layout.num_layers)]
    update = {
        "model_type": sibling.name,
        "architectures": [target.architecture],
        "num_experts_per_tok": top_k,
        "output_router_logits": False,
        **copy.deepcopy(target.config),
    }
    if sibling.name == "mixtral":
        update["num_local_experts"] = experts
        update["sliding_window"] = layout.config.get("sliding_window")
    else:
        update["num_experts"] = experts
        update["moe_intermediate_size"] = intermediate
    if target.shared_expert:
        update["shared_expert_intermediate_size"] = intermediate
        update["qkv_bias"] = True
    p = build_plan(
        layout,
        layers,
        method="moe-upcycle",
        options={"experts": experts, "top_k": top_k},
        common=common,
        config_update=update,
        expand_layer=expand,
    )
    for key in ("mlp_bias", "pretraining_tp"):
        p.config.pop(key, None)
    return p
