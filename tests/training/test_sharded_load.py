"""Per-shard loading from the SurgeryPlan: every method, every row shard, bit-identical to writing the
upscaled checkpoint with `tli upscale` and loading it with stock transformers (the reference);
a source that goes missing, changes or is truncated is refused with the file named."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.helpers import save_tiny_llama
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.training.sharded_load import (
    _CountingReader,
    _fill_param,
    bind,
    build_meta_model,
    fill_from_plan,
    load_model,
    materialize,
    open_source,
    shard_rows,
)
from tli_kernels.upscale import upscale

CASES = [
    ("tli", {"k": 2, "init": "copy", "alpha": 0.5}),
    ("tli", {"k": 2, "init": "average", "alpha": 0.3}),
    ("tli", {"k": 2, "init": "zero"}),
    ("tli", {"k": 3, "init": "random", "alpha": 0.7}),
    ("dus", {"m": 1}),
    ("stack", {"times": 2}),
    ("passthrough", {"layers": "0-2,1-3"}),
    ("block-expansion", {"k": 2}),
    ("moe-upcycle", {"experts": 2, "top_k": 2}),
]


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    # bf16 and sharded, so alpha scaling and averaging round (RNE) and shards span files
    return save_tiny_llama(str(tmp_path_factory.mktemp("bf16") / "src"), layers=4, dtype=torch.bfloat16)


def _reference(src: str, method: str, options: dict, dst: str):
    from transformers import AutoModelForCausalLM

    upscale(src, dst, method, options=options)
    return AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in CASES])
def test_upscale_on_load_equals_upscale_then_load(bf16_source, tmp_path, method, options):
    reference = _reference(bf16_source, method, options, str(tmp_path / "out"))
    model = load_model(open_source(bf16_source, method, options))
    ref, got = reference.state_dict(), model.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k  # bit for bit, including bf16 rounding of alpha * w
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(reference(input_ids=x).logits, model(input_ids=x).logits)
    # the upscaled folder itself loads the same way (the identity plan)
    again = load_model(open_source(str(tmp_path / "out")))
    assert all(torch.equal(ref[k], v) for k, v in again.state_dict().items())


@pytest.mark.parametrize("world", [2, 3, 5])
def test_row_shards_tile_the_tensor_and_read_their_share(bf16_source, world):
    """Each rank's rows (torch.chunk semantics, as FSDP2 shards) filled alone make up the whole tensor."""
    source = open_source(bf16_source, "tli", {"k": 2, "init": "average", "alpha": 0.5})
    whole = load_model(source).state_dict()
    model = build_meta_model(source.config)
    bindings = bind(model, source.plan)
    total_read = 0
    with _CountingReader(source.layout) as reader:
        for name, pieces in bindings.items():
            full = whole[name]
            rebuilt = torch.full_like(full, float("nan"))
            for rank in range(world):
                first, rows = shard_rows(full.shape[0], rank, world)
                local = torch.empty((rows, *full.shape[1:]))
                _fill_param(local, first, pieces, reader)
                rebuilt[first : first + rows] = local
            assert torch.equal(rebuilt, full), name
        total_read = reader.bytes_read
    # every rank together read each source byte once per use: no rank read another's rows
    expected = sum(source.layout.tensors[s].nbytes for t in source.plan.tensors() for s in t.op.src)
    assert total_read == expected


def test_a_missing_shard_mid_load_is_named(bf16_source, tmp_path):
    src = shutil.copytree(bf16_source, tmp_path / "src")
    source = open_source(str(src), "tli", {"k": 2})
    victim = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[-1]
    os.unlink(src / victim)
    model = build_meta_model(source.config)
    materialize(model)
    with pytest.raises(CheckpointError, match=victim):
        fill_from_plan(model, source)


def test_a_source_changed_between_plan_and_load_is_refused(bf16_source, tmp_path):
    src = shutil.copytree(bf16_source, tmp_path / "src")
    source = open_source(str(src), "tli", {"k": 2})
    victim = src / sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-4:] = b"\x11\x22\x33\x44"  # same size, same header: a fine-tune saved over the source
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(0, 12345))
    model = build_meta_model(source.config)
    materialize(model)
    with pytest.raises(CheckpointError, match="changed between planning and loading") as info:
        fill_from_plan(model, source)
    assert victim.name in str(info.value)


def test_tied_embeddings_stay_one_parameter(tmp_path):
    src = save_tiny_llama(str(tmp_path / "src"), layers=2, dtype=torch.float32, tie=True, shard=None)
    model = load_model(open_source(src, "tli", {"k": 1}))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.num_hidden_layers == 4


def test_truncated_weights_are_named(tmp_path):
    src = save_tiny_llama(str(tmp_path / "src"), layers=2, dtype=torch.float32, shard=None)
    path = os.path.join(src, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_source(src)


def test_provenance_that_does_not_fit_is_named(tmp_path):
    src = save_tiny_llama(str(tmp_path / "src"), layers=2, dtype=torch.float32, shard=None)
    prov = os.path.join(src, "tli_provenance.json")
    with open(prov, "w") as f:
        f.write("[1, 2]")
    with pytest.raises(ValueError, match="tli_provenance.json: provenance is a JSON array, not an object"):
        open_source(src)
    with open(prov, "w") as f:
        f.write('{"injected_layers": [1, 99]}')
    with pytest.raises(ValueError, match="tli_provenance.json: names injected layer 99, but the model has 2 layers"):
        open_source(src)


@pytest.mark.parametrize(
    "model_type",
    [
        "gemma2",
        "gpt2",
        "falcon",
        "mixtral",
        "qwen3_moe",
        "qwen2_moe",
        "phi3",
        "glm4",
        "granitemoe",
        "glm4_moe",
        "deepseek_v3",
        "deepseek_v2",
        "ernie4_5_moe",
        "gpt_oss",
    ],
)
def test_upscale_on_load_for_other_families(tmp_path, model_type):
    """Every family's layout (prefixes, post norms, fused qkv, per-expert files -> fused 3-D expert
    parameters) loads bit for bit as tli upscale + stock transformers would."""
    from tests.architectures.models import FAMILIES, build_model, save_model

    src = save_model(build_model(FAMILIES[model_type]), str(tmp_path / "src"), dtype=torch.bfloat16, shard="100KB")
    options = {"k": 3, "init": "average", "alpha": 0.375}
    reference = _reference(src, "tli", options, str(tmp_path / "out"))
    model = load_model(open_source(src, "tli", options))
    ref, got = reference.state_dict(), model.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
