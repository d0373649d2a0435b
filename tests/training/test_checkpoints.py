"""Upscale on load against upscale-then-train, the sharded (DCP) checkpoints and their checksums, the
Hugging Face export, and `tli train`'s refusals of bad options, data, provenance and checkpoints."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tli_kernels.cli.main import main
from tli_kernels.training import checkpoints
from tli_kernels.training.trainer import TrainConfig, train
from tli_kernels.upscale import upscale

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TLI = {"k": 2, "init": "copy", "alpha": 0.5}


@pytest.fixture
def cfg(train_config):
    def make(**overrides) -> TrainConfig:  # 10 steps with accumulation and periodic evaluation
        return train_config(**{"accum": 2, "steps": 10, "warmup": 2, "eval_every": 5, "eval_tokens": 256, **overrides})

    return make


def test_upscale_on_load_trains_like_upscale_to_disk_then_train(cfg, tiny_source, tmp_path):
    from transformers import AutoModelForCausalLM

    on_disk = str(tmp_path / "upscaled")
    upscale(tiny_source, on_disk, "tli", options=dict(TLI))
    a = train(cfg(output=str(tmp_path / "a"), learnable_alpha=True))  # SRC --method tli: nothing written first
    b = train(cfg(model=on_disk, method=None, method_options={}, output=str(tmp_path / "b"), learnable_alpha=True))
    assert len(a.history) == 10
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], abs=1e-6)
    assert [e["heldout_loss"] for e in a.evals] == pytest.approx([e["heldout_loss"] for e in b.evals], abs=1e-6)
    # both exports are the same plain checkpoint (alpha folded) that stock transformers loads
    wa, wb = (
        load_file(os.path.join(a.checkpoint, "model.safetensors")),
        load_file(os.path.join(b.checkpoint, "model.safetensors")),
    )
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(a.checkpoint)
    assert model.config.num_hidden_layers == 6
    provenance = json.load(open(os.path.join(a.checkpoint, "tli_provenance.json")))
    assert provenance["injected_layers"] == [2, 5] and provenance["trained_steps"] == 10
    assert provenance["method"] == "tli" and provenance["options"]["alpha"] == 0.5
    assert not os.path.exists(os.path.join(a.checkpoint, ".tli-incomplete.json"))
    training = json.load(open(os.path.join(a.checkpoint, "tli_training.json")))
    assert training["upscaled_on_load"] is True and training["method_options"] == TLI


def _damage_and_resume(cfg, tmp_path, damage) -> str:
    out = str(tmp_path / "damaged")
    train(cfg(output=out, steps=4, stop_after=2))
    ckpt = checkpoints.latest_checkpoint(out)
    damage(ckpt)
    with pytest.raises(ValueError) as info:
        train(cfg(output=out, steps=4, resume=True))
    return str(info.value)


def test_a_zeroed_checkpoint_of_the_right_size_is_refused(cfg, tmp_path):
    def zero(ckpt):
        shard = os.path.join(ckpt, checkpoints.STATE_DIR, "__0_0.distcp")
        size = os.path.getsize(shard)
        with open(shard, "r+b") as f:
            f.write(b"\0" * size)

    message = _damage_and_resume(cfg, tmp_path, zero)
    assert "__0_0.distcp" in message and "sha256" in message


@pytest.mark.parametrize("content", [b"", b"garbage \x00\xff", b"[]"])
def test_a_damaged_training_state_is_refused(cfg, tmp_path, content):
    def spoil(ckpt):
        with open(os.path.join(ckpt, checkpoints.STATE_FILE), "wb") as f:
            f.write(content)

    assert checkpoints.STATE_FILE in _damage_and_resume(cfg, tmp_path, spoil)


def test_a_damaged_manifest_is_refused(cfg, tmp_path):
    def spoil(ckpt):
        with open(os.path.join(ckpt, checkpoints.MANIFEST_FILE), "w") as f:
            f.write('{"format": "tli-training-checkpoint/2", "files": []}')

    assert checkpoints.MANIFEST_FILE in _damage_and_resume(cfg, tmp_path, spoil)


def test_resume_refuses_another_model(cfg, tmp_path):
    out = str(tmp_path / "o")
    train(cfg(output=out, steps=4, stop_after=2))
    with pytest.raises(ValueError, match="alpha"):  # a different plan is a different trajectory
        train(cfg(output=out, steps=4, resume=True, method_options={**TLI, "alpha": 0.25}))


def _cli(args: list[str], *, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tli_kernels.cli.main", "train", *args],
        env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit if limit_bytes else None,
    )  # fmt: skip


def _train_flags(token_files) -> list[str]:
    train_file, held_file = token_files
    return ["--data", train_file, "--eval-data", held_file, "--seq-len", "16", "--eval-tokens", "64",
            "--micro-batch", "2", "--threads", "1", "--quiet"]  # fmt: skip


def test_a_file_size_limit_while_saving_leaves_nothing_resume_accepts(token_files, tiny_tli, tmp_path):
    """Writes fail mid-save (EFBIG, as on a full quota): one line, rc 1, no checkpoint --resume takes."""
    out = str(tmp_path / "out")
    done = _cli([tiny_tli, "-o", out, "--steps", "2", *_train_flags(token_files)], limit_bytes=400_000)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tli: error: ") and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert out in last
    assert checkpoints.latest_checkpoint(out) is None
    assert not any(n.startswith("step-") and not n.endswith(".tmp") for n in os.listdir(out))
    resumed = _cli([tiny_tli, "-o", out, "--steps", "2", "--resume", *_train_flags(token_files)])
    assert resumed.returncode == 1 and "no complete checkpoint" in resumed.stderr


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_while_saving(token_files, tiny_tli, small_tmpfs, capsys):
    out = os.path.join(small_tmpfs, "out")
    assert main(["train", tiny_tli, "-o", out, "--steps", "2", *_train_flags(token_files)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tli: error: ") and "No space left" in err and out in err, err
    assert checkpoints.latest_checkpoint(out) is None
    assert [n for n in os.listdir(out) if n.startswith("step-")] == []  # the partial save was removed


@pytest.mark.parametrize(
    "flag,message",
    [
        (["--lr=inf"], "--lr inf: must be a finite number"),
        (["--lr=1e39"], "--lr 1e+39: must be a finite number (float32)"),
        (["--lr=0"], "--lr 0.0: must be greater than 0"),
        (["--max-grad-norm=nan"], "--max-grad-norm nan: must be a finite number"),
        (["--weight-decay=nan"], "--weight-decay nan: must be a finite number"),
        (["--weight-decay=-1"], "--weight-decay -1.0: must be at least 0"),
        (["--min-lr-ratio=2"], "--min-lr-ratio 2.0: must be at most 1"),
        (["--beta2=1"], "--beta2 1.0: must be less than 1"),
        (["--alpha-lr=-inf"], "--alpha-lr -inf: must be a finite number"),
        (["--threads=-1"], "--threads -1: must be an integer of at least 1"),
        (["--seq-len=1"], "--seq-len 1: must be at least 2"),
        (["--warmup=-3"], "--warmup -3: must be at least 0"),
        (["--global-batch=3"], "--global-batch 3: not divisible by --micro-batch 2 x world size 1"),
        (["--heldout-fraction=0.9"], "--heldout-fraction 0.9: must be at most 0.5"),
        (["--k=2"], "--k: give --method as well"),
        (["--method", "dus", "--k=2"], "--k does not apply to --method dus"),
    ],
)
def test_bad_options_are_refused_before_loading(token_files, tmp_path, flag, message, capsys, monkeypatch):
    import tli_kernels.training.trainer as trainer

    monkeypatch.setattr(trainer, "open_source", lambda *a, **k: pytest.fail("loaded before checking options"))
    args = ["train", str(tmp_path), "-o", str(tmp_path / "o"), *_train_flags(token_files), "--micro-batch", "2"]
    assert main([*args, *flag]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tli: error: {message}"), err
    assert not os.path.exists(tmp_path / "o")


def test_an_unwritable_output_is_refused_at_start(token_files, tiny_tli, tmp_path, capsys, monkeypatch):
    import tli_kernels.training.trainer as trainer

    monkeypatch.setattr(trainer, "open_source", lambda *a, **k: pytest.fail("loaded before checking -o"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", tiny_tli, "-o", str(blocker / "out"), *_train_flags(token_files)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tli: error: --output {blocker / 'out'}: not writable"), err


def test_token_ids_outside_the_vocabulary_are_named(token_files, tiny_tli, tmp_path, capsys):
    for bad in (128, -1):
        ids = np.arange(400) % 100
        ids[77] = bad
        path = str(tmp_path / f"bad{bad}.npy")
        np.save(path, ids)
        args = ["train", tiny_tli, *_train_flags(token_files), "--data", path]
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert (
            err
            == f"tli: error: --data {path}: token id {bad} at position 77 is outside the model's vocabulary [0, 128)"
        )


def test_provenance_problems_are_named(token_files, tiny_tli, tmp_path, capsys):
    model = shutil.copytree(tiny_tli, tmp_path / "m")
    prov = model / "tli_provenance.json"
    prov.write_text("[]")
    assert main(["train", str(model), *_train_flags(token_files)]) == 1
    assert f"{prov}: provenance is a JSON array, not an object" in capsys.readouterr().err
    prov.write_text(json.dumps({"injected_layers": [2, 99]}))
    assert main(["train", str(model), "--train", "injected", *_train_flags(token_files)]) == 1
    assert f"{prov}: names injected layer 99, but the model has 6 layers" in capsys.readouterr().err


def test_quiet_prints_no_progress_bars(token_files, tiny_tli, tmp_path):
    done = _cli([tiny_tli, "-o", str(tmp_path / "o"), "--steps", "1", *_train_flags(token_files)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "%|" not in done.stderr and "Loading" not in done.stderr, done.stderr
