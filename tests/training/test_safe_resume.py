"""--resume reads nothing it should not: no code from a checkpoint's pickled DCP metadata or values
(even with its manifest entry updated to match), and no file the manifest does not list."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil

import pytest
import torch

from tli_kernels.training import checkpoints
from tli_kernels.training.safe_dcp import UnsafeCheckpointError, WeightsOnlyLoadPlanner, load_metadata
from tli_kernels.training.trainer import train


@pytest.fixture
def cfg(train_config):
    return train_config


class _Plant:
    """Unpickling this calls os.mkdir(marker): proof that code from the checkpoint ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _relist(ckpt: str, name: str) -> None:
    """Update name's manifest entry to its new content, as whoever planted it would."""
    path = os.path.join(ckpt, checkpoints.MANIFEST_FILE)
    manifest = json.load(open(path))
    target = os.path.join(ckpt, name)
    manifest["files"][name] = {"size": os.path.getsize(target), "sha256": checkpoints.file_sha256(target)}
    json.dump(manifest, open(path, "w"))


def _stopped_run(cfg, tmp_path) -> tuple[str, str]:
    out = str(tmp_path / "out")
    train(cfg(output=out, stop_after=2))
    return out, checkpoints.latest_checkpoint(out)


def test_a_pickle_planted_in_the_dcp_metadata_never_runs(cfg, tmp_path):
    out, ckpt = _stopped_run(cfg, tmp_path)
    marker = str(tmp_path / "PWNED")
    name = f"{checkpoints.STATE_DIR}/.metadata"
    with open(os.path.join(ckpt, name), "wb") as f:
        pickle.dump(_Plant(marker), f)
    _relist(ckpt, name)
    with pytest.raises(ValueError, match=r"posix\.mkdir, which is not part of a DCP checkpoint's metadata"):
        train(cfg(output=out, resume=True))
    assert not os.path.exists(marker)


def test_a_pickle_wrapped_inside_real_metadata_never_runs(cfg, tmp_path):
    """The payload hidden in a field of a genuine Metadata object (planner_data) is refused too."""
    out, ckpt = _stopped_run(cfg, tmp_path)
    marker = str(tmp_path / "PWNED")
    name = f"{checkpoints.STATE_DIR}/.metadata"
    path = os.path.join(ckpt, name)
    with open(path, "rb") as f:
        metadata = pickle.load(f)  # our own, trusted file, in the test
    metadata.planner_data = {"x": _Plant(marker)}
    with open(path, "wb") as f:
        pickle.dump(metadata, f)
    _relist(ckpt, name)
    with pytest.raises(ValueError, match="not part of a DCP checkpoint's metadata"):
        train(cfg(output=out, resume=True))
    assert not os.path.exists(marker)


def test_a_pickled_non_tensor_value_never_runs(tmp_path):
    """DCP's own planner reads non-tensor values with torch.load(weights_only=False); ours does not."""
    marker = str(tmp_path / "PWNED")
    buf = io.BytesIO()
    torch.save(_Plant(marker), buf)
    buf.seek(0)

    class Item:
        class dest_index:
            fqn = "optim.param_groups.0.lr"

    planner = WeightsOnlyLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}
    with pytest.raises(UnsafeCheckpointError, match="optim.param_groups.0.lr"):
        planner.load_bytes(Item, buf)
    assert not os.path.exists(marker)


def test_metadata_pointing_outside_the_listed_files_is_refused(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    md = Metadata(state_dict_metadata={}, storage_data={MetadataIndex("w"): _StorageInfo("../../etc/passwd", 0, 9)})
    with pytest.raises(UnsafeCheckpointError, match="'../../etc/passwd', a file the checkpoint's manifest"):
        load_metadata(pickle.dumps(md), "state/.metadata", {"__0_0.distcp"})
    with pytest.raises(ValueError, match="not a DCP checkpoint's metadata"):
        load_metadata(b"\x80\x05garbage", "state/.metadata", set())


def test_a_foreign_unlisted_shard_is_refused(cfg, tmp_path):
    """Another run's shard copied in with its manifest entry dropped: refused, naming the file."""
    out, ckpt = _stopped_run(cfg, tmp_path)
    other_out = str(tmp_path / "other")
    train(cfg(output=other_out, stop_after=2, lr=1e-2))
    other = checkpoints.latest_checkpoint(other_out)
    shard = f"{checkpoints.STATE_DIR}/__0_0.distcp"
    shutil.copyfile(os.path.join(other, shard), os.path.join(ckpt, shard))
    path = os.path.join(ckpt, checkpoints.MANIFEST_FILE)
    manifest = json.load(open(path))
    del manifest["files"][shard]
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ValueError, match=r"__0_0\.distcp: not listed in .*tli_checkpoint\.json"):
        train(cfg(output=out, resume=True))


def test_an_extra_file_or_link_in_a_checkpoint_is_refused(cfg, tmp_path):
    out, ckpt = _stopped_run(cfg, tmp_path)
    extra = os.path.join(ckpt, checkpoints.STATE_DIR, "__1_0.distcp")
    with open(extra, "wb") as f:
        f.write(b"x" * 10)
    with pytest.raises(ValueError, match=r"__1_0\.distcp: not listed"):
        train(cfg(output=out, resume=True))
    os.unlink(extra)
    os.symlink("/etc/hostname", extra)
    with pytest.raises(ValueError, match=r"__1_0\.distcp: not a regular file"):
        train(cfg(output=out, resume=True))
    os.unlink(extra)
    result = train(cfg(output=out, resume=True))  # the untouched checkpoint still resumes
    assert result.steps_done == 4 and len(result.history) == 4


def test_a_second_run_in_one_output_folder_is_refused(cfg, tmp_path):
    from tli_kernels.checkpoint.errors import CheckpointError
    from tli_kernels.checkpoint.outdir import OutputDir

    out = tmp_path / "out"
    out.mkdir()
    with OutputDir(str(out)) as holder:
        holder.lock()
        with pytest.raises(CheckpointError, match=rf"{out}: is being written by process {os.getpid()}"):
            train(cfg(output=str(out)))
    assert os.listdir(out) == []
