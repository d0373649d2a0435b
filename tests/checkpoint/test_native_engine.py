"""The native engine against the Python reference: byte for byte, for every method and dtype,
on checkpoints full of NaN/inf/subnormal values, odd tensor sizes (unaligned offsets), F16/F32/
mixed sources, sparse sources, tiny buffers (many chunks) and the 405B layout."""

from __future__ import annotations

import filecmp
import json
import os
import resource

import pytest

from tli_kernels.checkpoint import executor_native
from tli_kernels.checkpoint.checksum import checksum_python, file_sample_ranges, sample_ranges
from tli_kernels.checkpoint.executor_python import execute_python
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.synthetic import llama_config, write_checkpoint, write_preset
from tli_kernels.methods import CommonOptions, make_plan
from tli_kernels.upscale import upscale

pytestmark = [
    pytest.mark.skipif(not executor_native.available(), reason="native engine not built"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning"),
]

# Odd sizes: BF16 tensors of 38, 99*38, ... elements put most tensors at offsets that are not
# multiples of 8, so chunk edges and checksum words straddle tensors.
ODD = dict(
    hidden_size=38,
    intermediate_size=99,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=19,
    vocab_size=101,
    num_hidden_layers=5,
)

METHODS = [
    ("tli", dict(k=2, init="copy", alpha=1.0)),
    ("tli", dict(k=2, init="average", alpha=0.7)),
    ("tli", dict(k=2, init="copy", alpha=-0.5)),
    ("tli", dict(k=3, init="zero")),
    ("tli", dict(k=2, init="random", alpha=0.5)),
    ("dus", dict(m=2)),
    ("block-expansion", dict(k=2)),
    ("stack", dict(times=2)),
    ("passthrough", dict(layers="0-3,2-4")),
    ("moe-upcycle", dict(experts=3, top_k=2)),
]
DTYPES = ["keep", "bf16", "fp16", "fp32"]
TINY_BUFFERS = {"buffer_bytes": 4096, "copy_chunk": 4096}  # hundreds of chunks per shard


def make_source(path, *, dtype="BF16", norm_dtype=None, fill="special", shards=3, seed=0, **overrides) -> str:
    write_checkpoint(
        str(path),
        llama_config("llama-3.2-1b", **{**ODD, **overrides}),
        fill=fill,
        dtype=dtype,
        num_shards=shards,
        seed=seed,
        norm_dtype=norm_dtype,
    )
    return str(path)


def assert_same_files(a: str, b: str) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for n in names:
        assert filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False), n


def both_engines(tmp_path, src, method, options, common, tuning=None, threads=2, checksum="sample"):
    layout = CheckpointLayout.open(src)
    plan = make_plan(layout, method, common, **options)
    ref, nat = tmp_path / "ref", tmp_path / "nat"
    ref.mkdir(parents=True)
    nat.mkdir()
    # The special sources overflow F16 on purpose: compare the overflow paths too (check_finite off).
    execute_python(plan, layout, str(ref), max_memory=1 << 20, check_finite=False)
    tuning = {"check_finite": False, **(tuning or {})}
    sums = executor_native.execute_native(plan, layout, str(nat), threads=threads, tuning=tuning, checksum=checksum)
    assert_same_files(str(ref), str(nat))
    return plan, str(nat), sums


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("sources")
    return {
        "bf16": make_source(base / "bf16", dtype="BF16"),
        "f16": make_source(base / "f16", dtype="F16", seed=1),
        "f32": make_source(base / "f32", dtype="F32", seed=2),
        "mixed": make_source(base / "mixed", dtype="BF16", norm_dtype="F32", seed=3),
    }


@pytest.mark.parametrize("method, options", METHODS, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in METHODS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_method_and_dtype_matches_reference(tmp_path, sources, method, options, dtype):
    mode = "full" if dtype in ("keep", "fp16") else "sample"
    common = CommonOptions(shard_size=60_000, dtype=dtype)
    plan, nat, sums = both_engines(tmp_path, sources["bf16"], method, options, common, TINY_BUFFERS, checksum=mode)
    assert len(plan.shards) > 1
    for i, digits in sums.items():  # the checksum computed while writing is the file's checksum
        path = os.path.join(nat, plan.shards[i].file)
        assert digits == checksum_python(path, file_sample_ranges(path) if mode == "sample" else None)


@pytest.mark.parametrize("source", ["f16", "f32", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method, options", [METHODS[1], METHODS[2], METHODS[4]], ids=["average", "negscale", "random"])
def test_other_source_dtypes_match_reference(tmp_path, sources, source, dtype, method, options):
    both_engines(tmp_path, sources[source], method, options, CommonOptions(shard_size=200_000, dtype=dtype))


def test_thread_counts_and_buffer_sizes_do_not_change_bytes(tmp_path, sources):
    common = CommonOptions(shard_size=30_000, dtype="fp16")
    _, first, _ = both_engines(tmp_path / "a", sources["mixed"], "tli", dict(k=2, init="average"), common, threads=1)
    for j, (threads, tuning) in enumerate([(3, TINY_BUFFERS), (2, {"buffer_bytes": 12288, "copy_chunk": 8192})]):
        _, other, _ = both_engines(tmp_path / str(j), sources["mixed"], "tli", dict(k=2, init="average"), common,
                                   tuning, threads)  # fmt: skip
        assert_same_files(first, other)


def test_without_copy_file_range_same_bytes(tmp_path, sources):
    both_engines(tmp_path, sources["bf16"], "tli", dict(k=2), CommonOptions(shard_size=60_000),
                 {**TINY_BUFFERS, "copy_file_range": False})  # fmt: skip


@pytest.mark.parametrize("dtype", ["keep", "fp16"])
@pytest.mark.parametrize("mode", ["sample", "full"])
def test_checksums_of_multi_mib_shards_with_pages_dropped(tmp_path, dtype, mode):
    """Shards of several MiB written in small chunks: written pages are dropped from the page cache
    as the run goes (sampled blocks hashed just before), and the recorded checksum is still the
    checksum of the file."""
    src = make_source(tmp_path / "src", fill="dense", hidden_size=256, intermediate_size=1000, shards=2)
    tuning = {"buffer_bytes": 64 << 10, "copy_chunk": 192 << 10, "drop_lag": 256 << 10}
    plan, nat, sums = both_engines(tmp_path, src, "tli", dict(k=2, alpha=0.5), CommonOptions(shard_size=6_000_000,
                                   dtype=dtype), tuning, checksum=mode)  # fmt: skip
    assert max(s.file_size for s in plan.shards) > 4 << 20
    for i, digits in sums.items():
        path = os.path.join(nat, plan.shards[i].file)
        assert digits == checksum_python(path, file_sample_ranges(path) if mode == "sample" else None)


def test_sparse_source_stays_sparse(tmp_path):
    src = make_source(tmp_path / "src", fill="sparse", hidden_size=256, intermediate_size=1024, shards=2)
    plan, nat, _ = both_engines(tmp_path, src, "tli", dict(k=2, alpha=0.5), CommonOptions())
    for shard in plan.shards:
        st = os.stat(os.path.join(nat, shard.file))
        assert st.st_blocks * 512 <= 16 * 4096 < st.st_size  # only the header block(s) hold data


def test_checksum_native_equals_numpy(tmp_path, sources):
    paths = [os.path.join(sources["f32"], f) for f in os.listdir(sources["f32"]) if f.endswith(".safetensors")]
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:  # data, a hole, data, and a length that is not a multiple of 8
        f.write(b"\x01" * 5000)
        f.seek(1 << 20)
        f.write(os.urandom(4099))
    for path in paths + [str(sparse)]:
        assert executor_native.checksum_file(path) == checksum_python(path)
    sizes = [(p, os.path.getsize(p)) for p in paths + [str(sparse)]]
    assert executor_native.verify_files(sizes, threads=2) == [checksum_python(p) for p, _ in sizes]
    assert executor_native.verify_files(sizes, "sample", threads=2, max_memory=1 << 20) == [
        checksum_python(p, file_sample_ranges(p)) for p, _ in sizes
    ]


def test_sample_ranges_cover_header_every_mib_and_the_end():
    size = 5 * (1 << 20) + 13
    ranges = sample_ranges(size, 8 + 20_000)
    assert ranges[0] == (0, 20_008) and ranges[-1][1] == size
    assert all(b % 8 == 0 and (e % 8 == 0 or e == size) for b, e in ranges)
    assert all(e1 < b2 for (_, e1), (b2, _) in zip(ranges, ranges[1:]))
    assert sum(e - b for b, e in ranges) < 20_008 + 7 * 4096 + 8
    from tli_kernels.checkpoint import _native

    for n, header in [(size, 20_008), (0, 0), (5, 5), (4096, 100), (4097, 4097), (3 << 20, 8), (12345678, 99)]:
        assert [tuple(r) for r in _native.sample_ranges(n, header)] == sample_ranges(n, header)


def test_checksum_sees_single_bit_and_swapped_words(tmp_path):
    data = bytearray(os.urandom(1 << 16))
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    base = checksum_python(str(path))
    flipped = bytearray(data)
    flipped[1234] ^= 0x80
    swapped = bytearray(data)
    swapped[0:8], swapped[8:16] = data[8:16], data[0:8]
    top_bits = bytearray(data)  # bit 63 of two words: invisible to a plain weighted sum
    top_bits[7] ^= 0x80
    top_bits[15] ^= 0x80
    for changed in (flipped, swapped, top_bits):
        path.write_bytes(changed)
        assert checksum_python(str(path)) != base


def test_memory_plan_respects_budget():
    for budget in (1 << 20, 8 << 20, 64 << 20, 512 << 20, 4 << 30):
        for threads in (1, 2, 7, 64):
            mem = executor_native.memory_plan(budget, threads)
            assert mem.threads <= threads and mem.engine_bytes <= budget // 2
            assert mem.buffer_bytes >= executor_native.MIN_BUFFER
    with pytest.raises(ValueError, match="too small"):
        executor_native.memory_plan(100_000, 2)
    with pytest.raises(ValueError, match="--threads"):
        executor_native.memory_plan(1 << 30, 0)


def test_upscale_defaults_to_native_and_dry_run_reports_bytes(tmp_path, sources):
    result = upscale(sources["bf16"], str(tmp_path / "out"), "tli", options=dict(k=2, init="copy"), dry_run=True)
    assert result.engine == "native" and not os.path.exists(tmp_path / "out")
    layout = CheckpointLayout.open(sources["bf16"])
    injected = sum(t.nbytes for t in result.plan.tensors() if t.op.src) - layout.total_bytes
    assert result.bytes_to_read == layout.total_bytes + injected
    assert result.bytes_to_write == sum(s.file_size for s in result.plan.shards)
    # the default init (zero) writes the zeroed projections as holes: they cost no disk
    zero = upscale(sources["bf16"], str(tmp_path / "out"), "tli", options=dict(k=2), dry_run=True)
    holes = sum(t.nbytes for t in zero.plan.tensors() if t.op.kind == "zeros")
    assert holes > 0 and zero.bytes_to_write == sum(s.file_size for s in zero.plan.shards) - holes
    done = upscale(sources["bf16"], str(tmp_path / "out"), "tli", options=dict(k=2), engine="native")
    assert done.finished and done.engine == "native"
    assert not os.path.exists(tmp_path / "out" / ".tli-shards")


def test_explicit_native_without_extension_is_an_error(monkeypatch, tmp_path, sources, capsys):
    import tli_kernels.upscale as up

    monkeypatch.setattr(executor_native, "_native", None)
    monkeypatch.setattr(up, "_warned_fallback", False)
    with pytest.raises(RuntimeError, match="native engine is not built"):
        upscale(sources["bf16"], str(tmp_path / "a"), "tli", options=dict(k=2), engine="native")
    result = upscale(sources["bf16"], str(tmp_path / "b"), "tli", options=dict(k=2))
    assert result.engine == "python" and result.finished
    err = capsys.readouterr().err
    assert err.count("native engine not built") == 1 and len(err.strip().splitlines()) == 1


def test_llama_405b_layout_sparse_conversion(tmp_path):
    """The real 405B layout (126 layers, 191 shards, ~812 GB apparent) as holes, upscaled to 189 layers."""
    from safetensors import safe_open

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    paths = write_preset(src, "llama-3.1-405b", fill="sparse")
    assert len(paths) == 191
    apparent = sum(os.path.getsize(p) for p in paths)
    assert 811e9 < apparent < 813e9
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = upscale(src, dst, "tli", options=dict(k=2))
    assert result.finished and len(result.plan.layers) == 189
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10  # KiB: < 256 MiB more
    out = CheckpointLayout.open(dst)
    assert out.num_layers == 189 and len(out.files) == len(result.plan.shards)
    real = sum(os.stat(h.path).st_blocks * 512 for h in out.files.values())
    assert real < 64 << 20 and sum(h.size for h in out.files.values()) > 1.2e12
    with open(os.path.join(dst, "model.safetensors.index.json")) as f:
        assert len(json.load(f)["weight_map"]) == len(out.tensors)
    for h in list(out.files.values())[::25]:  # the safetensors reader accepts the headers
        with safe_open(h.path, "pt") as f:
            assert set(f.keys()) == set(h.tensors)
