"""Tiny source models shared by the recipe tests (written once per session by transformers)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import save_tiny_llama


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-models")
    m = {}

    def save(key, **kw):
        m[key] = save_tiny_llama(str(root / key), **kw)

    save("a", layers=6, seed=1, shard="60KB")  # sharded source
    save("b", layers=6, seed=2, shard=None)
    save("f32", layers=4, seed=3, shard=None, dtype=torch.float32)
    save("tied", layers=4, seed=4, shard=None, tie=True)
    save("m1", layers=6, seed=5, model_type="mistral", shard=None)
    save("m2", layers=6, seed=6, model_type="mistral", shard="60KB")
    qwen = dict(
        layers=6, model_type="qwen2", shard=None, use_sliding_window=True, max_window_layers=3, sliding_window=16
    )
    save("q1", seed=7, **qwen)
    save("q2", seed=8, **qwen)
    m["narrow"] = _save_narrow(str(root / "narrow"))
    # b with a different rms_norm_eps: a soft difference, so the config donor shows
    m["b_eps"] = str(root / "b_eps")
    shutil.copytree(m["b"], m["b_eps"])
    _edit_config(m["b_eps"], rms_norm_eps=1e-5)
    return m


def _save_narrow(path: str) -> str:
    """A Llama like the others but with hidden size 32: its layers do not fit theirs."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def _edit_config(path, **kv):
    p = os.path.join(path, "config.json")
    cfg = json.load(open(p))
    cfg.update(kv)
    json.dump(cfg, open(p, "w"))
