"""Kill `tli upscale` (SIGKILL, SIGINT) at random points, then --resume: the result is the same bytes
as an uninterrupted run, and until then nothing incomplete passes for complete.

The native engine sleeps after each write chunk when TLI_NATIVE_TEST_CHUNK_DELAY_US is set, so a
small checkpoint takes about a second and the kills land in the middle of shards.
"""

from __future__ import annotations

import filecmp
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import tree_digest
from tli_kernels.checkpoint import executor_native
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import CONFIG_NAME, INCOMPLETE_MARKER, CheckpointLayout
from tli_kernels.checkpoint.synthetic import llama_config, write_checkpoint
from tli_kernels.methods import CommonOptions
from tli_kernels.upscale import upscale

pytestmark = pytest.mark.skipif(not executor_native.available(), reason="native engine not built")

ARGS = ["--method", "tli", "--k", "2", "--init", "average", "--alpha", "0.5", "--shard-size", "1MB", "--quiet"]
OPTIONS = dict(k=2, init="average", alpha=0.5)
SHARD_SIZE = 1_000_000
TRIALS = int(os.environ.get("TLI_INTERRUPT_TRIALS", "3"))  # per signal


@pytest.fixture(scope="module")
def source_and_reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("interrupt")
    src = str(base / "src")
    config = llama_config(
        "llama-3.2-1b", hidden_size=128, intermediate_size=352, num_hidden_layers=8, vocab_size=1000, head_dim=16
    )
    write_checkpoint(src, config, num_shards=2)
    ref = str(base / "ref")
    upscale(src, ref, "tli", common=CommonOptions(shard_size=SHARD_SIZE), options=OPTIONS)
    return src, ref


def start(src: str, dst: str, *extra: str, delay_us: int = 15_000) -> subprocess.Popen:
    env = {**os.environ, executor_native.TEST_DELAY_ENV: str(delay_us)}
    cmd = [sys.executable, "-m", "tli_kernels.cli.main", "upscale", src, dst, *ARGS, *extra]
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT: give the
    # child the default disposition so it installs its KeyboardInterrupt handler however we were run.
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def interrupt(proc: subprocess.Popen, dst: str, sig: int, rng: random.Random) -> tuple[int, str]:
    """Wait until the run has begun writing, then send sig after a random delay."""
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(dst, INCOMPLETE_MARKER)) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 1.2))
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def partials(dst: str) -> list[str]:
    return [n for n in os.listdir(dst) if n.endswith(".partial")] if os.path.isdir(dst) else []


def assert_not_passing_for_complete(dst: str, ref: str) -> None:
    if not os.path.exists(os.path.join(dst, INCOMPLETE_MARKER)):  # the kill came after the very end
        assert_identical(dst, ref)
        return
    with pytest.raises(CheckpointError, match="unfinished tli output"):
        CheckpointLayout.open(dst)
    if os.path.exists(os.path.join(dst, CONFIG_NAME)):
        # finish() writes config.json after every shard and the index: all of them must be complete
        for name in os.listdir(ref):
            if name.endswith(".safetensors") or name.endswith(".index.json"):
                assert filecmp.cmp(os.path.join(dst, name), os.path.join(ref, name), shallow=False), name
    for name in os.listdir(dst):
        if name.endswith(".safetensors"):  # a shard under its final name is a complete shard
            assert filecmp.cmp(os.path.join(dst, name), os.path.join(ref, name), shallow=False), name


def assert_identical(dst: str, ref: str) -> None:
    assert sorted(os.listdir(dst)) == sorted(os.listdir(ref))
    for name in os.listdir(ref):
        assert filecmp.cmp(os.path.join(dst, name), os.path.join(ref, name), shallow=False), name


def resume(src: str, dst: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tli_kernels.cli.main", "upscale", src, dst, *ARGS, "--resume"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_kill_at_random_points_then_resume(tmp_path, source_and_reference, sig):
    src, ref = source_and_reference
    before = tree_digest(src)
    rng = random.Random(1000 + sig)
    for trial in range(TRIALS):
        dst = str(tmp_path / f"out{trial}")
        code, err = interrupt(start(src, dst), dst, sig, rng)
        if sig == signal.SIGINT and code != 0:
            assert code == 130, err
            assert "interrupted" in err and "Traceback" not in err
            # Ctrl-C removes the engine's unfinished files before exiting
            assert not partials(dst)
        assert_not_passing_for_complete(dst, ref)
        if os.path.exists(os.path.join(dst, INCOMPLETE_MARKER)):
            # a second interruption, during the resume itself, then the final resume
            code, _ = interrupt(start(src, dst, "--resume"), dst, sig, rng)
            assert_not_passing_for_complete(dst, ref)
            if os.path.exists(os.path.join(dst, INCOMPLETE_MARKER)):
                resume(src, dst)
        assert_identical(dst, ref)
    assert tree_digest(src) == before


def test_sigint_stops_promptly(tmp_path, source_and_reference):
    src, _ = source_and_reference
    dst = str(tmp_path / "out")
    proc = start(src, dst, delay_us=200_000)  # 0.2 s per chunk: minutes in total
    deadline = time.monotonic() + 60
    while not partials(dst):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 1.5  # one chunk in flight per thread, plus the 0.1 s poll
    assert not partials(dst)


def test_incomplete_output_is_refused_by_transformers(tmp_path, source_and_reference):
    src, _ = source_and_reference
    dst = str(tmp_path / "out")
    code, _ = interrupt(start(src, dst), dst, signal.SIGKILL, random.Random(7))
    assert code == -signal.SIGKILL
    assert not os.path.exists(os.path.join(dst, CONFIG_NAME))
    from transformers import AutoConfig

    with pytest.raises((OSError, ValueError)):
        AutoConfig.from_pretrained(dst)
