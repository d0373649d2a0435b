"""The model card every output gets: README.md front matter as the Hub reads it, and a body that says
how the model was made (recipe or command + its recipe), the layer map and the injected layers' alpha."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from tests.helpers import save_tiny_llama
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.methods.recipe import compile_recipe, parse_recipe
from tli_kernels.upscale import upscale


def card(path: str) -> tuple[dict, str]:
    text = open(os.path.join(path, "README.md"), encoding="utf-8").read()
    m = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


def yaml_blocks(body: str) -> list:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", body, re.S)]


def table_rows(body: str, heading: str) -> list[list[str]]:
    part = body.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("card") / "src"), layers=4)


def test_card_of_a_flag_plan(src, tmp_path):
    dst = str(tmp_path / "where-it-was-written")
    result = upscale(src, dst, "tli", options=dict(k=2, init="copy", alpha=0.25))
    front, body = card(dst)
    assert front == {"tags": ["tli", "depth-upscaling"], "library_name": "transformers"}  # local: no Hub id
    assert "tli upscale " in body and "--method tli --k 2 --init copy --alpha 0.25" in body
    assert os.path.basename(dst) not in body  # the same plan gives the same card wherever it is written
    (recipe,) = yaml_blocks(body)  # the equivalent mergekit recipe, which compiles to the same tensors
    _, again, _ = compile_recipe(parse_recipe(recipe), opener=lambda ref: CheckpointLayout.open(src))
    assert [s.tensors for s in again.shards] == [s.tensors for s in result.plan.shards]
    rows = table_rows(body, "Layer map")
    assert [r[0] for r in rows] == [str(j) for j in range(6)]
    assert [r[1] for r in rows] == ["0", "1", "1", "2", "3", "3"]
    assert table_rows(body, "Injected layers") == [["2", "copy", "0.25"], ["5", "copy", "0.25"]]


def test_card_of_a_recipe(src, tmp_path):
    other = save_tiny_llama(str(tmp_path / "other"), layers=4, seed=3)
    recipe = {
        "slices": [
            {"sources": [{"model": src, "layer_range": [0, 3]}]},
            {"sources": [{"model": other, "layer_range": [1, 4], "parameters": {"scale": 0.5}}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float16",
    }
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    dst = str(tmp_path / "out")
    upscale(str(path), dst, None)
    front, body = card(dst)
    assert front["library_name"] == "transformers" and "merge" in front["tags"]
    assert yaml_blocks(body) == [recipe]
    rows = table_rows(body, "Layer map")
    assert [(r[1], r[2]) for r in rows] == [
        (src, "0"),
        (src, "1"),
        (src, "2"),
        (other, "1"),
        (other, "2"),
        (other, "3"),
    ]
    assert "Injected layers" not in body


def test_card_of_a_plan_passthrough_cannot_express(src, tmp_path):
    dst = str(tmp_path / "out")
    upscale(src, dst, "moe-upcycle", options=dict(experts=2, top_k=1))
    front, body = card(dst)
    assert "moe-upcycle" in front["tags"] and "--experts 2 --top-k 1" in body
    assert yaml_blocks(body) == []


def test_resume_clears_what_an_interrupted_finish_left(src, tmp_path):
    """A run stopped inside finish() (README.md, config.json being written) leaves temporary files;
    the run that finishes the folder removes them, so it holds exactly what an unbroken run writes."""
    dst, ref = tmp_path / "dst", tmp_path / "ref"
    upscale(src, str(ref), "tli", options=dict(k=2))
    upscale(src, str(dst), "tli", options=dict(k=2), part="1/1")  # every shard, not finished
    for name in ("README.md.tmp-999", "config.json.tmp-999", "generation_config.json.tmp"):
        (dst / name).write_text("left by a killed run")
    result = upscale(src, str(dst), "tli", options=dict(k=2), resume=True)
    assert result.finished
    assert sorted(os.listdir(dst)) == sorted(os.listdir(ref))
    assert all(open(dst / n, "rb").read() == open(ref / n, "rb").read() for n in os.listdir(ref))
