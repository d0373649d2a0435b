"""Corrupt and hostile input for the conversion engine: a clear error naming the cause, a non-zero
exit, the source untouched and nothing in DST that passes for a finished checkpoint.

Covers lying headers and indexes (refused before a byte is written), a source shard that changes
under a running engine, and a full disk (RLIMIT_FSIZE in a subprocess; a small tmpfs when this
test may mount one).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time

import pytest

from tests.helpers import tree_digest
from tli_kernels.checkpoint import executor_native, output
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import CONFIG_NAME, INCOMPLETE_MARKER, CheckpointLayout
from tli_kernels.checkpoint.synthetic import llama_config, write_checkpoint
from tli_kernels.cli.main import main as tli_main
from tli_kernels.methods import CommonOptions
from tli_kernels.upscale import upscale

ENGINES = ["native", "python"] if executor_native.available() else ["python"]
needs_native = pytest.mark.skipif(not executor_native.available(), reason="native engine not built")
TLI = ["--method", "tli", "--k", "2"]
SMALL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, vocab_size=500, head_dim=16)


def make_source(path) -> str:
    write_checkpoint(str(path), llama_config("llama-3.2-1b", **SMALL), num_shards=3)
    return str(path)


def shard_paths(src: str) -> list[str]:
    return sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".safetensors"))


def rewrite_header(path: str, edit) -> None:
    """Apply edit(header dict) and write it back in the same number of bytes (space padded)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        edit(header)
        raw = json.dumps(header, separators=(",", ":")).encode()
        assert len(raw) <= n
        f.seek(8)
        f.write(raw + b" " * (n - len(raw)))


def assert_nothing_passes_for_complete(dst: str) -> None:
    if not os.path.exists(dst):
        return
    assert not os.path.exists(os.path.join(dst, CONFIG_NAME))
    assert not [n for n in os.listdir(dst) if n.endswith(".partial")]
    with pytest.raises(CheckpointError):
        CheckpointLayout.open(dst)


def cli(*argv: str, capsys) -> tuple[int, str]:
    code = tli_main(["upscale", *argv, "--method", "tli", "--k", "2", "--quiet"])
    return code, capsys.readouterr().err


# ---- lying sources: refused before anything is written ----------------------------------------------
def _truncate(src):
    p = shard_paths(src)[1]
    os.truncate(p, os.path.getsize(p) - 100)
    return os.path.basename(p), "truncated"


def _header_too_long(src):
    p = shard_paths(src)[0]
    with open(p, "r+b") as f:
        f.write(struct.pack("<Q", os.path.getsize(p)))
    return os.path.basename(p), "runs past the end"


def _overlap(src):
    p = shard_paths(src)[2]

    def edit(h):
        name = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        h[name]["data_offsets"] = [o - 2 for o in h[name]["data_offsets"]]

    rewrite_header(p, edit)
    return os.path.basename(p), "overlap"


def _index_missing_tensor(src):
    index = os.path.join(src, "model.safetensors.index.json")
    obj = json.load(open(index))
    obj["weight_map"]["model.layers.0.mlp.extra.weight"] = os.path.basename(shard_paths(src)[0])
    json.dump(obj, open(index, "w"))
    return "model.layers.0.mlp.extra.weight", "does not hold it"


def _index_missing_file(src):
    index = os.path.join(src, "model.safetensors.index.json")
    obj = json.load(open(index))
    obj["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    json.dump(obj, open(index, "w"))
    return "model-00009-of-00009.safetensors", "does not exist"


@pytest.mark.parametrize("corrupt", [_truncate, _header_too_long, _overlap, _index_missing_tensor, _index_missing_file])
@pytest.mark.parametrize("engine", ENGINES)
def test_lying_source_refused_before_writing(tmp_path, corrupt, engine, capsys):
    src = make_source(tmp_path / "src")
    culprit, cause = corrupt(src)
    before = tree_digest(src)
    dst = str(tmp_path / "dst")
    code, err = cli(src, dst, "--engine", engine, capsys=capsys)
    assert code == 1 and culprit in err and cause in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(dst)
    assert tree_digest(src) == before


# ---- a source that changes while the engine runs ----------------------------------------------------
def start_slow(src: str, dst: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, executor_native.TEST_DELAY_ENV: "20000"}
    cmd = [sys.executable, "-m", "tli_kernels.cli.main", "upscale", src, dst, *TLI, "--shard-size", "200KB", "--quiet"]
    return subprocess.Popen([*cmd, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_partial(dst: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not (os.path.isdir(dst) and any(n.endswith(".partial") for n in os.listdir(dst))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)


@needs_native
@pytest.mark.parametrize("change", ["grow", "shrink", "rewrite-same-size"])
def test_source_changing_during_run(tmp_path, change):
    src = make_source(tmp_path / "src")
    victim = shard_paths(src)[-1]  # read near the end: the run is well under way when it is needed
    original = open(victim, "rb").read()
    dst = str(tmp_path / "dst")
    proc = start_slow(src, dst)
    wait_for_partial(dst, proc)
    with open(victim, "r+b") as f:
        if change == "grow":
            f.seek(0, os.SEEK_END)
            f.write(b"\0" * 4096)
        elif change == "shrink":
            f.truncate(len(original) - 4096)
        else:
            f.seek(len(original) - 2)
            f.write(b"\x7f\x7f")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert os.path.basename(victim) in err and "during the run" in err and "Traceback" not in err
    assert_nothing_passes_for_complete(dst)
    # Put the source back as it was: --resume still refuses (the file was modified since DST was
    # started, and an edit between the fingerprint's samples cannot be ruled out); --overwrite
    # starts again and gives the right bytes.
    with open(victim, "wb") as f:
        f.write(original)
    ref = str(tmp_path / "ref")
    upscale(src, ref, "tli", common=CommonOptions(shard_size=200_000), options=dict(k=2))
    with pytest.raises(ValueError, match="source changed since"):
        upscale(src, dst, "tli", common=CommonOptions(shard_size=200_000), options=dict(k=2), resume=True)
    assert tli_main(["upscale", src, dst, *TLI, "--shard-size", "200KB", "--quiet", "--overwrite"]) == 0
    assert sorted(os.listdir(ref)) == sorted(os.listdir(dst))
    for name in os.listdir(ref):
        assert open(os.path.join(ref, name), "rb").read() == open(os.path.join(dst, name), "rb").read(), name


# ---- a full disk -----------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_file_size_limit_is_a_clear_error(tmp_path, engine):
    """RLIMIT_FSIZE below the shard size: writes fail with EFBIG like on a full quota."""
    src = make_source(tmp_path / "src")
    before = tree_digest(src)
    dst = str(tmp_path / "dst")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    cmd = [sys.executable, "-m", "tli_kernels.cli.main", "upscale", src, dst, *TLI, "--shard-size", "1MB", "--quiet"]
    done = subprocess.run([*cmd, "--engine", engine], preexec_fn=limit, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "File too large" in done.stderr and ".safetensors" in done.stderr and "Traceback" not in done.stderr
    assert_nothing_passes_for_complete(dst)
    assert tree_digest(src) == before


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_full_disk_checked_up_front(tmp_path, small_tmpfs, engine, capsys):
    src = make_source(tmp_path / "src")
    dst = os.path.join(small_tmpfs, "dst")
    code, err = cli(src, dst, "--engine", engine, capsys=capsys)
    assert code == 1 and "not enough free disk" in err
    assert not os.path.exists(dst)


@pytest.mark.parametrize("engine", ENGINES)
def test_disk_filling_up_mid_run(tmp_path, small_tmpfs, engine, monkeypatch):
    """The free-disk check skipped (as if another writer took the space): ENOSPC mid-run."""
    src = make_source(tmp_path / "src")
    before = tree_digest(src)
    dst = os.path.join(small_tmpfs, "dst")
    monkeypatch.setattr(output, "check_free_disk", lambda *a, **k: None)
    with pytest.raises((OSError, RuntimeError)) as info:
        upscale(src, dst, "tli", common=CommonOptions(shard_size=300_000), options=dict(k=2), engine=engine)
    assert getattr(info.value, "errno", None) == errno.ENOSPC or "No space left" in str(info.value)
    assert ".safetensors" in str(info.value)
    assert_nothing_passes_for_complete(dst)
    assert os.path.exists(os.path.join(dst, INCOMPLETE_MARKER))
    assert tree_digest(src) == before
