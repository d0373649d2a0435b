"""The real model: SmolLM2-135M upscaled, scored on the King James held-out split and trained a few
steps on the train split (short windows so it stays quick on a CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tli_kernels.training.study import Preset, run_study
from tli_kernels.training.trainer import TrainConfig, train
from tli_kernels.upscale import upscale

TINY_STUDY = Preset(
    seq_len=64, micro_batch=2, accum=1, steps=1, lr=3e-4, warmup=0, eval_every=1, eval_tokens=128, eval_batch=2,
    grid_ks=(), grid_alphas=(), moe=((2, 2),),
)  # fmt: skip


@pytest.mark.slow
def test_identity_preserving_methods_score_the_source_loss_at_step_0(smollm2_dir, tmp_path):
    runs = ["block-expansion-k2", "moe-e2-top2", "tli-k2-copy-a1"]
    doc = run_study(preset=TINY_STUDY, workdir=str(tmp_path / "w"), out=str(tmp_path / "out"), source=smollm2_dir,
                    runs=runs, initial_only=True, threads=2)  # fmt: skip
    loss = {r["name"]: r["initial_loss"] for r in doc["runs"]}
    assert abs(loss["block-expansion-k2"] - loss["source"]) < 1e-4  # run_study asserts this too
    assert abs(loss["moe-e2-top2"] - loss["source"]) < 1e-4
    assert loss["tli-k2-copy-a1"] > loss["source"] + 0.1  # not a vacuous comparison: a plain copy hurts
    layers = {r["name"]: r["layers"] for r in doc["runs"]}
    assert layers == {"source": 30, "block-expansion-k2": 45, "moe-e2-top2": 30, "tli-k2-copy-a1": 45}
    for name in ("quality_results.json", "quality_results.md"):
        assert os.path.getsize(tmp_path / "out" / name) > 0


@pytest.mark.slow
def test_training_the_upscaled_model_lowers_heldout_loss(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    up = str(tmp_path / "tli")
    upscale(smollm2_dir, up, "tli", options={"k": 2, "init": "copy", "alpha": 0.5})
    cfg = TrainConfig(
        model=up, output=str(tmp_path / "out"), seq_len=32, micro_batch=2, steps=3, lr=3e-4, warmup=0,
        eval_every=0, eval_tokens=128, eval_batch=4, train="injected", learnable_alpha=True, progress=False, threads=2,
    )  # fmt: skip
    result = train(cfg)
    first, last = result.evals[0]["heldout_loss"], result.evals[-1]["heldout_loss"]
    assert last < first - 0.05, (first, last)

    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)  # stock transformers
    assert model.config.num_hidden_layers == 45
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
    provenance = json.load(open(os.path.join(result.checkpoint, "tli_provenance.json")))
    assert provenance["trained_steps"] == 3 and len(provenance["residual_scales"]) == 15
    assert os.path.isfile(os.path.join(result.checkpoint, "tokenizer.json"))
