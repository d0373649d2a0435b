"""The decoder families tli knows, one short entry each (see spec.py for what the fields mean).

Every entry here is proven by tests/architectures on a tiny random instance built by transformers:
zero-init gives the block's input back exactly, alpha scales each branch as defined, and every
method's output loads with no missing or unexpected keys and matches an in-memory reference.
Adding a family is adding an entry and a line in the tests' model table.
"""

from __future__ import annotations

from tli_kernels.architectures.spec import Architecture, Branch

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

ENTRIES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), LLAMA_ATTN, LLAMA_MLP, moe_sibling="mixtral"),
    Architecture("mistral", ("mistral",), LLAMA_ATTN, LLAMA_MLP, per_layer_keys=LAYER_TYPES, moe_sibling="mixtral"),
    Architecture("qwen2", ("qwen2",), LLAMA_ATTN, LLAMA_MLP, per_layer_keys=LAYER_TYPES, moe_sibling="qwen2_moe"),
    Architecture("qwen3", ("qwen3",), LLAMA_ATTN, LLAMA_MLP, per_layer_keys=LAYER_TYPES, moe_sibling="qwen3_moe"),
    Architecture("smollm3", ("smollm3",), LLAMA_ATTN, LLAMA_MLP, per_layer_keys=("layer_types", "no_rope_layers")),
    Architecture("granite", ("granite",), LLAMA_ATTN, LLAMA_MLP, notes="residual_multiplier scales both branches"),
    Architecture("phi3", ("phi3",), LLAMA_ATTN, LLAMA_MLP, notes="fused qkv_proj and gate_up_proj"),
    Architecture("stablelm", ("stablelm",), LLAMA_ATTN, LLAMA_MLP, parallel="config", notes="LayerNorm"),
    Architecture("cohere", ("cohere",), LLAMA_ATTN, LLAMA_MLP, parallel="parallel", notes="one LayerNorm, parallel"),
    # Gemma: RMSNorm computes x * (1 + w).
    Architecture("gemma", ("gemma",), LLAMA_ATTN, LLAMA_MLP, norm_offset=1.0),
    # Gemma2/3: sandwich norms; the post norms follow the branches, so alpha goes into them.
    Architecture(
        "gemma2",
        ("gemma2", "gemma3_text"),
        Branch(LLAMA_ATTN.outputs, post_norm="post_attention_layernorm.weight"),
        Branch(LLAMA_MLP.outputs, post_norm="post_feedforward_layernorm.weight"),
        norm_offset=1.0,
        per_layer_keys=LAYER_TYPES,
    ),
    # OLMo2: no pre norms, a norm on each branch output.
    Architecture(
        "olmo2",
        ("olmo2",),
        Branch(LLAMA_ATTN.outputs, post_norm="post_attention_layernorm.weight"),
        Branch(LLAMA_MLP.outputs, post_norm="post_feedforward_layernorm.weight"),
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
    ),
    Architecture("qwen3_moe", ("qwen3_moe",), LLAMA_ATTN, QWEN_MOE_MLP, moe_layout="mlp_only_layers"),
    Architecture(
        "qwen2_moe", ("qwen2_moe",), LLAMA_ATTN, QWEN_MOE_MLP, per_layer_keys=LAYER_TYPES, moe_layout="mlp_only_layers"
    ),
)

BY_MODEL_TYPE: dict[str, Architecture] = {t: a for a in ENTRIES for t in a.model_types}
