"""The decoder families tli knows, one short entry each (see spec.py for what the fields mean).

Every entry here is proven by tests/architectures on a tiny random instance built by transformers:
zero-init gives the block's input back exactly, alpha scales each branch as defined, and every
method's output loads with no missing or unexpected keys and matches an in-memory reference.
Adding a family is adding an entry and a line in the tests' model table.
"""

from __future__ import annotations

import re

from tli_kernels.architectures.spec import SHAPE_KEYS, Architecture, Branch, MoeNames

# The Llama block and its many relatives: pre-norm, o_proj and down_proj end the two branches.
LLAMA_ATTN = Branch(("self_attn.o_proj.weight", "self_attn.o_proj.bias"))
LLAMA_MLP = Branch(("mlp.down_proj.weight", "mlp.down_proj.bias"))
LAYER_TYPES = ("layer_types",)

# Expert output projections in both on-disk layouts transformers reads: per-expert tensors (what it
# writes) and the fused 3-D `experts.down_proj` [experts, hidden, intermediate] of its modules.
QWEN_MOE_MLP = Branch(
    (
        "mlp.experts.*.down_proj.weight",
        "mlp.experts.down_proj",
        "mlp.shared_expert.down_proj.weight",
        "mlp.down_proj.weight",  # dense layers (mlp_only_layers)
        "mlp.down_proj.bias",
    )
)

# DeepSeek-style MoE blocks (GLM-4-MoE, DeepSeek-V2/V3): routed experts (per-expert in files, fused
# 3-D in memory), shared experts summed in, and dense MLPs in the first `first_k_dense_replace` layers.
# The router's weight and score-correction bias only choose experts; alpha goes into every down_proj.
DEEPSEEK_MOE_MLP = Branch(
    (
        "mlp.experts.down_proj",
        "mlp.experts.*.down_proj.weight",
        "mlp.shared_experts.down_proj.weight",
        "mlp.down_proj.weight",  # dense layers
    )
)
DEEPSEEK_MOE_KEYS = SHAPE_KEYS + (
    "n_routed_experts", "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob",
    "first_k_dense_replace",
)  # fmt: skip

MLA_KEYS = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

# Dense MLP tensors, which moe-upcycle copies into every expert.
MLP_TENSORS = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
QWEN_MOE_CONFIG = {
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001
}  # fmt: skip
QWEN_EXPERTS = dict(
    router="mlp.gate.weight", expert="mlp.experts.{e}.{w}.weight", names={s: s.split(".")[1] for s in MLP_TENSORS}
)

ENTRIES: tuple[Architecture, ...] = (
    Architecture(
        "llama",
        ("llama",),
        LLAMA_ATTN,
        LLAMA_MLP,
        moe_sibling="mixtral",
        kernels={"llama": "Llama 2/3.x, SmolLM/SmolLM2"},
    ),
    Architecture(
        "mistral",
        ("mistral",),
        LLAMA_ATTN,
        LLAMA_MLP,
        per_layer_keys=LAYER_TYPES,
        moe_sibling="mixtral",
        kernels={"mistral": "sliding window"},
    ),
    Architecture(
        "qwen2",
        ("qwen2",),
        LLAMA_ATTN,
        LLAMA_MLP,
        per_layer_keys=LAYER_TYPES,
        moe_sibling="qwen2_moe",
        kernels={"qwen2": "q/k/v biases, sliding window"},
    ),
    Architecture(
        "qwen3",
        ("qwen3",),
        LLAMA_ATTN,
        LLAMA_MLP,
        per_layer_keys=LAYER_TYPES,
        moe_sibling="qwen3_moe",
        kernels={"qwen3": "per-head q/k norms"},
    ),
    Architecture(
        "smollm3",
        ("smollm3",),
        LLAMA_ATTN,
        LLAMA_MLP,
        per_layer_keys=("layer_types", "no_rope_layers"),
        kernels={"smollm3": "NoPE layers (no RoPE on every few layers)"},
    ),
    Architecture(
        "granite",
        ("granite",),
        LLAMA_ATTN,
        LLAMA_MLP,
        notes="residual_multiplier scales both branches",
        kernels={
            "granite": "residual and attention multipliers (embedding multiplier and logit scaling stay in the "
            "stock model)"
        },
    ),
    Architecture(
        "phi3",
        ("phi3",),
        LLAMA_ATTN,
        LLAMA_MLP,
        notes="fused qkv_proj and gate_up_proj",
        kernels={"phi3": "fused qkv_proj and gate_up_proj, residual dropout"},
    ),
    Architecture("stablelm", ("stablelm",), LLAMA_ATTN, LLAMA_MLP, parallel="config", notes="LayerNorm"),
    Architecture("cohere", ("cohere",), LLAMA_ATTN, LLAMA_MLP, parallel="parallel", notes="one LayerNorm, parallel"),
    # Gemma: RMSNorm computes x * (1 + w).
    Architecture(
        "gemma",
        ("gemma",),
        LLAMA_ATTN,
        LLAMA_MLP,
        norm_offset=1.0,
        kernels={"gemma": "(1 + w) norms in float32, GeGLU (tanh GELU)"},
    ),
    # Gemma2/3: sandwich norms; the post norms follow the branches, so alpha goes into them.
    Architecture(
        "gemma2",
        ("gemma2", "gemma3_text"),
        Branch(LLAMA_ATTN.outputs, post_norm="post_attention_layernorm.weight"),
        Branch(LLAMA_MLP.outputs, post_norm="post_feedforward_layernorm.weight"),
        norm_offset=1.0,
        per_layer_keys=LAYER_TYPES,
        kernels={
            "gemma2": "sandwich norms; soft-capped attention stays stock on sdpa/eager",
            "gemma3_text": "sandwich norms, per-head (1 + w) q/k norms, local/global RoPE",
        },
    ),
    # OLMo2: no pre norms, a norm on each branch output.
    Architecture(
        "olmo2",
        ("olmo2",),
        Branch(LLAMA_ATTN.outputs, post_norm="post_attention_layernorm.weight"),
        Branch(LLAMA_MLP.outputs, post_norm="post_feedforward_layernorm.weight"),
        kernels={"olmo2": "post norms only, q/k norms over the whole projection"},
    ),
    # GLM-4: pre norms and a norm on each branch output (post_self_attn_layernorm, post_mlp_layernorm).
    Architecture(
        "glm4",
        ("glm4",),
        Branch(LLAMA_ATTN.outputs, post_norm="post_self_attn_layernorm.weight"),
        Branch(LLAMA_MLP.outputs, post_norm="post_mlp_layernorm.weight"),
        notes="fused gate_up_proj; a post norm on each branch",
    ),
    Architecture(
        "starcoder2",
        ("starcoder2",),
        LLAMA_ATTN,
        Branch(("mlp.c_proj.weight", "mlp.c_proj.bias")),
    ),
    Architecture(
        "gpt_neox",
        ("gpt_neox",),
        Branch(("attention.dense.weight", "attention.dense.bias")),
        Branch(("mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")),
        layer_prefixes=("gpt_neox.layers",),
        parallel="config",
    ),
    # GPT-2: Conv1D weights are [in, out]; scaling and zeroing are element-wise, so that does not matter.
    # Checkpoints saved from GPT2Model (the original hub files) have no `transformer.` prefix.
    Architecture(
        "gpt2",
        ("gpt2",),
        Branch(("attn.c_proj.weight", "attn.c_proj.bias")),
        Branch(("mlp.c_proj.weight", "mlp.c_proj.bias")),
        layer_prefixes=("transformer.h", "h"),
        count_keys=("n_layer", "num_hidden_layers"),
        refuse_if=(
            (
                "scale_attn_by_inverse_layer_idx",
                True,
                "attention is scaled by 1/(layer index + 1), so a moved layer would compute something else",
            ),
        ),
    ),
    Architecture(
        "falcon",
        ("falcon",),
        Branch(("self_attention.dense.weight", "self_attention.dense.bias")),
        Branch(("mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")),
        layer_prefixes=("transformer.h",),
        count_keys=("num_hidden_layers", "n_layer"),
        parallel="config",
    ),
    Architecture(
        "mixtral",
        ("mixtral",),
        LLAMA_ATTN,
        Branch(("mlp.experts.down_proj", "block_sparse_moe.experts.*.w2.weight")),  # in memory, then on disk
        per_layer_keys=LAYER_TYPES,
        moe=MoeNames(
            "MixtralForCausalLM",
            router="block_sparse_moe.gate.weight",
            expert="block_sparse_moe.experts.{e}.{w}.weight",
            names={"mlp.gate_proj.weight": "w1", "mlp.down_proj.weight": "w2", "mlp.up_proj.weight": "w3"},
            config={"router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0},
        ),
        kernels={"mixtral": "attention and norms; the MoE block stays stock"},
    ),
    # Granite-MoE: experts stored fused ([E, hidden, I] block_sparse_moe.output_linear, read into
    # block_sparse_moe.experts.down_proj); residual_multiplier scales both branches, as in Granite.
    Architecture(
        "granitemoe",
        ("granitemoe",),
        LLAMA_ATTN,
        Branch(("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight")),
        file_renames=(
            ("block_sparse_moe.input_linear.weight", "block_sparse_moe.experts.gate_up_proj"),
            ("block_sparse_moe.output_linear.weight", "block_sparse_moe.experts.down_proj"),
            ("block_sparse_moe.router.layer.weight", "block_sparse_moe.router.weight"),
        ),
        notes="fused experts (input_linear, output_linear); residual_multiplier",
    ),
    Architecture(
        "glm4_moe",
        ("glm4_moe",),
        LLAMA_ATTN,
        DEEPSEEK_MOE_MLP,
        moe_layout="first_k_dense_replace",
        must_match=DEEPSEEK_MOE_KEYS,
        notes="dense first layers (first_k_dense_replace), shared experts, router score-correction bias",
    ),
    # DeepSeek-V2/V3: multi-head latent attention (low-rank q/kv with their own norms; o_proj ends the
    # branch) and the DeepSeek MoE block. V3's router adds a score-correction bias.
    Architecture(
        "deepseek_v3",
        ("deepseek_v3",),
        LLAMA_ATTN,
        DEEPSEEK_MOE_MLP,
        moe_layout="first_k_dense_replace",
        must_match=DEEPSEEK_MOE_KEYS + MLA_KEYS,
        notes="MLA, shared experts, dense first layers (first_k_dense_replace), router score-correction bias",
    ),
    Architecture(
        "deepseek_v2",
        ("deepseek_v2",),
        LLAMA_ATTN,
        DEEPSEEK_MOE_MLP,
        moe_layout="first_k_dense_replace",
        must_match=DEEPSEEK_MOE_KEYS + MLA_KEYS,
        notes="MLA (q_lora_rank or a plain q_proj), shared experts, dense first layers (first_k_dense_replace)",
    ),
    # gpt-oss: attention sinks (a learned logit per head; they only renormalise attention, o_proj and its
    # bias still end the branch), fused experts with biases ([E, I, hidden] down_proj and [E, hidden]
    # down_proj_bias, both scaled), sliding/full layer_types.
    Architecture(
        "gpt_oss",
        ("gpt_oss",),
        LLAMA_ATTN,
        Branch(("mlp.experts.down_proj", "mlp.experts.down_proj_bias")),
        per_layer_keys=LAYER_TYPES,
        notes="attention sinks, fused experts with biases, sliding/full layer_types",
    ),
    # ERNIE-4.5-MoE: MoE layers by a range and interval (moe_layer_start_index/end_index/interval), shared
    # experts, a score-correction bias beside the router.
    Architecture(
        "ernie4_5_moe",
        ("ernie4_5_moe",),
        LLAMA_ATTN,
        Branch(DEEPSEEK_MOE_MLP.outputs + ("mlp.down_proj.bias", "mlp.shared_experts.down_proj.bias")),
        moe_layout="moe_layer_range",
        file_renames=(("mlp.moe_statics.e_score_correction_bias", "mlp.gate.moe_statics.e_score_correction_bias"),),
        must_match=SHAPE_KEYS + ("moe_num_experts", "moe_k", "moe_num_shared_experts", "use_bias"),
        notes="MoE layers by start/end/interval, shared experts, router score-correction bias",
    ),
    Architecture(
        "qwen3_moe",
        ("qwen3_moe",),
        LLAMA_ATTN,
        QWEN_MOE_MLP,
        moe_layout="mlp_only_layers",
        moe=MoeNames("Qwen3MoeForCausalLM", **QWEN_EXPERTS, config=QWEN_MOE_CONFIG, attention_bias="config"),
        kernels={"qwen3_moe": "attention (q/k norms) and norms; MoE blocks stay stock, dense MLPs patched"},
    ),
    Architecture(
        "qwen2_moe",
        ("qwen2_moe",),
        LLAMA_ATTN,
        QWEN_MOE_MLP,
        per_layer_keys=LAYER_TYPES,
        moe_layout="mlp_only_layers",
        moe=MoeNames(
            "Qwen2MoeForCausalLM", **QWEN_EXPERTS, config=QWEN_MOE_CONFIG, shared_expert=True, attention_bias="qkv"
        ),
        kernels={"qwen2_moe": "attention and norms; MoE blocks (shared expert included) stay stock"},
    ),
)

BY_MODEL_TYPE: dict[str, Architecture] = {t: a for a in ENTRIES for t in a.model_types}

# Derived tables: each fact above, looked up the way its user needs it.
# tli's kernels (integrations.hf): model_type -> what is particular about it.
KERNEL_FAMILIES: dict[str, str] = {t: note for a in ENTRIES for t, note in a.kernels.items()}
# moe-upcycle: dense model_type -> its MoE sibling's entry.
MOE_SIBLINGS: dict[str, Architecture] = {
    t: BY_MODEL_TYPE[a.moe_sibling] for a in ENTRIES if a.moe_sibling for t in a.model_types
}
_MOE = [a.moe for a in ENTRIES if a.moe is not None]
# The training loader: per-expert tensors in files -> transformers' stacked expert parameters (prefix,
# expert index, projection name), the projection name -> gate/up/down, and routers stored elsewhere than
# `mlp.gate.weight`.
EXPERT_FILE_TENSOR = re.compile(
    r"^(.*)\.(?:"
    + "|".join(sorted({re.escape(m.experts_module) for m in _MOE}))
    + r")\.experts\.(0|[1-9][0-9]*)\.("
    + "|".join(sorted({w for m in _MOE for w in m.names.values()}))
    + r")\.weight$"
)
FILE_RENAMES: tuple[tuple[str, str], ...] = tuple(r for a in ENTRIES for r in a.file_renames)
EXPERT_PART: dict[str, str] = {w: m.part_of(w) for m in _MOE for w in m.names.values()}
MOVED_ROUTERS = tuple(sorted({m.router for m in _MOE if m.router != "mlp.gate.weight"}))
