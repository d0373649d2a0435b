"""PyTorch `.bin` checkpoints (the zip format of torch.save) read as headers, like safetensors.

Why this rather than "convert first": a zip-format `.bin` stores every tensor storage as one
uncompressed zip record, so once we know where each tensor's bytes lie in the file, both engines
read it exactly as they read a safetensors file (pread / copy_file_range at an absolute offset), in
the same bounded memory, and nothing is converted twice. To learn the layout safely we let
`torch.load(mmap=True, weights_only=True)` parse the pickle (the weights-only unpickler runs no
arbitrary code) over a memory map of the file: no tensor byte is read, only the small pickle. With
mmap every storage is a slice of one mapping at its record's offset, so a tensor's file offset is its
data pointer minus the mapping's base; the base is found by matching the storages' pointers against
the zip records' offsets and checked for every storage. Then the mapping is dropped.

Refused, with a message saying how to convert: the legacy (pre-1.6, non-zip) format, compressed
records, non-contiguous tensors, big-endian files.
"""

from __future__ import annotations

import gc
import json
import os
import struct
import zipfile

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.safetensors_format import FileHeader, TensorEntry, tensor_nbytes

BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
CONVERT_HINT = (
    "convert it to safetensors first (transformers: AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst))"
)
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


def _torch_dtype_names() -> dict:
    import torch

    names = {
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float64: "F64",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    for attr, name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
        if hasattr(torch, attr):
            names[getattr(torch, attr)] = name
    return names


def bin_files(path: str) -> list[str] | None:
    """The `.bin` weight files of a model folder (from the index when there is one), or None."""
    index = os.path.join(path, BIN_INDEX_NAME)
    if os.path.isfile(index):
        return sorted(set(_bin_index(index).values()))
    single = os.path.join(path, BIN_SINGLE_NAME)
    if os.path.isfile(single):
        return [BIN_SINGLE_NAME]
    found = sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if len(found) > 1:
        raise CheckpointError(f"{len(found)} .bin files but no {BIN_INDEX_NAME} to say which tensor is where", path)
    return found or None


def open_bin_checkpoint(path: str) -> tuple[dict[str, FileHeader], dict[str, TensorEntry], dict | None]:
    """(files, tensors, index metadata) of a folder holding `.bin` weights, checked against the index."""
    index_path = os.path.join(path, BIN_INDEX_NAME)
    weight_map = _bin_index(index_path) if os.path.isfile(index_path) else None
    names = sorted(set(weight_map.values())) if weight_map is not None else bin_files(path)
    if not names:
        raise CheckpointError("no .bin weights found", path)
    files: dict[str, FileHeader] = {}
    tensors: dict[str, TensorEntry] = {}
    for fname in names:
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"index names file {fname!r} but it does not exist", index_path)
        header = read_bin_header(fpath)
        files[fname] = header
        for name, t in header.tensors.items():
            if weight_map is not None and weight_map.get(name) != fname:
                raise CheckpointError("file holds this tensor but the index does not list it there", fpath, name)
            if name in tensors:
                raise CheckpointError(f"tensor also in {os.path.basename(tensors[name].file)}", fpath, name)
            tensors[name] = t
    if weight_map is not None:
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise CheckpointError(
                f"index says it is in {weight_map[missing[0]]} but that file does not hold it", index_path, missing[0]
            )
    return files, tensors, None


def _bin_index(index_path: str) -> dict[str, str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the index: {e}", index_path) from e
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("index has no weight_map (or it is empty)", index_path)
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or os.path.basename(fname) != fname:
            raise CheckpointError(f"index maps it to {fname!r}, not a file name in this folder", index_path, name)
    return weight_map


def read_bin_header(path: str) -> FileHeader:
    """Where every tensor of one zip-format torch.save file lies; reads the pickle, never tensor data."""
    path = os.path.abspath(path)
    size = os.path.getsize(path)
    records = _stored_records(path)
    state = _load_lazily(path)
    try:
        dtype_names = _torch_dtype_names()
        entries = {}
        pointers: dict[int, int] = {}  # storage data pointer -> storage bytes
        for name, t in state.items():
            dtype = dtype_names.get(t.dtype)
            if dtype is None:
                raise CheckpointError(f"dtype {t.dtype} has no safetensors equivalent; {CONVERT_HINT}", path, name)
            if not t.is_contiguous():
                raise CheckpointError(f"tensor is not contiguous in the file; {CONVERT_HINT}", path, name)
            storage = t.untyped_storage()
            if storage.nbytes():
                pointers[storage.data_ptr()] = storage.nbytes()
            entries[name] = (dtype, tuple(t.shape), t.data_ptr(), t.numel())
        base = _mapping_base(pointers, records, path)
        header_end = min((off for off, _ in records.values()), default=size)
        header = FileHeader(path=path, size=size, header_bytes=max(0, header_end - 8), metadata=None)
        spans = sorted(records.values())
        for name, (dtype, shape, ptr, numel) in entries.items():
            nbytes = tensor_nbytes(dtype, shape)
            offset = ptr - base if numel else header_end
            if numel and not any(b <= offset and offset + nbytes <= b + n for b, n in spans):
                raise CheckpointError("tensor bytes do not lie inside one stored record", path, name)
            header.tensors[name] = TensorEntry(name, dtype, shape, path, offset, nbytes)
    finally:
        del state
        gc.collect()  # drop the tensors, and with them the mapping, before the engines open the file
    return header


def _load_lazily(path: str) -> dict:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"not a weights-only PyTorch checkpoint ({first}); {CONVERT_HINT}", path) from e
    except (RuntimeError, ValueError, OSError, EOFError, KeyError, IndexError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read as a PyTorch checkpoint ({first}); {CONVERT_HINT}", path) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"does not hold a flat dict of tensors (a state dict); {CONVERT_HINT}", path)
    return state


def _stored_records(path: str) -> dict[str, tuple[int, int]]:
    """data record name -> (absolute offset of its bytes, length), for a zip-format torch file."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"not a zip-format PyTorch file (a legacy pickle, saved by torch < 1.6?); {CONVERT_HINT}", path
        )
    try:
        return _zip_records(path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, EOFError, OSError,
            KeyError, struct.error) as e:  # fmt: skip
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"not a readable zip-format PyTorch file ({first}); {CONVERT_HINT}", path) from None


def _zip_records(path: str) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[-1] == "byteorder":
                if z.read(info).strip() != b"little":
                    raise CheckpointError(f"big-endian checkpoint; {CONVERT_HINT}", path)
                continue
            if len(parts) < 2 or parts[-2] != "data" or not parts[-1].isdigit():
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"record {info.filename} is compressed; {CONVERT_HINT}", path)
            f.seek(info.header_offset)
            local = f.read(_LOCAL_HEADER.size)
            if len(local) != _LOCAL_HEADER.size or local[:4] != _LOCAL_MAGIC:
                raise CheckpointError(f"zip record {info.filename} has no local header", path)
            name_len, extra_len = _LOCAL_HEADER.unpack(local)[-2:]
            out[info.filename] = (info.header_offset + _LOCAL_HEADER.size + name_len + extra_len, info.file_size)
    return out


def _mapping_base(pointers: dict[int, int], records: dict[str, tuple[int, int]], path: str) -> int:
    """The mapping's base address: the one shift that puts every storage exactly on a data record."""
    if not pointers:
        return 0
    starts = {off: n for off, n in records.values()}
    first = min(pointers)
    for off in sorted(starts):
        base = first - off
        if all(starts.get(p - base, -1) >= n for p, n in pointers.items()):
            return base
    raise CheckpointError(f"cannot place the tensors' storages in the zip records; {CONVERT_HINT}", path)
