"""`tli train` as a new user meets it: what it says when nothing will be saved, how a finished run
is extended, which options it refuses."""

from __future__ import annotations

import math

import pytest

from tli_kernels.cli.main import main
from tli_kernels.training import trainer
from tli_kernels.training.trainer import TrainConfig, train


def _flags(token_files) -> list[str]:
    train_file, held_file = token_files
    return ["--data", train_file, "--eval-data", held_file, "--seq-len", "16", "--eval-tokens", "128", "--quiet"]


def test_without_output_it_warns_before_training_and_after(token_files, tiny_tli, capsys, monkeypatch):
    real_train, seen = trainer.train, {}

    def spy(cfg):
        seen["before"] = capsys.readouterr().err  # what the user had read when training started
        return real_train(cfg)

    monkeypatch.setattr(trainer, "train", spy)
    assert main(["train", tiny_tli, "--steps", "1", *_flags(token_files)]) == 0
    after = capsys.readouterr().err
    assert "no -o/--output, so nothing will be saved: 1 steps" in seen["before"]
    assert "nothing was saved (no -o/--output)" in after


def test_with_output_there_is_no_warning_and_the_export_has_a_model_card(token_files, tiny_tli, tmp_path, capsys):
    assert main(["train", tiny_tli, "--steps", "1", "-o", str(tmp_path / "o"), *_flags(token_files)]) == 0
    assert "nothing" not in capsys.readouterr().err
    card = (tmp_path / "o" / "step-000001" / "README.md").read_text()
    assert card.startswith("---\ntags:\n- tli\n- continued-pretraining\nlibrary_name: transformers\n---\n")
    assert "trained with tli" in card and "1 optimizer steps" in card and "| 1 | 64 |" in card
    assert "stored as F32, so `tli verify` or any scoring of this folder gives a slightly different number." in card


@pytest.fixture
def cfg(token_files, tiny_tli, tmp_path):
    train_file, held_file = token_files

    def make(**overrides) -> TrainConfig:
        values = dict(
            model=tiny_tli, output=str(tmp_path / "out"), data_file=train_file, eval_data_file=held_file,
            seq_len=32, micro_batch=2, accum=1, steps=4, lr=3e-3, warmup=2, min_lr_ratio=0.1, eval_every=0,
            eval_tokens=256, progress=False, threads=2,
        )  # fmt: skip
        values.update(overrides)
        return TrainConfig(**values)

    return make


def _cosine(step: int, start: int, end: int, frm: float, floor: float = 0.1) -> float:
    return floor + (frm - floor) * 0.5 * (1 + math.cos(math.pi * (step - start) / (end - start)))


def test_a_finished_run_is_extended_at_the_floor(cfg):
    first = train(cfg())
    assert first.history[-1]["step"] == 4
    with pytest.raises(ValueError, match=r"steps: 4 -> 7.*--resume --extend-to 7"):
        train(cfg(steps=7, resume=True))
    extended = train(cfg(resume=True, extend_to=7))
    assert [h["step"] for h in extended.history] == list(range(1, 8))
    assert extended.history[:4] == first.history  # the saved steps are kept as they were
    # the finished run stood at the floor (0.1 x lr): its extension stays there
    assert [h["lr"] for h in extended.history[4:]] == pytest.approx([3e-4] * 3, rel=1e-6)
    assert extended.checkpoint.endswith("step-000007") and extended.evals[-1]["step"] == 7
    with pytest.raises(ValueError, match="already done 7 of 7 steps"):
        train(cfg(resume=True, extend_to=7))
    with pytest.raises(ValueError, match="planned for 7 steps; extend it past that"):
        train(cfg(resume=True, extend_to=6))


def test_a_stopped_run_is_extended_by_stretching_its_decay_and_resumes_exactly(cfg, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(cfg(output=a, stop_after=2))  # stopped at the peak (warm-up 2): the factor stands at 1
    straight = train(cfg(output=a, resume=True, extend_to=8))
    expected = [_cosine(s, 2, 8, 1.0) * 3e-3 for s in range(2, 8)]  # entry k+1 trained with the factor of step k
    assert [h["lr"] for h in straight.history[2:]] == pytest.approx(expected, rel=1e-6)

    train(cfg(output=b, stop_after=2))
    train(cfg(output=b, resume=True, extend_to=8, stop_after=5))  # the extension interrupted ...
    resumed = train(cfg(output=b, resume=True, extend_to=8))  # ... and resumed with the same command
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history], abs=1e-6)
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in straight.history], rel=1e-9)


def test_cli_extend_to(token_files, tiny_tli, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["train", tiny_tli, "--steps", "2", "-o", out, *_flags(token_files)]) == 0
    assert main(["train", tiny_tli, "--steps", "3", "--resume", "-o", out, *_flags(token_files)]) == 1
    assert "--resume --extend-to 3" in capsys.readouterr().err
    assert main(["train", tiny_tli, "--resume", "--extend-to", "3", "-o", out, *_flags(token_files)]) == 0
    assert "step-000003" in capsys.readouterr().out
    assert main(["train", tiny_tli, "--extend-to", "4", "-o", out, *_flags(token_files)]) == 1
    assert "--extend-to 4: continues a saved run, so it needs --resume" in capsys.readouterr().err


def test_train_refuses_alpha_with_the_identity_init(cfg, tiny_source):
    with pytest.raises(ValueError, match="--alpha 0.25 has no effect with --init zero"):
        train(cfg(model=tiny_source, method="tli", method_options={"k": 2, "init": "zero", "alpha": 0.25}))


def test_kernels_on_a_cpu_are_refused_outside_the_interpreter(cfg, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="--kernels: the tli Triton kernels need a CUDA device, and this run is on"):
        train(cfg(kernels=True, device="cpu"))


def test_train_refuses_a_dus_that_shrinks_the_model_without_allow_shrink(cfg, tiny_source):
    shrinking = dict(model=tiny_source, method="dus", method_options={"m": 3}, steps=1, output=None)
    with pytest.raises(ValueError, match="the output has 2 layers, fewer than the source's 4.*--allow-shrink"):
        train(cfg(**shrinking))
    assert train(cfg(**shrinking, allow_shrink=True)).steps_done == 1
