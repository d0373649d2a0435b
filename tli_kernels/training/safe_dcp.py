"""Reading a DCP checkpoint (torch.distributed.checkpoint) without running code from it.

DCP's own reader unpickles `state/.metadata` with `pickle.load` and every non-tensor value (the
optimizer's param groups) with `torch.load(weights_only=False)`: whoever wrote the checkpoint (a
download, a shared folder) could run any code on `tli train --resume`. The sha256 manifest does not
help, as whoever writes `.metadata` can update its entry too. So:

- `.metadata` goes through `MetadataUnpickler`, which resolves only DCP's metadata classes and the
  few torch/pathlib types they hold (dtypes, `torch.Size`, layouts, the checkpoint's path); any other
  global (`os.system`, `builtins.eval`, ...) is refused before it is called;
- the metadata is then checked: every file it points DCP at must be one of the files the
  checkpoint's manifest lists (a plain name inside `state/`), with offsets and lengths that are
  non-negative integers;
- non-tensor values are read with `torch.load(weights_only=True)` (tensors already are).
"""

from __future__ import annotations

import io
import os
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo

METADATA_FILE = ".metadata"

_METADATA_CLASSES = (
    "Metadata", "TensorStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING", "ChunkStorageMetadata",
    "BytesStorageMetadata", "MetadataIndex", "StorageMeta",
)  # fmt: skip
_ALLOWED: dict[tuple[str, str], object] = {
    **{("torch.distributed.checkpoint.metadata", n): getattr(dcp_metadata, n) for n in _METADATA_CLASSES},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): None,  # DCP records the path it was saved to (StorageMeta.checkpoint_id)
    ("pathlib", "PurePosixPath"): None,
    ("collections", "OrderedDict"): None,
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint's metadata asks for something DCP's metadata never holds (code, an unlisted file)."""


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals DCP's metadata is made of."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            value = _ALLOWED[(module, name)]
            return value if value is not None else super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refers to {module}.{name}, which is not part of a DCP checkpoint's metadata; "
            "refusing to load it (a checkpoint that runs code when read)"
        )


def load_metadata(data: bytes, path: str, files: set[str]) -> dcp_metadata.Metadata:
    """DCP metadata from the bytes of `.metadata` at path, checked to read only `files` (names in its folder)."""
    try:
        metadata = MetadataUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # any malformed pickle: truncated, wrong opcodes, wrong arguments
        raise ValueError(f"{path}: not a DCP checkpoint's metadata ({type(e).__name__}: {e})") from None
    if type(metadata) is not dcp_metadata.Metadata:
        raise ValueError(f"{path}: holds a {type(metadata).__name__}, not a DCP checkpoint's Metadata")
    storage = metadata.storage_data
    if not isinstance(storage, dict) or not isinstance(metadata.state_dict_metadata, dict):
        raise ValueError(f"{path}: not a DCP checkpoint's metadata (no storage table)")
    for key, info in storage.items():
        if type(info) is not _StorageInfo:
            raise ValueError(f"{path}: storage entry {key!r} is a {type(info).__name__}, not a DCP storage record")
        name = info.relative_path
        if not isinstance(name, str) or name not in files:
            raise UnsafeCheckpointError(
                f"{path}: points at {name!r}, a file the checkpoint's manifest does not list; "
                "tli reads only the files a checkpoint lists"
            )
        for field in ("offset", "length"):
            value = getattr(info, field)
            if type(value) is not int or value < 0:
                raise ValueError(f"{path}: storage entry {key!r}: {field} {value!r} is not a non-negative integer")
        if info.transform_descriptors:
            raise ValueError(f"{path}: storage entry {key!r} asks for transforms {info.transform_descriptors!r}; "
                             "tli writes none")  # fmt: skip
    return metadata


class ListedFilesReader(FileSystemReader):
    """FileSystemReader whose metadata is read by MetadataUnpickler and may name only `files`.

    The metadata is read and checked when the reader is made, so a refusal is raised here, as itself,
    rather than inside DCP's collectives (which would wrap it and retry per-rank metadata files)."""

    def __init__(self, path: str, files: set[str]):
        super().__init__(path)
        self.files = set(files)
        if METADATA_FILE not in self.files:
            raise UnsafeCheckpointError(f"{path}: the manifest does not list {METADATA_FILE}")
        metadata_path = os.path.join(path, METADATA_FILE)
        with open(metadata_path, "rb") as f:
            data = f.read()
        self._metadata = load_metadata(data, metadata_path, self.files - {METADATA_FILE})

    def read_metadata(self) -> dcp_metadata.Metadata:  # no **kwargs: DCP then never asks for per-rank files
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor values with torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"value {read_item.dest_index.fqn!r} is not plain data; refusing to load it ({one_line(e)})"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
