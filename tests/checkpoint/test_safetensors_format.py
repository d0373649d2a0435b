"""The safetensors reader/writer against the safetensors library, and every breach of the contract."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.safetensors_format import build_header, read_header


def _write_raw(path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def test_reads_what_the_safetensors_library_writes(tmp_path):
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.float32),
        "b": torch.randn(7, dtype=torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == set(tensors)
    with open(path, "rb") as f:
        blob = f.read()
    for name, t in tensors.items():
        e = header.tensors[name]
        assert e.shape == tuple(t.shape)
        assert blob[e.offset : e.offset + e.nbytes] == t.contiguous().view(torch.uint8).numpy().tobytes()


def test_library_reads_what_we_write(tmp_path):
    specs = [("w", "BF16", (4, 3)), ("v", "F32", (5,)), ("z", "F16", (2, 2))]
    header = build_header(specs, {"format": "pt"})
    assert (len(header) - 8) % 8 == 0, "data must start 8-byte aligned"
    values = {"w": torch.randn(4, 3).bfloat16(), "v": torch.randn(5), "z": torch.randn(2, 2).half()}
    path = tmp_path / "y.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        for name, _, _ in specs:
            f.write(values[name].view(torch.uint8).numpy().tobytes())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name in values:
            assert torch.equal(f.get_tensor(name), values[name])
    assert read_header(str(path)).tensors["v"].nbytes == 20


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    "header, data, length, match",
    [
        (b"", b"", None, "header does not start"),
        (GOOD, b"\0" * 4, None, "truncated"),
        (GOOD, b"\0" * 12, None, "trailing bytes"),
        (GOOD, b"\0" * 8, 10_000, "runs past the end"),
        (GOOD, b"\0" * 8, 200_000_000, "100 MB"),
        (b"{not json", b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "does not start with"),
        ({"t": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12, None, "needs 8"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "begin <= end"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
            },
            b"\0" * 20,
            None,
            "gap of 4 bytes",
        ),
        ({"__metadata__": {"x": 1}, **GOOD}, b"\0" * 8, None, "__metadata__"),
        (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "t": 1}', b"\0" * 4, None, "twice"),
    ],
)
def test_contract_breaches_are_named(tmp_path, header, data, length, match):
    path = _write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=match) as info:
        read_header(path)
    assert str(tmp_path / "bad.safetensors") in str(info.value)


def test_error_names_the_tensor(tmp_path):
    header = {"first": GOOD["t"], "second": {"dtype": "BF16", "shape": [3], "data_offsets": [8, 12]}}
    path = _write_raw(tmp_path / "bad.safetensors", header, b"\0" * 12)
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert info.value.tensor == "second" and "'second'" in str(info.value)


def test_short_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="shorter than the 8-byte"):
        read_header(str(path))


def test_padding_spaces_accepted(tmp_path):
    raw = json.dumps(GOOD).encode() + b"    "
    path = _write_raw(tmp_path / "pad.safetensors", raw, b"\0" * 8)
    assert read_header(path).tensors["t"].offset == 8 + len(raw)
