"""One writer per output folder: a second `tli upscale` of the same DST (fresh, --resume, or the same
--part) is refused at once, naming the holder; a crashed holder leaves no stale lock; --overwrite
keeps the folder (and so its lock); a .partial another process replaced is never renamed into place.
The racing runs themselves are measured by benchmarks/race_writers.py (not a unit test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tli_kernels.checkpoint import executor_native
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import INCOMPLETE_MARKER, CheckpointLayout
from tli_kernels.checkpoint.outdir import OutputDir
from tli_kernels.checkpoint.synthetic import llama_config, write_checkpoint
from tli_kernels.methods import CommonOptions
from tli_kernels.upscale import upscale

ENGINES = ["native", "python"] if executor_native.available() else ["python"]
COMMON = CommonOptions(shard_size=400_000, dtype="fp16")
OPTIONS = dict(k=2, init="average", alpha=0.5)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lock") / "src")
    config = llama_config(
        "llama-3.2-1b", hidden_size=64, intermediate_size=176, num_hidden_layers=6, vocab_size=500, head_dim=16
    )
    write_checkpoint(path, config, num_shards=2)
    return path


def run(src, dst, **kw):
    return upscale(src, dst, "tli", common=COMMON, options=OPTIONS, **kw)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("how", ["fresh", "resume"])
def test_a_second_writer_is_refused_naming_the_holder(tmp_path, src, engine, how):
    dst = str(tmp_path / "out")
    if how == "resume":  # an interrupted folder: one part written, then two --resume runs (a retried job)
        run(src, dst, part="1/2", engine=engine)
    else:
        os.mkdir(dst)
    before = sorted(os.listdir(dst))
    with OutputDir(dst) as holder:
        holder.lock()
        with pytest.raises(CheckpointError) as info:
            run(src, dst, engine=engine, resume=how == "resume")
        message = str(info.value)
        assert message.startswith(f"{os.path.abspath(dst)}: is being written by process {os.getpid()}"), message
        assert "one writer per output folder" in message
        assert sorted(os.listdir(dst)) == before  # the refused run wrote nothing
    r = run(src, dst, engine=engine, resume=how == "resume")  # the lock went with its holder
    assert r.finished and CheckpointLayout.open(dst).num_layers == 9


def test_a_crashed_holder_leaves_no_stale_lock(tmp_path, src):
    dst = str(tmp_path / "out")
    os.mkdir(dst)
    code = (
        "import sys; from tli_kernels.checkpoint.outdir import OutputDir; d = OutputDir(sys.argv[1]); d.lock(); "
        "print('locked', flush=True); sys.stdin.read()"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    holder = subprocess.Popen([sys.executable, "-c", code, dst], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(CheckpointError, match=rf"being written by process {holder.pid}: .*OutputDir"):
            run(src, dst, engine="python")
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
        holder.wait()
    assert run(src, dst, engine="python").finished


@pytest.mark.parametrize("engine", ENGINES)
def test_parts_share_the_folder_but_not_their_shards(tmp_path, src, engine):
    dst = str(tmp_path / "out")
    run(src, dst, part="1/2", engine=engine)  # creates the folder and its marker
    first = run(src, dst, part="1/2", engine=engine, dry_run=True).plan.shards
    with OutputDir(dst) as other:
        other.lock(shared=True)  # another part is running ...
        fd = other.lock_shards([0], [first[0].file])  # ... and holds shard 0 (part 1 of 2)
        try:
            with pytest.raises(CheckpointError, match=rf"shard {first[0].file} is being written by another --part"):
                run(src, dst, part="1/2", engine=engine)
            r = run(src, dst, part="2/2", engine=engine)  # a different part runs alongside
            assert r.shards_written and 0 not in r.shards_written
            with pytest.raises(CheckpointError, match="is being written by process"):
                run(src, dst, resume=True, engine=engine)  # a whole run waits for every part
        finally:
            os.close(fd)
    assert run(src, dst, resume=True, engine=engine).finished
    assert INCOMPLETE_MARKER not in os.listdir(dst) and ".tli-shards" not in os.listdir(dst)


def test_overwrite_keeps_the_locked_folder(tmp_path, src):
    dst = str(tmp_path / "out")
    run(src, dst, engine="python")
    inode = os.stat(dst).st_ino
    run(src, dst, engine="python", overwrite=True)
    assert os.stat(dst).st_ino == inode  # emptied in place, never removed and made again (unlocked)


def test_a_refused_fresh_run_leaves_no_folder(tmp_path, src, monkeypatch):
    from tli_kernels.checkpoint import output

    dst = str(tmp_path / "out")

    def no_disk(*a, **k):
        raise ValueError("not enough free disk (test)")

    monkeypatch.setattr(output, "check_free_disk", no_disk)
    with pytest.raises(ValueError, match="free disk"):
        run(src, dst, engine="python")
    assert not os.path.exists(dst)


def test_a_replaced_partial_is_never_renamed_into_place(tmp_path, src):
    """The Python engine checks, before renaming NAME.partial, that it is still the file it wrote."""
    from tli_kernels.checkpoint import executor_python

    dst = str(tmp_path / "out")
    planted = []
    real_write = executor_python._write_tensor

    def write_then_replace(t, fd, pos, *args, **kw):
        real_write(t, fd, pos, *args, **kw)
        if not planted:  # another process swaps its own file in under the name this run writes
            for name in os.listdir(dst):
                if name.endswith(".partial"):
                    os.unlink(os.path.join(dst, name))
                    with open(os.path.join(dst, name), "wb") as f:
                        f.write(b"theirs")
                    planted.append(name)

    executor_python._write_tensor = write_then_replace
    try:
        with pytest.raises(CheckpointError, match=r"\.partial: was replaced by another process"):
            run(src, dst, engine="python")
    finally:
        executor_python._write_tensor = real_write
    assert planted and open(os.path.join(dst, planted[0]), "rb").read() == b"theirs"  # not removed either
    assert planted[0][: -len(".partial")] not in os.listdir(dst)
