"""The built-in real model (SmolLM2-135M: tied embeddings, 30 layers) and a checkpoint with the real
Llama-3.2-1B layout in several shards, upscaled and loaded by stock transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.synthetic import llama_config, write_checkpoint
from tli_kernels.evaluation import FIXED_PROMPT, verify
from tli_kernels.methods import CommonOptions
from tli_kernels.upscale import upscale


def _load(path, dtype=torch.float32):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _tensor_bytes(path, name):
    layout = CheckpointLayout.open(path)
    t = layout.tensors[name]
    with open(t.file, "rb") as f:
        f.seek(t.offset)
        return f.read(t.nbytes)


def test_smollm2_tli_and_block_expansion(smollm2_dir, tmp_path):
    src = smollm2_dir
    assert json.load(open(os.path.join(src, "config.json")))["tie_word_embeddings"] is True
    dst = str(tmp_path / "tli")
    upscale(src, dst, "tli", common=CommonOptions(shard_size=100_000_000), options=dict(k=2, init="copy", alpha=1.0))
    names = CheckpointLayout.open(dst).tensors
    assert "lm_head.weight" not in names, "tied embeddings must stay tied"
    assert len([n for n in names if n.endswith("input_layernorm.weight")]) == 45
    for j, i in [(2, 1), (44, 29)]:
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight"):
            assert _tensor_bytes(dst, f"model.layers.{j}.{suffix}") == _tensor_bytes(src, f"model.layers.{i}.{suffix}")
    assert os.path.isfile(os.path.join(dst, "tokenizer.json"))
    model = _load(dst)
    assert model.config.num_hidden_layers == 45
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    ident = str(tmp_path / "block-expansion")
    upscale(src, ident, "block-expansion", options=dict(k=3))
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(FIXED_PROMPT, return_tensors="pt")["input_ids"]
    a, b = _load(src), _load(ident)
    with torch.no_grad():
        diff = (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4
    report = verify(src, ident, max_tokens=256, seq_len=128)
    assert report.dst_layers == 40 and report.max_logit_diff <= 1e-4
    assert abs(report.src_loss - report.dst_loss) <= 1e-4
    assert 1.0 < report.src_loss < 6.0, "SmolLM2 should model English text"


def test_llama_3_2_1b_layout_in_shards(tmp_path):
    """Real Llama-3.2-1B shapes (16 layers, hidden 2048, vocab 128256, tied) in 3 shards.

    The data is mostly holes (zeros) so the test stays fast; layer 5 and the embedding carry random
    bytes so byte-identity is a real check.
    """
    src = str(tmp_path / "src")
    write_checkpoint(src, llama_config("llama-3.2-1b"), fill="sparse", num_shards=3)
    layout = CheckpointLayout.open(src)
    assert len(layout.files) == 3
    rng = np.random.default_rng(0)
    for name, t in layout.tensors.items():
        if name.startswith("model.layers.5.") and "norm" not in name:
            with open(t.file, "r+b") as f:
                f.seek(t.offset)
                f.write((rng.standard_normal(t.nbytes // 2).astype(np.float32) * 0.02).astype(np.float16).tobytes())
    dst = str(tmp_path / "dst")
    result = upscale(src, dst, "tli", common=CommonOptions(shard_size=1_000_000_000), options=dict(k=2, init="copy"))
    assert len(result.plan.shards) == 4
    cfg = AutoConfig.from_pretrained(dst)
    assert cfg.num_hidden_layers == 24 and cfg.tie_word_embeddings
    for suffix in ("self_attn.q_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight"):
        assert _tensor_bytes(dst, f"model.layers.8.{suffix}") == _tensor_bytes(src, f"model.layers.5.{suffix}")
    # the keys transformers expects, from the model class itself (on the meta device: no memory)
    with torch.device("meta"):
        expected = set(AutoModelForCausalLM.from_config(cfg).state_dict())
    expected.discard("lm_head.weight")  # tied
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == expected
    for fname in set(index["weight_map"].values()):
        with safe_open(os.path.join(dst, fname), "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == fname} == set(f.keys())
    model = _load(dst, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == result.plan.num_parameters
