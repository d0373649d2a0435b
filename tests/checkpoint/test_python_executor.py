"""The reference executor's numerics against torch and a pure-Python splitmix64, and its chunking."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tli_kernels.checkpoint.executor_python import bytes_to_f32, execute_python, f32_to_bytes, uniform_f32
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.plan import OutTensor, SurgeryPlan, TensorOp, pack_shards, validate_plan

SPECIALS = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    3.3895314e38,
    1e-40,
    -1e-42,
    6.1e-5,
    65504.0,
    65520.0,
    1e5,
    float("inf"),
    -float("inf"),
    1.00390625,
    1.01171875,
    2.0**-24,
    2.0**-25,
    3 * 2.0**-26,
]


def _values(n=50_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 6)
    return torch.cat([torch.tensor(SPECIALS, dtype=torch.float32), x])


@pytest.mark.parametrize("dtype, torch_dtype", [("BF16", torch.bfloat16), ("F16", torch.float16)])
def test_rounding_matches_torch(dtype, torch_dtype):
    x = _values()
    ours = np.frombuffer(f32_to_bytes(x.numpy(), dtype), dtype=np.uint16)
    theirs = x.to(torch_dtype).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    back = bytes_to_f32(ours.tobytes(), dtype)
    assert np.array_equal(back, x.to(torch_dtype).float().numpy(), equal_nan=True)


def test_nan_is_canonical():
    x = np.array([np.nan, -np.nan, np.frombuffer(np.uint32(0x7F800001).tobytes(), np.float32)[0]], np.float32)
    assert set(np.frombuffer(f32_to_bytes(x, "BF16"), np.uint16)) == {0x7FC0}
    assert set(np.frombuffer(f32_to_bytes(x, "F16"), np.uint16)) == {0x7E00}


def _splitmix_reference(seed: int, i: int, bound: float) -> float:
    mask = (1 << 64) - 1
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    u = (z >> 11) * 2.0**-53
    return float(np.float32((2.0 * u - 1.0) * bound))


def test_uniform_is_splitmix64_and_chunk_independent():
    seed, bound = 123456789012345, 0.0346
    full = uniform_f32(seed, bound, 0, 64)
    assert [float(v) for v in full[:16]] == [_splitmix_reference(seed, i, bound) for i in range(16)]
    assert np.array_equal(uniform_f32(seed, bound, 40, 24), full[40:])
    big = uniform_f32(seed, bound, 0, 200_000)
    assert abs(big.std() - bound / np.sqrt(3)) < 2e-4 and big.min() >= -bound and big.max() <= bound


def _plan(tensors, src_layout):
    plan = SurgeryPlan(method="test", options={}, source={}, config={}, layers=[], shards=pack_shards(tensors, 40_000))
    validate_plan(plan, src_layout.tensors)
    return plan


def test_ops_across_chunk_boundaries(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(1)
    a32, b32 = torch.randn(9000, generator=g), torch.randn(9000, generator=g) * 3
    tensors = {"a16": a32.bfloat16(), "b16": b32.bfloat16(), "h": a32.half(), "f": b32, "ints": torch.arange(9000)}
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1}')
    layout = CheckpointLayout.open(str(src))
    spec = [
        ("copy_bf16", "BF16", TensorOp("copy", ["a16"])),
        ("bf16_to_f32", "F32", TensorOp("copy", ["a16"])),
        ("f32_to_bf16", "BF16", TensorOp("copy", ["f"])),
        ("f32_to_f16", "F16", TensorOp("copy", ["f"])),
        ("scale", "BF16", TensorOp("scale", ["a16"], factor=0.37)),
        ("scale_f16", "F16", TensorOp("scale", ["h"], factor=-2.5)),
        ("avg", "BF16", TensorOp("average", ["a16", "b16"])),
        ("avg_scaled", "BF16", TensorOp("average", ["a16", "b16", "h"], factor=0.5)),
        ("zeros", "BF16", TensorOp("zeros")),
        ("ones", "F16", TensorOp("fill", value=1.0)),
        ("ints_copy", "I64", TensorOp("copy", ["ints"])),
    ]
    out_tensors = [OutTensor(n, d, (9000,), op) for n, d, op in spec]
    plan = _plan(out_tensors, layout)
    assert len(plan.shards) > 1
    dst = tmp_path / "dst"
    dst.mkdir()
    execute_python(plan, layout, str(dst), max_memory=4096 * 160)  # 4096-element chunks
    got = {}
    for s in plan.shards:
        with safe_open(str(dst / s.file), "pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    t = tensors
    expected = {
        "copy_bf16": t["a16"],
        "bf16_to_f32": t["a16"].float(),
        "f32_to_bf16": t["f"].bfloat16(),
        "f32_to_f16": t["f"].half(),
        "scale": (t["a16"].float() * 0.37).bfloat16(),
        "scale_f16": (t["h"].float() * -2.5).half(),
        "avg": ((t["a16"].float() + t["b16"].float()) / 2).bfloat16(),
        "avg_scaled": ((t["a16"].float() + t["b16"].float() + t["h"].float()) / 3 * 0.5).bfloat16(),
        "zeros": torch.zeros(9000, dtype=torch.bfloat16),
        "ones": torch.ones(9000, dtype=torch.float16),
        "ints_copy": t["ints"],
    }
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    assert not any(f.endswith(".partial") for f in os.listdir(dst))


def test_validate_rejects_bad_plans(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file({"a": torch.zeros(4), "i": torch.zeros(4, dtype=torch.int32)}, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1}')
    layout = CheckpointLayout.open(str(src))
    cases = [
        (OutTensor("x", "F32", (4,), TensorOp("copy", ["nope"])), "not in the checkpoint"),
        (OutTensor("x", "F32", (5,), TensorOp("copy", ["a"])), "shape"),
        (OutTensor("x", "I32", (4,), TensorOp("scale", ["i"], factor=2.0)), "cannot produce dtype I32"),
        (OutTensor("x", "F32", (4,), TensorOp("scale", ["i"], factor=2.0)), "cannot read"),
        (OutTensor("x", "F32", (4,), TensorOp("copy", ["a", "a"])), "got 2 sources"),
        (OutTensor("x", "F32", (4,), TensorOp("melt", ["a"])), "unknown op"),
    ]
    for tensor, match in cases:
        with pytest.raises(ValueError, match=match):
            _plan([tensor], layout)
    with pytest.raises(ValueError, match="twice"):
        _plan([OutTensor("x", "F32", (4,), TensorOp("zeros"))] * 2, layout)
