"""Tiny transformers models with real shapes, built in memory (import as tests.integrations.models).
On a CUDA machine they live on the GPU, so the compiled kernels are what gets tested."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VOCAB = 256

SHAPES = {
    # SmolLM2-135M's block (hidden 576, 9 heads / 3 KV heads, head_dim 64, tied embeddings), 3 layers.
    "smollm2": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        num_hidden_layers=3,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    # Llama 3's block in miniature: GQA 4:1 and the llama3 rope scaling.
    "llama3": dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=3,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        sliding_window=None,
    ),
    # Qwen2 has q/k/v biases.
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    ),
}


def tiny_model(shape: str, *, seed: int = 0, **overrides):
    """A float32 model in eval mode with random weights and non-trivial norms (SDPA attention)."""
    spec = dict(SHAPES[shape], **overrides)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, **spec)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    return model.to(DEVICE)


def batch(seed: int = 0, length: int = 8, left_pad: int = 0):
    """input_ids [2, length] and an attention mask where row 0 is left-padded by `left_pad` tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    if left_pad:
        ids[0, :left_pad] = 0
        mask[0, :left_pad] = 0
    return ids.to(DEVICE), mask.to(DEVICE)
