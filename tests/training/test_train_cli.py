"""`tli train` as a new user meets it: what it says when nothing will be saved, how a finished run
is extended, which options it refuses."""

from __future__ import annotations

from tli_kernels.cli.main import main
from tli_kernels.training import trainer


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


def test_with_output_there_is_no_warning(token_files, tiny_tli, tmp_path, capsys):
    assert main(["train", tiny_tli, "--steps", "1", "-o", str(tmp_path / "o"), *_flags(token_files)]) == 0
    assert "nothing" not in capsys.readouterr().err
