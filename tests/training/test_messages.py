"""Issue 20, the internal errors and unclear messages of `tli train`, one test per cause: JSONL with
a lone \\ud800 escape; an edited training_state.json (step -3, rng {}, a scheduler of another step);
--alpha 1e40 (refused up front, as `tli upscale` does); text with no line break, where raising
--heldout-fraction cannot help."""

from __future__ import annotations

import json
import os

import pytest

from tests.training.conftest import documents
from tli_kernels.cli.main import main
from tli_kernels.training import checkpoints
from tli_kernels.training.trainer import train


def one_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("tli: error: "), err
    assert "internal error" not in err[0]
    return err[0]


def test_jsonl_with_a_lone_surrogate_is_named(doc_model, tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": d}) for d in documents(40)]
    lines[3] = '{"text": "broken \\ud800 text"}'
    data.write_text("\n".join(lines) + "\n")
    line = one_line(capsys, ["train", doc_model, "--data", str(data), "-o", str(tmp_path / "o"), "--steps", "1",
                             "--seq-len", "16", "--eval-text", str(data), "--quiet"])  # fmt: skip
    offset = sum(len(x) + 1 for x in lines[:3])
    assert f"--data {data}: line at byte {offset}: field 'text' holds a lone surrogate (\\ud800)" in line, line


def test_text_with_no_line_break_gets_advice_that_can_help(doc_model, tmp_path, capsys):
    data = tmp_path / "one-line.txt"
    data.write_text(" ".join(documents(60)))  # no \n at all
    line = one_line(capsys, ["train", doc_model, "--data", str(data), "-o", str(tmp_path / "o"), "--steps", "1",
                             "--seq-len", "16", "--quiet"])  # fmt: skip
    assert "no line starts in its last half" in line and "--eval-text or --eval-data" in line, line
    assert "raise --heldout-fraction" not in line


def test_alpha_beyond_float32_is_refused_before_loading(token_files, tiny_source, tmp_path, capsys, monkeypatch):
    import tli_kernels.training.trainer as trainer

    monkeypatch.setattr(trainer, "open_source", lambda *a, **k: pytest.fail("loaded before checking options"))
    train_file, _ = token_files
    line = one_line(capsys, ["train", tiny_source, "--method", "tli", "--k", "2", "--alpha", "1e40",
                             "--data", train_file, "-o", str(tmp_path / "o")])  # fmt: skip
    assert line == "tli: error: --alpha 1e+40: must be a finite number (float32)", line


@pytest.fixture
def cfg(train_config):
    return train_config


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.update(step=-3), "step -3, but the checkpoint is step-000002"),
        (lambda s: s.update(step=3), "step 3, but the checkpoint is step-000002"),
        (lambda s: s.update(rng={}), "'rng' is not the random-number state tli saves (KeyError"),
        (lambda s: s["rng"].update(torch="AAAA"), "'rng' is not the random-number state tli saves"),
        (lambda s: s["rng"].update(numpy=["MT19937", "!!", 0, 0, 0.0]), "'rng' is not the random-number state"),
        (lambda s: s["scheduler"].update(last_epoch=7), "'scheduler' is not the learning-rate schedule"),
        (lambda s: s.update(alphas={"x": 1.0}), "alphas entry 'x' is not a layer index"),
        (lambda s: s.update(history=[1, 2]), "'history' holds an entry that is not a step record"),
        (lambda s: s.update(plan_sha256="0" * 64), "its plan differs from the one its manifest records"),
    ],
)
def test_an_edited_training_state_is_refused_naming_it(cfg, tmp_path, edit, message):
    out = str(tmp_path / "out")
    train(cfg(output=out, stop_after=2))
    ckpt = checkpoints.latest_checkpoint(out)
    path = os.path.join(ckpt, checkpoints.STATE_FILE)
    state = json.load(open(path))
    edit(state)
    json.dump(state, open(path, "w"))
    manifest_path = os.path.join(ckpt, checkpoints.MANIFEST_FILE)  # the editor updates the manifest too
    manifest = json.load(open(manifest_path))
    manifest["files"][checkpoints.STATE_FILE] = {"size": os.path.getsize(path), "sha256": checkpoints.file_sha256(path)}
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(ValueError) as info:
        train(cfg(output=out, resume=True))
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value), str(info.value)
