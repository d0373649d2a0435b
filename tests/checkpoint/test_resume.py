"""--resume and --part: finished shards are trusted only when their checksum still matches; parts
run separately (even at the same time, even with different engines) and a final --resume gives
the same bytes as one uninterrupted run."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import pytest

from tli_kernels.checkpoint import executor_native, output
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import INCOMPLETE_MARKER, CheckpointLayout
from tli_kernels.checkpoint.synthetic import llama_config, write_checkpoint
from tli_kernels.methods import CommonOptions
from tli_kernels.upscale import upscale

ENGINES = ["native", "python"] if executor_native.available() else ["python"]
COMMON = CommonOptions(shard_size=400_000, dtype="fp16")
OPTIONS = dict(k=2, init="average", alpha=0.5)


@pytest.fixture(scope="module")
def src_ref(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    src = str(base / "src")
    config = llama_config(
        "llama-3.2-1b", hidden_size=64, intermediate_size=176, num_hidden_layers=6, vocab_size=500, head_dim=16
    )
    write_checkpoint(src, config, num_shards=2)
    ref = str(base / "ref")
    upscale(src, ref, "tli", common=COMMON, options=OPTIONS, engine="python")
    return src, ref


def run(src, dst, **kw):
    return upscale(src, dst, "tli", common=COMMON, options=OPTIONS, **kw)


def assert_identical(dst: str, ref: str) -> None:
    assert sorted(os.listdir(dst)) == sorted(os.listdir(ref))
    for name in os.listdir(ref):
        assert filecmp.cmp(os.path.join(dst, name), os.path.join(ref, name), shallow=False), name


@pytest.mark.parametrize("engine", ENGINES)
def test_parts_then_resume_equal_one_run(tmp_path, src_ref, engine):
    src, ref = src_ref
    dst = str(tmp_path / "out")
    written = []
    for i in (1, 2, 3):
        r = run(src, dst, part=f"{i}/3", engine=engine)
        assert not r.finished and r.shards_written
        written += r.shards_written
        with pytest.raises(CheckpointError, match="unfinished"):
            CheckpointLayout.open(dst)
    assert sorted(written) == list(range(len(r.plan.shards)))
    final = run(src, dst, resume=True, engine=engine)
    assert final.finished and final.shards_written == []
    assert final.shards_verified == list(range(len(r.plan.shards)))
    assert_identical(dst, ref)


def test_resume_writes_the_parts_never_run(tmp_path, src_ref):
    src, ref = src_ref
    dst = str(tmp_path / "out")
    first = run(src, dst, part="1/2")
    dry = run(src, dst, resume=True, dry_run=True)
    assert dry.shards_written == [i for i in range(len(first.plan.shards)) if i not in first.shards_written]
    assert dry.bytes_to_write == sum(first.plan.shards[i].file_size for i in dry.shards_written)
    assert run(src, dst, resume=True).finished
    assert_identical(dst, ref)


def test_parts_with_different_engines(tmp_path, src_ref):
    src, ref = src_ref
    dst = str(tmp_path / "out")
    run(src, dst, part="1/2", engine="python")
    run(src, dst, part="2/2", engine=ENGINES[0])
    run(src, dst, resume=True, engine="python")
    assert_identical(dst, ref)


@pytest.mark.parametrize(
    "damage", ["flip-byte", "truncate", "no-sidecar", "bad-sidecar", "leftover-partial", "other-plan-sidecar"]
)
def test_damaged_finished_shard_is_rewritten(tmp_path, src_ref, damage, capsys):
    src, ref = src_ref
    dst = str(tmp_path / "out")
    part = run(src, dst, part="1/2")
    i = part.shards_written[1]
    shard = os.path.join(dst, part.plan.shards[i].file)
    side = output.sidecar_path(dst, part.plan.shards[i].file)
    if damage == "flip-byte":  # same size, same header: only the checksum can tell
        with open(shard, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            b = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([b[0] ^ 0x01]))
    elif damage == "truncate":
        os.truncate(shard, os.path.getsize(shard) - 10)
    elif damage == "no-sidecar":
        os.unlink(side)
    elif damage == "bad-sidecar":
        with open(side, "w") as f:
            f.write("{not json")
    elif damage == "leftover-partial":  # a killed run's file next to a good one
        with open(shard + ".partial", "wb") as f:
            f.write(b"junk")
    else:
        record = json.load(open(side))
        record["plan_sha256"] = "0" * 64
        json.dump(record, open(side, "w"))
    capsys.readouterr()
    final = run(src, dst, resume=True)
    expect_rewrite = damage != "leftover-partial"
    assert (i in final.shards_written) == expect_rewrite
    if damage == "flip-byte":
        assert "does not match the checksum" in capsys.readouterr().err
    assert_identical(dst, ref)


@pytest.mark.parametrize("verify", ["sample", "full"])
def test_byte_changed_between_samples(tmp_path, src_ref, verify, capsys):
    """Only the full checksum sees one changed byte between the sampled blocks (docs/engine.md)."""
    src, ref = src_ref
    dst = str(tmp_path / "out")
    part = run(src, dst, part="1/2", verify=verify)
    i = max(part.shards_written, key=lambda j: part.plan.shards[j].file_size)
    shard = os.path.join(dst, part.plan.shards[i].file)
    assert os.path.getsize(shard) > 3 * 4096
    middle = os.path.getsize(shard) // 2  # well away from the header, the last block and offset 0 MiB
    with open(shard, "r+b") as f:
        f.seek(middle)
        b = f.read(1)
        f.seek(middle)
        f.write(bytes([b[0] ^ 0x01]))
    capsys.readouterr()
    final = run(src, dst, resume=True)
    if verify == "full":
        assert i in final.shards_written and "does not match" in capsys.readouterr().err
        assert_identical(dst, ref)
    else:
        assert i not in final.shards_written  # the documented blind spot of the sampled checksum


def test_resume_refuses_other_options_and_part_refuses_overwrite(tmp_path, src_ref):
    src, _ = src_ref
    dst = str(tmp_path / "out")
    run(src, dst, part="1/2")
    with pytest.raises(ValueError, match="different options"):
        upscale(src, dst, "tli", common=COMMON, options=dict(k=3), resume=True)
    with pytest.raises(ValueError, match="--overwrite"):
        run(src, dst, part="2/2", overwrite=True)
    assert os.path.exists(os.path.join(dst, INCOMPLETE_MARKER))


def test_concurrent_parts_in_separate_processes(tmp_path, src_ref):
    """Parts as a job array would run them: separate processes, same folder, same time."""
    src, ref = src_ref
    dst = str(tmp_path / "out")
    code = (
        "import sys; from tli_kernels.upscale import upscale; from tli_kernels.methods import CommonOptions; "
        f"upscale({src!r}, {dst!r}, 'tli', common=CommonOptions(shard_size={COMMON.shard_size}, dtype='fp16'), "
        f"options={OPTIONS!r}, part=sys.argv[1])"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, f"{i}/3"], stderr=subprocess.PIPE) for i in (1, 2, 3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert run(src, dst, resume=True).finished
    assert_identical(dst, ref)
