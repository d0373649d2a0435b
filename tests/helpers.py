"""Helpers shared by the tests (import as tests.helpers)."""

from __future__ import annotations

import os

import torch


def save_tiny_llama(
    path: str,
    *,
    layers: int = 6,
    dtype=torch.bfloat16,
    tie: bool = False,
    shard: str | None = "60KB",
    model_type: str = "llama",
    seed: int = 0,
    **config_overrides,
) -> str:
    """A random Llama-family model saved by transformers (sharded when `shard` is given)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial norms, so copying the wrong norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(path, max_shard_size=shard) if shard else model.to(dtype).save_pretrained(path)
    return path


def tree_digest(path: str) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under path: to show a source folder was not touched."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), path)] = (st.st_size, st.st_mtime_ns)
    return out
