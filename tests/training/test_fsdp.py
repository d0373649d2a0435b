"""FSDP2 under torchrun: two gloo processes on the CPU follow the single-process loss curve (same
windows per step: 2 ranks x 2 windows = 1 process x 2 micro-steps x 2 windows), save a checkpoint
stock transformers loads, and resume from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tli_kernels.training.trainer import TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _torchrun(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tli_kernels.cli.main", "train", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_and_resume(token_files, tiny_tli, tmp_path):
    train_file, held_file = token_files
    common = dict(data_file=train_file, eval_data_file=held_file, seq_len=32, micro_batch=2, steps=8, lr=3e-3,
                  warmup=2, eval_every=2, eval_tokens=512, learnable_alpha=True)  # fmt: skip
    single = train(TrainConfig(model=tiny_tli, output=str(tmp_path / "one"), accum=2, progress=False, **common))

    flags = []
    for k, v in common.items():
        flag = "--" + k.replace("_file", "").replace("_", "-")
        flags += [flag] if v is True else [flag, str(v)]
    out = str(tmp_path / "two")
    _torchrun([tiny_tli, "-o", out, "--accum", "1", "--stop-after", "4", "--quiet", *flags])
    _torchrun([tiny_tli, "-o", out, "--accum", "1", "--resume", "--quiet", *flags])

    history = json.load(open(os.path.join(out, "history.json")))
    assert [h["loss"] for h in history["steps"]] == pytest.approx([h["loss"] for h in single.history], abs=1e-5)
    assert [e["heldout_loss"] for e in history["evals"]] == pytest.approx(
        [e["heldout_loss"] for e in single.evals], abs=1e-5
    )
    a = load_file(os.path.join(single.checkpoint, "model.safetensors"))
    b = load_file(os.path.join(out, "step-000008", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    training = json.load(open(os.path.join(out, "step-000008", "tli_training.json")))
    assert training["world_size"] == 2


def _flags(values: dict) -> list[str]:
    flags = []
    for k, v in values.items():
        flag = "--" + k.replace("_file", "").replace("_", "-")
        flags += [flag] if v is True else [flag, str(v)]
    return flags


@pytest.mark.slow
def test_two_ranks_upscale_on_load_then_resume_on_one_process(token_files, tmp_path):
    """2 gloo ranks read only their rows straight from the source (--method tli), save DCP + export;
    one process resumes that checkpoint (DCP reshards 2 -> 1) and ends where a one-process run ends.
    The source has tied embeddings, which must stay one parameter through meta build and FSDP2."""
    from tests.helpers import save_tiny_llama

    tiny_source = save_tiny_llama(str(tmp_path / "tied"), layers=4, dtype=torch.float32, tie=True, shard=None)
    train_file, held_file = token_files
    common = dict(data_file=train_file, eval_data_file=held_file, seq_len=32, micro_batch=2, global_batch=4, steps=8,
                  lr=3e-3, warmup=2, eval_every=4, eval_tokens=256, learnable_alpha=True)  # fmt: skip
    method = dict(method="tli", k=2, init="copy", alpha=0.5)
    options = {"k": 2, "init": "copy", "alpha": 0.5}
    one = str(tmp_path / "one")
    first = train(TrainConfig(model=tiny_source, method="tli", method_options=options, output=one, stop_after=4,
                              progress=False, **common))  # fmt: skip
    whole = train(TrainConfig(model=tiny_source, method="tli", method_options=options, output=one, resume=True,
                              progress=False, **common))  # fmt: skip

    two = str(tmp_path / "two")
    _torchrun([tiny_source, "-o", two, "--stop-after", "4", "--quiet", *_flags(method), *_flags(common)])
    history = json.load(open(os.path.join(two, "history.json")))
    assert [h["loss"] for h in history["steps"]] == pytest.approx([h["loss"] for h in first.history], abs=1e-5)
    # the export written row by row from two ranks equals the one-process export
    a = load_file(os.path.join(first.checkpoint, "model.safetensors"))
    b = load_file(os.path.join(two, "step-000004", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    manifest = json.load(open(os.path.join(two, "step-000004", "tli_checkpoint.json")))
    assert {"state/__0_0.distcp", "state/__1_0.distcp", "state/.metadata"} <= set(manifest["files"])
    assert "lm_head.weight" not in b  # tied: one tensor, as the source stores it

    resumed = train(TrainConfig(model=tiny_source, method="tli", method_options=options, output=two, resume=True,
                                progress=False, **common))  # fmt: skip
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], abs=1e-5)
    a = load_file(os.path.join(whole.checkpoint, "model.safetensors"))
    b = load_file(os.path.join(resumed.checkpoint, "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_world_size_that_does_not_divide_the_global_batch_is_refused(token_files, tiny_tli, tmp_path):
    train_file, held_file = token_files
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tli_kernels.cli.main", "train", tiny_tli, "-o", str(tmp_path / "o"), "--data", train_file,
           "--eval-data", held_file, "--global-batch", "3", "--micro-batch", "1", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "tli: error: --global-batch 3: not divisible by --micro-batch 1 x world size 2" in proc.stderr
    assert not os.path.exists(tmp_path / "o")
