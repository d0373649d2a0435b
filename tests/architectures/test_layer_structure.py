"""How tli finds a checkpoint's decoder layers and config entries, and what it refuses there."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.architectures.models import FAMILIES, build_model, load, logits, save_model
from tests.helpers import save_tiny_llama, tree_digest
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.upscale import upscale


def _edit_config(path: str, **changes) -> None:
    p = os.path.join(path, "config.json")
    config = json.load(open(p, encoding="utf-8"))
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    json.dump(config, open(p, "w", encoding="utf-8"))


def _refused(src: str, dst: str, match: str, method="tli", **options) -> None:
    before = tree_digest(src)
    with pytest.raises((CheckpointError, ValueError), match=match):
        upscale(src, dst, method, options=options or dict(k=2, init="zero", alpha=1.0))
    assert not os.path.exists(dst), "nothing may be written"
    assert tree_digest(src) == before


def test_layer_types_computed_by_transformers_when_the_config_leaves_them_out(tmp_path):
    """A Gemma3 config with only a sliding-window pattern (as older files have): the output gets an
    explicit layer_types list that follows the layer map."""
    from transformers import AutoConfig

    family = FAMILIES["gemma3_text"]
    model = build_model(family)
    src = save_model(model, str(tmp_path / "src"))
    _edit_config(src, layer_types=None, sliding_window_pattern=3)
    source_types = AutoConfig.from_pretrained(src).layer_types
    assert source_types == model.config.layer_types and len(set(source_types)) == 2
    dst = str(tmp_path / "out")
    upscale(src, dst, "passthrough", options=dict(layers="2-5,0-1"))
    written = json.load(open(os.path.join(dst, "config.json")))["layer_types"]
    assert written == [source_types[i] for i in [2, 3, 4, 5, 0, 1]]


def test_gpt2_saved_without_the_transformer_prefix(tmp_path):
    """The original GPT-2 files name tensors h.{i}.* and wte/wpe/ln_f (saved from GPT2Model)."""
    from transformers import GPT2Model

    family = FAMILIES["gpt2"]
    model = build_model(family)
    base = str(tmp_path / "base")
    GPT2Model(model.config).save_pretrained(base)  # any weights: the names are the point
    tensors = load_file(os.path.join(base, "model.safetensors"))
    assert "h.0.attn.c_proj.weight" in tensors
    dst = str(tmp_path / "out")
    upscale(base, dst, "tli", options=dict(k=3, init="zero", alpha=1.0))
    out = load_file(os.path.join(dst, "model.safetensors"))
    assert sorted(k for k in out if k.startswith("h.3.")) == sorted(
        k.replace("h.2.", "h.3.") for k in tensors if k.startswith("h.2.")
    )
    assert torch.equal(out["h.3.attn.c_proj.bias"], torch.zeros_like(out["h.3.attn.c_proj.bias"]))
    assert json.load(open(os.path.join(dst, "config.json")))["n_layer"] == 8


def test_gpt2_with_attention_scaled_by_layer_index_is_refused(tmp_path):
    family = FAMILIES["gpt2"]
    src = save_model(build_model(family), str(tmp_path / "src"))
    _edit_config(src, scale_attn_by_inverse_layer_idx=True)
    _refused(src, str(tmp_path / "out"), "scale_attn_by_inverse_layer_idx=True is not supported")


@pytest.mark.parametrize("alias", ["01", "\u0661"])  # a leading zero; ARABIC-INDIC DIGIT ONE
def test_layer_index_aliases_are_refused(tmp_path, alias):
    src = save_tiny_llama(str(tmp_path / "src"), shard=None)
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    tensors[f"model.layers.{alias}.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"] * 2
    save_file(tensors, path, metadata={"format": "pt"})
    _refused(src, str(tmp_path / "out"), f"layer index '{alias}' is not a plain decimal number")


def test_a_huge_layer_count_fails_fast_without_allocating(tmp_path):
    src = save_tiny_llama(str(tmp_path / "src"))
    _edit_config(src, num_hidden_layers=10**10)
    start = time.monotonic()
    _refused(src, str(tmp_path / "out"), "num_hidden_layers is 10000000000 but the weights hold layers 0-5")
    assert time.monotonic() - start < 5
    _edit_config(src, num_hidden_layers=1e10)
    _refused(src, str(tmp_path / "out"), "num_hidden_layers is 10000000000.0, not a positive integer")


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(quantization_config="bnb"), "quantization_config is a str, expected an object"),
        (dict(model_type=7), "config.json has no model_type"),
        (dict(model_type="made_up_lm", architectures=[1, 2]), "unsupported architecture model_type='made_up_lm'"),
    ],
)
def test_bad_config_entries_give_one_line_errors(tmp_path, changes, match):
    src = save_tiny_llama(str(tmp_path / "src"))
    _edit_config(src, **changes)
    _refused(src, str(tmp_path / "out"), match)


@pytest.mark.parametrize("value", [None, [0.02], "0.02", -1.0])
def test_random_init_needs_a_usable_initializer_range(tmp_path, value):
    src = save_tiny_llama(str(tmp_path / "src"))
    p = os.path.join(src, "config.json")
    config = json.load(open(p))
    config["initializer_range"] = value
    json.dump(config, open(p, "w"))
    _refused(src, str(tmp_path / "out"), "initializer_range is .*: --init random needs a positive number",
             k=2, init="random", alpha=1.0)  # fmt: skip
    # moe-upcycle's routers start at random too
    match = "initializer_range is .*: --init random needs a positive number"
    _refused(src, str(tmp_path / "out"), match, method="moe-upcycle", experts=2, top_k=1)
    # The other inits never read it.
    upscale(src, str(tmp_path / "ok"), "tli", options=dict(k=2, init="copy", alpha=1.0))


def test_inspect_reports_the_rule_and_layer_count(tmp_path):
    family = FAMILIES["falcon"]
    src = save_model(build_model(family), str(tmp_path / "src"))
    layout = CheckpointLayout.open(src)
    assert (layout.layer_prefix, layout.num_layers, layout.architecture.name) == ("transformer.h", 6, "falcon")
    assert torch.isfinite(logits(load(src))).all()


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(hidden_size=32), "hidden size in config.json is 32 but the embedding model.embed_tokens.weight is"),
        (dict(vocab_size=100), "vocab_size in config.json is 100 but the embedding"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings is false but the weights hold no output head"),
    ],
)
def test_config_must_describe_the_weights(tmp_path, edit, match):
    """A config that disagrees with the weights would give an output transformers cannot load (or whose
    head it fills at random): refused before anything is written."""
    src = save_tiny_llama(str(tmp_path / "src"), tie=True)
    _edit_config(src, **edit)
    _refused(src, str(tmp_path / "out"), match)


def test_a_transposed_embedding_is_refused(tmp_path):
    src = save_tiny_llama(str(tmp_path / "src"), shard=None, tie=True)
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].t().contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    _refused(src, str(tmp_path / "out"), r"vocab_size in config.json is 128 but the embedding .* is \[64, 128\]")


def test_a_multi_token_prediction_layer_is_carried_after_the_new_stack(tmp_path):
    """DeepSeek-V3 / GLM-4-MoE checkpoints store their MTP layer at index num_hidden_layers (transformers
    skips it on load): it is carried byte for byte outside the stack and renumbered after the new last
    layer, and the grown model still loads in stock transformers with the identity's logits."""
    src = save_model(build_model(FAMILIES["glm4_moe"]), str(tmp_path / "src"))
    weights = load_file(os.path.join(src, "model.safetensors"))
    config = json.load(open(os.path.join(src, "config.json"), encoding="utf-8"))
    n, mtp = config["num_hidden_layers"], config.get("num_nextn_predict_layers")
    assert mtp == 1, "the test family must declare its MTP layer"
    head = f"model.layers.{n - 1}."
    weights.update(
        {f"model.layers.{n}." + k[len(head) :]: v.clone() + 1 for k, v in weights.items() if k.startswith(head)}
    )
    save_file(weights, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "out")
    upscale(src, out, "tli", options=dict(k=2, init="zero", alpha=1.0))
    grown = load_file(os.path.join(out, "model.safetensors"))
    n_out = json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))["num_hidden_layers"]
    assert n_out == n + n // 2
    carried = {
        k[len(f"model.layers.{n_out}.") :]: v for k, v in grown.items() if k.startswith(f"model.layers.{n_out}.")
    }
    source = {k[len(f"model.layers.{n}.") :]: v for k, v in weights.items() if k.startswith(f"model.layers.{n}.")}
    assert carried.keys() == source.keys() and all(torch.equal(carried[k], source[k]) for k in source)
    assert not any(k.startswith(f"model.layers.{n_out + 1}.") for k in grown)
    from transformers import AutoModelForCausalLM

    def loaded(path, mtp_index):  # stock transformers skips the MTP layer: it is unexpected, nothing is missing
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"]
        assert {k.split(".")[2] for k in info["unexpected_keys"]} == {str(mtp_index)}, info["unexpected_keys"]
        return model.eval()

    assert torch.equal(logits(loaded(out, n_out)), logits(loaded(src, n)))
