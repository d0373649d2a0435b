"""Sources named by Hub id (a Hugging Face cache laid out by the test, no network), and PyTorch `.bin`
checkpoints read in place: each compared with the same model given as a local safetensors folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from tests.helpers import save_tiny_llama
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.hub import fetch_list, hub_id_of_folder
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.upscale import upscale

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OPTIONS = dict(k=2, init="copy", alpha=0.5)


def shard_bytes(path: str) -> dict[str, bytes]:
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path)) if f.endswith(".safetensors")}


def lay_out_cache(cache, repo_id: str, folder: str, commit: str = COMMIT, refs=("main",)) -> str:
    """A Hugging Face hub cache as huggingface_hub writes it: blobs named by hash, snapshot symlinks, refs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for name in os.listdir(folder):
        data = open(os.path.join(folder, name), "rb").read()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return str(snap)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    src = save_tiny_llama(str(tmp_path / "local"), layers=4)  # sharded: index + several files
    cache = tmp_path / "hf-cache"
    snap = lay_out_cache(cache, "org/tiny", src, refs=("main", "v1"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"src": src, "cache": cache, "snapshot": snap}


@pytest.mark.parametrize("ref", ["org/tiny", "org/tiny@v1", f"org/tiny@{COMMIT}"])
def test_hub_id_from_the_cache(hub, tmp_path, ref):
    dst, local = str(tmp_path / "dst"), str(tmp_path / "from-local")
    result = upscale(ref, dst, "tli", options=OPTIONS)
    upscale(hub["src"], local, "tli", options=OPTIONS)
    assert shard_bytes(dst) == shard_bytes(local)
    assert result.layout.path == hub["snapshot"]
    prov = json.load(open(os.path.join(dst, "tli_provenance.json")))
    revision = ref.partition("@")[2] or "main"
    assert prov["source"]["origin"] == {"hub_id": "org/tiny", "revision": revision, "commit": COMMIT}
    card = open(os.path.join(dst, "README.md")).read()
    assert "base_model:\n- org/tiny\n" in card


def test_recipe_of_hub_ids(hub, tmp_path):
    other = save_tiny_llama(str(tmp_path / "other"), layers=4, seed=5, shard=None)
    lay_out_cache(hub["cache"], "org/other", other, commit="f" * 40)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        "slices:\n"
        "  - sources: [{model: org/tiny, layer_range: [0, 3]}]\n"
        "  - sources: [{model: org/other, layer_range: [1, 4]}]\n"
        "merge_method: passthrough\n"
    )
    dst = str(tmp_path / "dst")
    result = upscale(str(recipe), dst, None)
    assert [s["origin"]["hub_id"] for s in result.plan.source["sources"]] == ["org/tiny", "org/other"]
    with safe_open(os.path.join(dst, "model.safetensors"), "pt") as h:
        got = h.get_tensor("model.layers.4.mlp.down_proj.weight")
    with safe_open(os.path.join(other, "model.safetensors"), "pt") as h:
        assert torch.equal(got, h.get_tensor("model.layers.2.mlp.down_proj.weight"))
    card = open(os.path.join(dst, "README.md")).read()
    assert "base_model:\n- org/tiny\n- org/other\n" in card


def test_offline_missing_model_is_one_line_naming_id_and_cache(hub, tmp_path):
    dst = str(tmp_path / "dst")
    with pytest.raises(CheckpointError) as info:
        upscale("org/missing@v2", dst, "tli", options=OPTIONS)
    msg = str(info.value)
    assert "\n" not in msg and "org/missing@v2" in msg and "HF_HUB_OFFLINE" in msg
    assert str(hub["cache"] / "models--org--missing") in msg
    assert not os.path.exists(dst)


def test_offline_incomplete_snapshot_says_what_is_missing(hub, tmp_path):
    shard = sorted(f for f in os.listdir(hub["snapshot"]) if f.startswith("model-"))[-1]
    os.unlink(os.path.join(hub["snapshot"], shard))
    with pytest.raises(CheckpointError, match=f"incomplete.*missing {shard}"):
        upscale("org/tiny", str(tmp_path / "dst"), "tli", options=OPTIONS)


def test_download_fetches_only_what_a_conversion_reads(hub, tmp_path, monkeypatch):
    """With the network allowed and the model not cached: list the repository, download config,
    weights (safetensors, not the .bin copies), index, tokenizer and generation files, nothing else."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    repo_files = sorted(os.listdir(hub["src"])) + [
        "README.md",
        "pytorch_model.bin",
        "original/consolidated.00.pth",
        "onnx/model.safetensors",
        "tokenizer.json",
    ]
    fetched = {}

    def fake_snapshot_download(repo_id, *, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        fetched["patterns"] = list(allow_patterns)
        from pathlib import Path

        return lay_out_cache(Path(cache_dir), repo_id, hub["src"], commit="e" * 40)

    monkeypatch.setattr("tli_kernels.checkpoint.hub._hub_unreachable", lambda: None)  # no network here
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: repo_files)
    dst = str(tmp_path / "dst")
    upscale("org/fresh", dst, "tli", options=OPTIONS)
    weights = [f for f in os.listdir(hub["src"]) if f.endswith(".safetensors")]
    assert sorted(fetched["patterns"]) == sorted(
        weights + ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"]
    )
    assert os.path.exists(os.path.join(dst, "config.json"))


def test_unreachable_hub_fails_fast_naming_id_and_cache(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://no-such-host.invalid")  # .invalid never resolves (RFC 2606)
    with pytest.raises(CheckpointError) as info:
        upscale("org/missing", str(tmp_path / "dst"), "tli", options=OPTIONS)
    msg = str(info.value)
    assert "no-such-host.invalid cannot be reached" in msg and "models--org--missing" in msg and "\n" not in msg


def test_fetch_list_falls_back_to_bin_weights():
    files = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    files += ["pytorch_model.bin.index.json", "training_args.bin", "tokenizer.model", "sub/config.json"]
    got = fetch_list(files)
    assert "training_args.bin" not in got and "sub/config.json" not in got
    assert set(got) == {
        "config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "tokenizer.model",
    }


def test_hub_id_of_a_cache_folder(hub):
    assert hub_id_of_folder(hub["snapshot"]) == "org/tiny"
    assert hub_id_of_folder(hub["src"]) is None


# ---- .bin ------------------------------------------------------------------------------------------
def _state_dict(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _to_bin(src: str, dst: str, shards: int) -> str:
    """The same model saved with torch.save (zip format), in one file or several with an index."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    sd = _state_dict(src)
    names = sorted(sd)
    if shards == 1:
        torch.save(sd, os.path.join(dst, "pytorch_model.bin"))
        return dst
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: sd[n] for n in names[i::shards]}
        torch.save(part, os.path.join(dst, fname))
        weight_map.update({n: fname for n in part})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(dst, "pytorch_model.bin.index.json"), "w"))
    return dst


@pytest.mark.parametrize("shards, engine", [(1, "python"), (1, "native"), (3, "native")])
def test_bin_source_gives_the_same_bytes(tmp_path, shards, engine):
    from tli_kernels.checkpoint import executor_native

    if engine == "native" and not executor_native.available():
        pytest.skip("native engine not built")
    src = save_tiny_llama(str(tmp_path / "st"), layers=4)
    binsrc = _to_bin(src, str(tmp_path / "bin"), shards)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    upscale(src, a, "tli", options=OPTIONS, engine=engine)
    upscale(binsrc, b, "tli", options=OPTIONS, engine=engine)
    if shards == 1:  # same tensor order in the source, so the same bytes
        assert shard_bytes(a) == shard_bytes(b)
    else:  # the .bin shards order tensors differently (so does the output): same tensors, bit for bit
        ta, tb = _state_dict(a), _state_dict(b)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k].view(torch.int16), tb[k].view(torch.int16)) for k in ta)
    assert json.load(open(os.path.join(a, "config.json"))) == json.load(open(os.path.join(b, "config.json")))


def test_bin_tied_and_viewed_tensors_read_in_place(tmp_path):
    src = save_tiny_llama(str(tmp_path / "st"), layers=2, shard=None)
    sd = _state_dict(src)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # one storage, two names (tied)
    whole = torch.cat([sd["model.norm.weight"], torch.ones(8, dtype=sd["model.norm.weight"].dtype)])
    sd["model.norm.weight"] = whole[:-8]  # a view into a larger storage
    d = tmp_path / "bin"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(sd, d / "pytorch_model.bin")
    layout = CheckpointLayout.open(str(d))
    raw = open(d / "pytorch_model.bin", "rb").read()
    for name, t in layout.tensors.items():
        want = sd[name].contiguous().view(torch.uint8).numpy().tobytes()
        assert raw[t.offset : t.offset + t.nbytes] == want, name


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda sd, p: torch.save({**sd, "x": torch.ones(4, 6).t()}, p), "'x': tensor is not contiguous"),
        (lambda sd, p: torch.save(sd, p, _use_new_zipfile_serialization=False), "legacy pickle"),
        (lambda sd, p: torch.save({"model": sd}, p), "flat dict of tensors"),
    ],
)
def test_bin_sources_that_cannot_be_read_in_place(tmp_path, make, match):
    src = save_tiny_llama(str(tmp_path / "st"), layers=2, shard=None)
    d = tmp_path / "bin"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors"))
    make(_state_dict(src), d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=match) as info:
        upscale(str(d), str(tmp_path / "dst"), "tli", options=OPTIONS)
    assert "convert it to safetensors" in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "dst")


def test_inspect_a_hub_id(hub, capsys):
    from tli_kernels.cli.main import main

    assert main(["inspect", "org/tiny"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == hub["snapshot"] and "layers        4" in out
