"""The gpu-window study preset, rehearsed on the CPU at its smoke size (the same code path): a base
Llama and tokenizer made in the run, step-0 identities, results rewritten after every run, the
cache on a rerun, and a time budget that skips runs cleanly."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tli_kernels.training import study
from tli_kernels.training.study import Budget, run_study

MAIN_RUNS = ["source", "tli-k2-zero", "tli-k2-copy-a0.1", "tli-k2-copy-a0.1-learn", "dus-m1", "moe-e4-top2",
             "tli-k2-copy-a1", "stack-x2"]  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(workdir, out, doc, the trained_order seen at each write) of one full smoke study."""
    root = tmp_path_factory.mktemp("window")
    work, out = str(root / "work"), str(root / "out")
    seen = []

    def on_write(doc):
        with open(os.path.join(out, "quality_results.json"), encoding="utf-8") as f:
            on_disk = json.load(f)
        assert on_disk["trained_order"] == doc["trained_order"]  # written before the next run starts
        assert os.path.getsize(os.path.join(out, "quality_results.md")) > 0
        seen.append(list(doc["trained_order"]))

    doc = run_study(preset="gpu-window-smoke", workdir=work, out=out, threads=2, device="cpu", plots=False,
                    on_write=on_write)  # fmt: skip
    return work, out, doc, seen


def test_the_smoke_study_trains_every_run_most_important_first(smoke):
    _, out, doc, seen = smoke
    assert doc["status"] == "complete"
    assert doc["failures"] == [] and doc["check_failures"] == [] and doc["skipped"] == []
    assert doc["trained_order"][:8] == MAIN_RUNS
    assert doc["trained_order"][8:] == ["source-seed1", "tli-k2-zero-seed1", "tli-k2-copy-a0.1-learn-seed1"]
    # The results were rewritten after every run: each prefix of the order was on disk at some point.
    for i in range(1, len(doc["trained_order"]) + 1):
        assert doc["trained_order"][:i] in seen
    assert {r["name"] for r in doc["runs"]} >= {"tli-k2-random-a0.1", "tli-k2-average-a1"}  # the grid, last
    assert not os.path.exists(os.path.join(out, "quality_loss.png"))  # plots=False
    md = open(os.path.join(out, "quality_results.md"), encoding="utf-8").read()
    assert "## Base model" in md and "Unfinished" not in md


def test_identity_methods_score_the_source_loss_at_step_0(smoke):
    loss = {r["name"]: r["initial_loss"] for r in smoke[2]["runs"]}
    for name in ("tli-k2-zero", "moe-e4-top2"):
        assert abs(loss[name] - loss["source"]) <= study.IDENTITY_TOLERANCE
    assert abs(loss["tli-k2-copy-a1"] - loss["source"]) > 1e-3  # not vacuous: a plain copy changes the function
    for r in smoke[2]["runs"]:
        if r["trained"]:  # the trainer's own step 0 is the study's (fp32 on the CPU)
            assert abs(r["trained"]["evals"][0]["heldout_loss"] - r["initial_loss"]) <= study.IDENTITY_TOLERANCE


def test_the_base_model_and_tokenizer_load_in_stock_transformers(smoke):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = smoke[2]["base"]
    tokenizer = AutoTokenizer.from_pretrained(base["model"])
    text = "In the beginning God created the heaven and the earth."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    model = AutoModelForCausalLM.from_pretrained(base["model"])
    config = model.config
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert config.vocab_size >= len(tokenizer) and str(config.dtype).endswith("bfloat16")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([ids])).logits).all()
    assert base["evals"][-1]["heldout_loss"] < base["evals"][0]["heldout_loss"]  # pretraining learnt something


def test_a_rerun_uses_the_cache(smoke, monkeypatch, tmp_path):
    work, _, doc, _ = smoke

    def fail(*args, **kwargs):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(study, "build_base", fail)
    monkeypatch.setattr("tli_kernels.training.trainer.train", fail)
    monkeypatch.setattr(study.Study, "model_folder", fail)
    again = run_study(preset="gpu-window-smoke", workdir=work, out=str(tmp_path / "out"), threads=2, device="cpu",
                      plots=False)  # fmt: skip
    assert again["runs"] == doc["runs"]


def test_a_spent_budget_skips_runs_and_records_why(smoke, tmp_path):
    work, _, doc, _ = smoke
    out = str(tmp_path / "out")
    # Other steps: no trained result is cached; the step-0 ones are (free), the training runs do not fit.
    spent = run_study(preset="gpu-window-smoke", workdir=work, out=out, threads=2, device="cpu", plots=False, steps=5,
                      budget_s=0)  # fmt: skip
    assert spent["status"] == "complete" and spent["trained_order"] == []
    assert [s["name"] for s in spent["skipped"]] == [n for n in doc["trained_order"]]
    assert all(s["stage"] == "training" and s["reason"].startswith("budget") for s in spent["skipped"])
    on_disk = json.load(open(os.path.join(out, "quality_results.json"), encoding="utf-8"))
    assert on_disk["skipped"] == spent["skipped"]
    assert "Skipped:" in open(os.path.join(out, "quality_results.md"), encoding="utf-8").read()


def test_the_cli_exits_0_when_the_budget_allows_nothing(tmp_path, capsys):
    from tli_kernels.cli.main import main

    out = tmp_path / "out"
    argv = ["study", "--preset", "gpu-window-smoke", "--workdir", str(tmp_path / "w"), "--out", str(out),
            "--budget-s", "0", "--no-plots", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    doc = json.load(open(out / "quality_results.json", encoding="utf-8"))
    assert doc["skipped"][0]["name"] == "base model" and doc["runs"] == []
    assert "1 skipped" in capsys.readouterr().out


def test_budget_estimates_scale_the_nearest_measured_run():
    t = iter([50.0, 95.0])
    budget = Budget(100.0, lambda: next(t), started=0.0)
    assert budget.allows(40.0)  # 50 s elapsed: 50 left >= 40 x 1.2
    assert not budget.allows(10.0)  # 95 s elapsed: 5 left < 12
    initial = {"a": {"parameters": 100}, "b": {"parameters": 400}}
    trained = {"a": {"seconds": 10.0, "losses": [0.0] * 10}, "b": {"seconds": 80.0, "losses": [0.0] * 10}}
    assert Budget.trained_estimate(300, 20, 1, trained, initial, None) == pytest.approx(80 * 0.75 * 2)
    base = {"seconds_pretrain": 10.0, "tokens_per_step": 100, "parameters": 50, "spec": {"steps": 10}}
    assert Budget.trained_estimate(100, 5, 200, {}, initial, base) == pytest.approx(0.01 * 5 * 200 * 2)
    assert Budget.trained_estimate(100, 5, 200, {}, initial, None) == 0.0


def test_the_cli_presets_are_the_studys():
    from tli_kernels.training.cli import STUDY_PRESETS

    assert STUDY_PRESETS == tuple(study.PRESETS)
