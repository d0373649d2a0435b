"""`tli train` on a tiny upscaled Llama: it learns, saves checkpoints stock transformers loads (alpha
folded), resumes with the same curve as an uninterrupted run, and refuses bad settings clearly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tli_kernels.cli.main import main
from tli_kernels.evaluation import mean_loss, windows
from tli_kernels.training.trainer import TrainConfig, lr_factor, train


@pytest.fixture
def cfg(token_files, tiny_tli, tmp_path):
    train_file, held_file = token_files

    def make(**overrides) -> TrainConfig:
        values = dict(
            model=tiny_tli, output=str(tmp_path / "out"), data_file=train_file, eval_data_file=held_file,
            seq_len=32, micro_batch=2, accum=2, steps=8, lr=3e-3, warmup=2, eval_every=2, eval_tokens=512,
            progress=False, threads=2,
        )  # fmt: skip
        values.update(overrides)
        return TrainConfig(**values)

    return make


def _weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, steps=10, warmup=2, min_ratio=0.1) for s in range(11)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert f[10] == pytest.approx(0.1)


def test_learns_and_saves_a_stock_checkpoint_with_alpha_folded(cfg, token_files):
    from transformers import AutoModelForCausalLM

    result = train(cfg(steps=12, learnable_alpha=True))
    first, last = result.evals[0]["heldout_loss"], result.evals[-1]["heldout_loss"]
    assert last < first - 0.05, (first, last)
    assert set(result.alphas) == {2, 5} and all(a != 1.0 for a in result.alphas.values())

    ckpt = result.checkpoint
    assert ckpt.endswith("step-000012")
    model = AutoModelForCausalLM.from_pretrained(ckpt)  # plain transformers, no tli code involved
    assert model.config.num_hidden_layers == 6
    held = windows(torch.from_numpy(np.load(token_files[1])), 32, 512)
    assert mean_loss(model, held) == pytest.approx(last, abs=1e-5)  # same function: alpha is folded in

    provenance = json.load(open(os.path.join(ckpt, "tli_provenance.json")))
    assert provenance["alpha_folded"] is True and provenance["injected_layers"] == [2, 5]
    for i, a in result.alphas.items():  # the source's alpha (0.5) times the learnt multiplier
        assert provenance["residual_scales"][str(i)] == pytest.approx(0.5 * a)
    training = json.load(open(os.path.join(ckpt, "tli_training.json")))
    assert training["step"] == 12 and training["tokens"] == 12 * 4 * 32
    assert json.load(open(os.path.join(os.path.dirname(ckpt), "history.json")))["evals"] == result.evals


def test_resume_reproduces_the_uninterrupted_run(cfg, tmp_path):
    straight = train(cfg(output=str(tmp_path / "a"), learnable_alpha=True))
    first = train(cfg(output=str(tmp_path / "b"), learnable_alpha=True, stop_after=4))
    assert first.checkpoint.endswith("step-000004") and len(first.history) == 4
    resumed = train(cfg(output=str(tmp_path / "b"), learnable_alpha=True, resume=True))

    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history], abs=1e-6)
    assert [e["heldout_loss"] for e in resumed.evals] == pytest.approx(
        [e["heldout_loss"] for e in straight.evals], abs=1e-6
    )
    assert resumed.alphas == pytest.approx(straight.alphas, abs=1e-6)
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_train_injected_only_leaves_the_other_layers_alone(cfg, tiny_tli):
    result = train(cfg(steps=3, train="injected"))
    before, after = _weights(tiny_tli), _weights(result.checkpoint)
    changed = {k for k in before if not torch.equal(before[k].float(), after[k])}
    assert changed and all(k.startswith(("model.layers.2.", "model.layers.5.")) for k in changed)


def test_bad_settings_are_refused(cfg, tiny_source, tmp_path):
    with pytest.raises(ValueError, match="no injected layers"):
        train(cfg(model=tiny_source, learnable_alpha=True))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(cfg(output=str(tmp_path / "empty"), resume=True))
    with pytest.raises(ValueError, match="--stop-after"):
        train(cfg(stop_after=9))
    train(cfg(output=str(tmp_path / "r"), steps=4, stop_after=2))
    with pytest.raises(ValueError, match=r"lr: 0\.003 -> 0\.01"):
        train(cfg(output=str(tmp_path / "r"), steps=4, lr=1e-2, resume=True))


def test_cli(token_files, tiny_tli, tiny_source, tmp_path, capsys):
    train_file, held_file = token_files
    common = ["--data", train_file, "--eval-data", held_file, "--seq-len", "16", "--eval-tokens", "128", "--quiet"]
    assert main(["train", tiny_tli, "--steps", "2", "-o", str(tmp_path / "o"), *common]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "step-000002" in out
    assert main(["train", tiny_source, "--learnable-alpha", *common]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("tli: error: --learnable-alpha: ")


def test_kernels_path_follows_the_stock_path(cfg, tmp_path):
    """With --kernels alpha lives in the patched layers instead of hooks; same curve, same checkpoint."""
    pytest.importorskip("tli_kernels.integrations.hf", reason="the tli kernels are not in this checkout")
    # Short and with little evaluation: the kernels run in Triton's interpreter on a CPU.
    small = dict(steps=3, accum=1, eval_every=0, eval_tokens=64, learnable_alpha=True)
    stock = train(cfg(**small, output=str(tmp_path / "stock")))
    kernels = train(cfg(**small, output=str(tmp_path / "kernels"), kernels=True))
    assert [h["loss"] for h in kernels.history] == pytest.approx([h["loss"] for h in stock.history], abs=1e-4)
    assert kernels.alphas == pytest.approx(stock.alphas, abs=1e-4)
    a, b = _weights(stock.checkpoint), _weights(kernels.checkpoint)
    assert a.keys() == b.keys()
    # Adam divides by the root of the squared gradient, so an element whose gradient is ~0 can move
    # by a sizeable fraction of lr (3e-3) on float32 noise alone; 1e-4 is 1/30 of one such step.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_train_parser_lists_every_method_and_option():
    """The train parser does not import the methods (start-up cost): its copies must stay in step."""
    from tli_kernels.cli.main import METHOD_OPTIONS
    from tli_kernels.methods import METHODS
    from tli_kernels.training import cli

    assert cli.METHODS == tuple(METHODS)
    assert set(cli.METHOD_FLAGS) == {o for opts in METHOD_OPTIONS.values() for o in opts}


@pytest.mark.parametrize("model_type", ["gemma2", "gpt2", "qwen3_moe"])
def test_learnable_alpha_on_other_families_is_folded_where_the_rule_says(cfg, tmp_path, token_files, model_type):
    """Upscale on load from a Gemma2 (alpha in the post norms, (1 + w)), GPT-2 (c_proj weights and
    biases) and Qwen3-MoE (every expert) source, learn alpha, save: stock transformers loads the
    checkpoint and computes the held-out loss the trainer measured, so alpha went where it acts."""
    from transformers import AutoModelForCausalLM

    from tests.architectures.models import FAMILIES, build_model, save_model

    src = save_model(build_model(FAMILIES[model_type]), str(tmp_path / "src"))
    result = train(
        cfg(model=src, method="tli", method_options={"k": 3, "init": "copy", "alpha": 0.5},
            steps=4, learnable_alpha=True, lr=1e-2)
    )  # fmt: skip
    assert set(result.alphas) == {3, 7} and all(a != 1.0 for a in result.alphas.values())
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    held = windows(torch.from_numpy(np.load(token_files[1])), 32, 512)
    assert mean_loss(model, held) == pytest.approx(result.evals[-1]["heldout_loss"], abs=1e-4)
