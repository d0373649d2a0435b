"""Issue 20, the unclear messages on the conversion side, one test per cause: a random-init bound
blamed on --alpha when the config's initializer_range is at fault; a recipe's `scale` blamed on
--alpha; Hub cache blobs that no longer hash to their names; a trailing newline in refs/main."""

from __future__ import annotations

import json
import os

import pytest

from tests.checkpoint.test_hub import COMMIT, lay_out_cache
from tests.hostile.fuzzing import make_source, run_cli


def one_line(argv: list[str]) -> str:
    code, _, err = run_cli(argv)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("tli: error: "), (code, err)
    assert "internal error" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("command", [["plan"], ["train", "--dry-run"]])
def test_a_huge_initializer_range_is_blamed_on_the_config(tmp_path, command):
    src = make_source(str(tmp_path / "src"), shards=1)
    path = os.path.join(src, "config.json")
    config = json.load(open(path))
    config["initializer_range"] = 1e39
    json.dump(config, open(path, "w"))
    line = one_line([command[0], src, "--method", "tli", "--k", "2", "--init", "random", *command[1:]])
    assert "the config's initializer_range 1e+39 is too large" in line and "smaller --alpha" not in line, line


def test_a_recipe_scale_beyond_float32_is_named_as_the_recipe_scale(tmp_path):
    src = make_source(str(tmp_path / "src"), shards=1)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"slices:\n  - sources: [{{model: {src}, layer_range: [0, 4], parameters: {{scale: 1e39}}}}]\n"
        "merge_method: passthrough\n"
    )
    line = one_line(["plan", str(recipe)])
    assert "scale 1e+39 (the recipe's parameters): float32 cannot hold it" in line and "--alpha" not in line, line


@pytest.fixture
def hub(tmp_path, monkeypatch):
    src = make_source(str(tmp_path / "local"), shards=2)
    cache = tmp_path / "hf-cache"
    snap = lay_out_cache(cache, "org/tiny", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"src": src, "repo": cache / "models--org--tiny", "snapshot": snap}


def test_a_trailing_newline_in_refs_main_is_accepted(hub):
    (hub["repo"] / "refs" / "main").write_text(COMMIT + "\n")
    code, out, err = run_cli(["plan", "org/tiny", "--method", "tli", "--k", "2"])
    assert code == 0 and "injected" in out, (code, err)


def test_a_ref_that_is_not_a_commit_is_refused_naming_it(hub):
    ref = hub["repo"] / "refs" / "main"
    ref.write_text("not-a-commit\n")
    line = one_line(["plan", "org/tiny", "--method", "tli", "--k", "2"])
    assert f"{ref}: does not hold a commit hash ('not-a-commit')" in line, line


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "model-00001-of-00002.safetensors"])
def test_a_cache_blob_that_no_longer_matches_its_hash_is_refused(hub, name):
    link = os.path.join(hub["snapshot"], name)
    blob = os.path.realpath(link)
    data = bytearray(open(blob, "rb").read())
    data[-2] ^= 0x01  # one bit, still parseable as JSON / safetensors padding
    open(blob, "wb").write(bytes(data))
    line = one_line(["plan", "org/tiny", "--method", "tli", "--k", "2"])
    assert f"{blob}: its content does not match the hash it is named by" in line, line


def test_a_bin_whose_zip_records_cannot_be_read_is_named(tmp_path):
    """A flipped 'version needed to extract' byte made zipfile raise NotImplementedError, printed
    as 'tli: error: zip file version 6.4' without the file (tools/fuzz_hostile.py, family bin)."""
    import torch
    from safetensors.torch import load_file

    pristine = make_source(str(tmp_path / "pristine"), shards=1)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (src / name).write_bytes(open(os.path.join(pristine, name), "rb").read())
    path = src / "pytorch_model.bin"
    torch.save(load_file(os.path.join(pristine, "model.safetensors")), path)
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:  # every central directory record: version needed to extract = 6.4
        data[at + 6] = 64
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))
    line = one_line(["plan", str(src), "--method", "tli", "--k", "2"])
    assert f"{path}: not a readable zip-format PyTorch file (zip file version 6.4" in line, line
