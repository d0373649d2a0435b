"""Tiny random models of every decoder family tli supports, and an independent reference upscaler.

The reference is built from transformers modules only: the source model's decoder layers deep-copied
in the output order (averaged parameter by parameter where asked), and forward hooks on the modules
whose outputs are added to the residual stream, multiplying them by alpha (0 for an identity block).
It knows nothing of tli's rules: the module names below are this file's own reading of each family's
transformers code.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)


@dataclass
class Family:
    model_type: str
    config: dict = field(default_factory=dict)
    # Modules of a decoder layer whose outputs join the residual stream: (attention, MLP).
    branches: tuple[str, str] = ("self_attn", "mlp")
    layers: str = "model.layers"  # in-memory path of the decoder ModuleList
    count_key: str = "num_hidden_layers"
    tie: bool = False
    upcycle_to: str | None = None  # moe-upcycle target model_type
    base: bool = True  # start from BASE
    # Method cases (test_upscale_by_architecture.CASES) whose layer map the config cannot express: the
    # one-line refusal expected instead of an output.
    refuses: dict = field(default_factory=dict)

    def make_config(self, tie: bool | None = None):
        from transformers import AutoConfig

        kwargs = {**(BASE if self.base else {}), **self.config}
        kwargs["tie_word_embeddings"] = self.tie if tie is None else tie
        return AutoConfig.for_model(self.model_type, **kwargs)


POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
MOE_DEEPSEEK = dict(
    n_routed_experts=4, num_experts_per_tok=4, moe_intermediate_size=32, n_shared_experts=1, n_group=1, topk_group=1
)
MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
FAMILIES = {
    f.model_type: f
    for f in [
        Family("llama", upcycle_to="mixtral"),
        Family("mistral", dict(sliding_window=8), upcycle_to="mixtral"),
        Family("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=3), upcycle_to="qwen2_moe"),
        Family("qwen3", dict(head_dim=16), upcycle_to="qwen3_moe"),
        Family("smollm3", dict(pad_token_id=0, no_rope_layer_interval=3)),
        Family("granite", dict(residual_multiplier=0.5, attention_multiplier=0.2, embedding_multiplier=2.0)),
        Family("phi3", dict(pad_token_id=0)),
        Family("stablelm", dict(use_parallel_residual=False)),
        Family("cohere", dict(use_qk_norm=False), tie=True),
        Family("gemma", dict(head_dim=16), tie=True),
        Family("gemma2", dict(head_dim=16, sliding_window=8), branches=POST_NORMS, tie=True),
        Family(
            "gemma3_text", dict(head_dim=16, sliding_window=8, sliding_window_pattern=3), branches=POST_NORMS, tie=True
        ),
        Family("olmo2", {}, branches=POST_NORMS),
        Family("starcoder2", dict(num_key_value_heads=2), tie=True),
        Family("gpt_neox", dict(use_parallel_residual=True), branches=("attention", "mlp"), layers="gpt_neox.layers"),
        Family(
            "gpt2",
            dict(n_embd=64, n_layer=6, n_head=4, vocab_size=128, n_positions=256),
            branches=("attn", "mlp"),
            layers="transformer.h",
            count_key="n_layer",
            tie=True,
            base=False,
        ),
        Family(
            "falcon",
            dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, vocab_size=128, parallel_attn=True),
            branches=("self_attention", "mlp"),
            layers="transformer.h",
            tie=True,
            base=False,
        ),
        Family("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
        Family(
            "glm4",
            dict(head_dim=16, pad_token_id=0, partial_rotary_factor=0.5),
            branches=("post_self_attn_layernorm", "post_mlp_layernorm"),
        ),
        Family(
            "granitemoe",
            dict(num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.5, attention_multiplier=0.2),
            branches=("self_attn", "block_sparse_moe"),
        ),
        # Every routed expert chosen (top 4 of 4): each expert's mapping shows in the logits, and bf16 rounding
        # (alpha folded into weights vs applied by a hook) cannot flip a near-tied top-k choice.
        Family(
            "glm4_moe",
            dict(MOE_DEEPSEEK, head_dim=16, pad_token_id=0, first_k_dense_replace=1),
            refuses={"stack": "output layer 6 would be a dense layer .* first_k_dense_replace cannot express"},
        ),
        # MLA with both query forms: low-rank (q_a_proj, q_a_layernorm, q_b_proj) in V3, a plain q_proj in V2.
        Family(
            "deepseek_v3",
            dict(MOE_DEEPSEEK, **MLA, num_key_value_heads=4, first_k_dense_replace=1),
            refuses={"stack": "output layer 6 would be a dense layer .* first_k_dense_replace cannot express"},
        ),
        Family(
            "deepseek_v2",
            dict(MOE_DEEPSEEK, **{**MLA, "q_lora_rank": None}, num_key_value_heads=4, first_k_dense_replace=1),
            refuses={"stack": "output layer 6 would be a dense layer .* first_k_dense_replace cannot express"},
        ),
        Family(
            "gpt_oss",
            dict(
                head_dim=16,
                pad_token_id=0,
                intermediate_size=32,
                num_local_experts=4,
                num_experts_per_tok=4,
                sliding_window=8,
            ),
        ),  # fmt: skip
        Family(
            "ernie4_5_moe",
            dict(
                pad_token_id=0,
                moe_num_experts=4,
                moe_k=4,
                moe_intermediate_size=32,
                moe_num_shared_experts=1,
                moe_layer_start_index=1,
            ),
            refuses={"stack": "output layer 6 would be a dense layer .* moe_layer_range cannot express"},
        ),  # fmt: skip
        Family("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0])),
        Family(
            "qwen2_moe",
            dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
        ),  # fmt: skip
    ]
}


def build_model(family: Family, *, seed: int = 0, tie: bool | None = None):
    """A random float32 model of the family with non-trivial norms and biases (so copying the wrong
    norm, or forgetting a bias, shows in the logits)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family.make_config(tie)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("_bias"):  # gpt-oss's expert biases are [experts, width]
                if name.endswith("bias"):
                    p.uniform_(-0.3, 0.3)
                else:
                    p.add_(torch.empty_like(p).uniform_(0.3, 0.8))
    return model


def save_model(model, path: str, *, dtype=torch.float32, shard: str | None = None) -> str:
    m = copy.deepcopy(model).to(dtype)
    if shard:
        m.save_pretrained(path, max_shard_size=shard)
    else:
        m.save_pretrained(path)
    assert not shard or os.path.exists(os.path.join(path, "model.safetensors.index.json")), "expected shards"
    return path


def load(path: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not bad, f"{path}: {bad}"
    return model.eval()


def decoder_layers(model, family: Family) -> torch.nn.ModuleList:
    return model.get_submodule(family.layers)


@dataclass
class OutSpec:
    """One output layer of the reference: its source layers, alpha, identity or not."""

    sources: list[int]
    alpha: float = 1.0
    zero: bool = False


def reference_upscale(source, family: Family, spec: list[OutSpec], per_layer: dict[str, list]):
    """The expected upscaled model, from transformers modules and hooks (see the module docstring).
    `per_layer`: the config's per-layer lists of the source, remapped here by the first source."""
    model = copy.deepcopy(source)
    old = decoder_layers(source, family)
    new = torch.nn.ModuleList()
    for out in spec:
        layer = copy.deepcopy(old[out.sources[0]])
        if len(out.sources) > 1:
            params = [dict(old[s].named_parameters()) for s in out.sources]
            with torch.no_grad():
                for name, p in layer.named_parameters():
                    p.copy_(sum(ps[name] for ps in params) / len(params))
        factor = 0.0 if out.zero else out.alpha
        if factor != 1.0:
            for branch in family.branches:
                layer.get_submodule(branch).register_forward_hook(_scaler(factor))
        new.append(layer)
    parent_name, _, attr = family.layers.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)
    setattr(model.config, family.count_key, len(new))
    if family.count_key != "num_hidden_layers":
        model.config.num_hidden_layers = len(new)
    for key, values in per_layer.items():
        setattr(model.config, key, [values[o.sources[0]] for o in spec])
    return model


def _scaler(factor: float):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] * factor,) + tuple(output[1:])
        return output * factor

    return hook


def logits(model, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def per_layer_lists(config) -> dict[str, list]:
    n = config.num_hidden_layers
    out = {}
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == n:
            out[key] = list(value)
    return out
