"""Model types without a registry entry: a guessed rule is used only once a tiny instance proves it.

The families here are real transformers models tli has no entry for. Their outputs are checked like
the registry's (tests/architectures/test_upscale_by_architecture.py): stock loading, and logits equal
to the hook-based reference, whose module names are this file's own.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.architectures.models import Family, build_model, load, logits, reference_upscale, save_model
from tests.helpers import tree_digest
from tli_kernels.architectures import BY_MODEL_TYPE, generic
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.upscale import upscale

UNKNOWN = {
    "phi": Family("phi", {}, branches=("self_attn", "mlp")),
    "gptj": Family(
        "gptj",
        dict(n_embd=64, n_layer=6, n_head=4, rotary_dim=8, vocab_size=128, n_positions=256),
        branches=("attn", "mlp"),
        layers="transformer.h",
        count_key="n_layer",
        base=False,
    ),
    "opt": Family(
        "opt", dict(ffn_dim=128, word_embed_proj_dim=64), branches=("self_attn", "fc2"), layers="model.decoder.layers"
    ),
    "olmo": Family("olmo", {}),
}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TLI_CACHE_DIR", str(tmp_path / "cache"))


def test_these_model_types_have_no_registry_entry():
    assert not set(UNKNOWN) & set(BY_MODEL_TYPE)


@pytest.mark.parametrize("model_type", sorted(UNKNOWN))
def test_generic_rule_is_proven_then_matches_the_reference(tmp_path, model_type):
    from tests.architectures.test_upscale_by_architecture import tli_map

    family = UNKNOWN[model_type]
    model = build_model(family)
    src = save_model(model, str(tmp_path / "src"))
    arch = CheckpointLayout.open(src).architecture
    assert arch.proven_by == "instance check" and arch.model_types == (model_type,)
    dst = str(tmp_path / "out")
    upscale(src, dst, "tli", options=dict(k=3, init="copy", alpha=0.5))
    spec = tli_map(3, "copy", 0.5)
    want = logits(reference_upscale(model, family, spec, {}))
    torch.testing.assert_close(logits(load(dst)), want, rtol=1e-5, atol=1e-5)
    zero = str(tmp_path / "zero")
    upscale(src, zero, "tli", options=dict(k=2, init="zero", alpha=1.0))
    assert torch.equal(logits(load(zero)), logits(load(src)))


def test_the_verdict_is_cached(tmp_path, monkeypatch):
    family = UNKNOWN["olmo"]
    src = save_model(build_model(family), str(tmp_path / "src"))
    calls = []
    real = generic._prove
    monkeypatch.setattr(generic, "_prove", lambda *a: calls.append(1) or real(*a))
    assert CheckpointLayout.open(src).architecture.proven_by == "instance check"
    assert CheckpointLayout.open(src).architecture.proven_by == "instance check"
    assert len(calls) == 1
    cached = json.load(open(os.environ["TLI_CACHE_DIR"] + "/architecture-checks.json"))
    assert [k.split("|")[0] for k in cached] == ["olmo"]


def test_a_generic_rule_that_does_not_hold_is_refused_before_writing(tmp_path, monkeypatch):
    """Teach the guesser a wrong name for the MLP's last map (gate_proj: zeroing it does silence
    the MLP, scaling it does not scale it): the instance check catches it, nothing is written."""
    monkeypatch.setattr(generic, "MLP_OUTPUTS", ("gate_proj",))
    src = save_model(build_model(UNKNOWN["olmo"]), str(tmp_path / "src"))
    before = tree_digest(src)
    dst = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"unsupported architecture model_type='olmo'.*does not scale"):
        upscale(src, dst, "tli", options=dict(k=2, init="zero", alpha=1.0))
    assert not os.path.exists(dst) and tree_digest(src) == before


def test_unknown_per_layer_entries_block_a_new_layer_order(tmp_path):
    model = build_model(UNKNOWN["olmo"])
    src = save_model(model, str(tmp_path / "src"))
    config = json.load(open(os.path.join(src, "config.json")))
    config["sparse_layers"] = [1, 3]  # an index list tli cannot interpret for an unknown type
    json.dump(config, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="sparse_layers looks like a per-layer setting"):
        upscale(src, str(tmp_path / "out"), "stack", options=dict(times=2))
