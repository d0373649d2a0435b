"""Sparse upcycling to a Mixtral-format mixture of experts.

Every layer's MLP is copied into E experts (w1 = gate_proj, w3 = up_proj, w2 = down_proj) and a
router `block_sparse_moe.gate` (E x hidden) is added, initialised small and random. Mixtral
renormalises the top-k routing weights to sum to 1, so identical experts make the upcycled model
compute exactly the source function at init, whatever the router says. The checkpoint uses the
original Mixtral tensor names, which every transformers version loads as MixtralForCausalLM.
"""

from __future__ import annotations

import math

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.plan import OutTensor, TensorOp
from tli_kernels.methods.common import (
    CommonOptions,
    OutLayer,
    build_plan,
    check_int_option,
    derive_seed,
    out_dtype,
)

EXPERT_NAMES = {"mlp.gate_proj.weight": "w1", "mlp.down_proj.weight": "w2", "mlp.up_proj.weight": "w3"}
UPCYCLABLE = ("llama", "mistral")


def plan(layout: CheckpointLayout, common: CommonOptions, *, experts: int = 8, top_k: int = 2):
    layout.check_decoder()
    check_int_option("experts", experts, 1, 1024)
    check_int_option("top-k", top_k, 1, experts, f" (cannot route to more than --experts {experts})")
    if layout.model_type not in UPCYCLABLE:
        raise CheckpointError(
            f"moe-upcycle writes Mixtral checkpoints, whose blocks match {', '.join(UPCYCLABLE)} only "
            f"(model_type {layout.model_type!r} differs: biases or q/k norms)",
            layout.config_path,
        )
    template = layout.layer_tensors(0)
    extra = sorted(s for s in template if s.startswith("mlp.") and s not in EXPERT_NAMES)
    if extra or layout.config.get("attention_bias") or "self_attn.q_proj.bias" in template:
        bad = extra[0] if extra else "self_attn.q_proj.bias"
        raise CheckpointError(f"Mixtral has no slot for {bad}", layout.config_path)

    hidden = layout.config["hidden_size"]
    bound = float(layout.config.get("initializer_range", 0.02)) * math.sqrt(3.0)

    def expand(j: int, layer: OutLayer, common: CommonOptions) -> list[OutTensor]:
        src = layout.layer_tensors(layer.sources[0])
        out: list[OutTensor] = []
        prefix = f"model.layers.{j}."
        for suffix, t in src.items():
            if suffix in EXPERT_NAMES:
                continue
            out.append(OutTensor(prefix + suffix, out_dtype(t.dtype, common), t.shape, TensorOp("copy", [t.name])))
        dtype = out_dtype(src["mlp.gate_proj.weight"].dtype, common)
        gate = prefix + "block_sparse_moe.gate.weight"
        out.append(
            OutTensor(
                gate, dtype, (experts, hidden), TensorOp("uniform", seed=derive_seed(common.seed, gate), bound=bound)
            )
        )
        for e in range(experts):
            for suffix, short in EXPERT_NAMES.items():
                t = src[suffix]
                name = f"{prefix}block_sparse_moe.experts.{e}.{short}.weight"
                out.append(OutTensor(name, out_dtype(t.dtype, common), t.shape, TensorOp("copy", [t.name])))
        return out

    layers = [OutLayer("original", [i]) for i in range(layout.num_layers)]
    update = {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0,
        "sliding_window": layout.config.get("sliding_window"),
    }
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
