"""`tli upscale RECIPE.yml DST`, `tli plan RECIPE.yml`, `tli plan SRC --method ... --recipe`, and their
errors: one line, exit 1, nothing written."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import save_tiny_llama
from tli_kernels.cli.main import main


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def shards(path: str) -> dict[str, bytes]:
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path)) if f.endswith(".safetensors")}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("cli") / "src"), layers=6)


@pytest.mark.parametrize(
    "argv", [["--method", "dus", "--m", "2"], ["--method", "tli", "--k", "3", "--alpha", "0.5", "--init", "copy"]]
)
def test_flag_plan_to_recipe_and_back(src, tmp_path, capsys, argv):
    code, out, err = run(capsys, "plan", src, *argv, "--dtype", "fp16", "--recipe")
    assert code == 0, err
    recipe = tmp_path / "r.yml"
    recipe.write_text(out)
    a, b = tmp_path / "from-flags", tmp_path / "from-recipe"
    assert run(capsys, "upscale", src, a, *argv, "--dtype", "fp16", "--quiet")[0] == 0
    code, out, err = run(capsys, "upscale", recipe, b, "--quiet")
    assert code == 0, err
    assert shards(a) == shards(b)
    assert json.load(open(a / "config.json")) == json.load(open(b / "config.json"))
    code, out, _ = run(capsys, "plan", recipe)
    assert code == 0 and "method          recipe" in out and "layer map" in out
    code, out, _ = run(capsys, "plan", recipe, "--json")
    assert json.loads(out)["method"] == "recipe"


def test_two_model_recipe_summary(src, tmp_path, capsys):
    other = save_tiny_llama(str(tmp_path / "other"), layers=6, seed=4)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"slices:\n  - sources: [{{model: {src}, layer_range: [0, 4]}}]\n"
        f"  - sources: [{{model: {other}, layer_range: [2, 6]}}]\nmerge_method: passthrough\n"
    )
    code, out, err = run(capsys, "plan", recipe)
    assert code == 0, err
    assert "2 models, 12 layers" in out and "output          8 layers" in out
    code, out, err = run(capsys, "upscale", recipe, tmp_path / "dst", "--quiet")
    assert code == 0 and "wrote" in out, err


def test_help_shows_a_recipe_next_to_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    out = capsys.readouterr().out
    assert "--method passthrough --layers 0-11,4-15" in out and "layer_range: [0, 12]" in out


@pytest.mark.parametrize(
    "recipe, argv, match",
    [
        ("slices: [{sources: [{model: SRC, layer_range: [0, 2]}]}]\nmerge_method: slerp\n", [], "merge_method 'slerp'"),
        (
            "slices: [{sources: [{model: SRC, layer_range: [0, 2]}]}]\nmerge_method: passthrough\n",
            ["--method", "dus"],
            "--method dus does not apply to a recipe",
        ),
        (
            "slices: [{sources: [{model: SRC, layer_range: [0, 2]}]}]\nmerge_method: passthrough\n",
            ["--k", "2"],
            "--k does not apply to a recipe",
        ),
        (
            "slices: [{sources: [{model: SRC, layer_range: [0, 9]}]}]\nmerge_method: passthrough\n",
            [],
            "the model has 6 layers",
        ),
        ("slices: [{sources: [{model: SRC, layer_range: [0, 2]}]\nmerge_method: passthrough\n", [], "not valid YAML"),
        (
            "slices: [{sources: [{model: SRC, layer_range: [0, 2]}]}]\nmerge_method: passthrough\ndtype: bfloat16\n",
            ["--dtype", "fp16"],
            "contradicts",
        ),
    ],
)
def test_recipe_errors(src, tmp_path, capsys, recipe, argv, match):
    path = tmp_path / "r.yml"
    path.write_text(recipe.replace("SRC", src))
    dst = tmp_path / "dst"
    code, _, err = run(capsys, "upscale", path, dst, *argv, "--quiet")
    assert code == 1 and match in err and err.count("\n") == 1, err
    assert not dst.exists()


def test_method_required_without_a_recipe(src, tmp_path, capsys):
    code, _, err = run(capsys, "upscale", src, tmp_path / "dst")
    assert code == 1 and "--method is required" in err


def test_recipe_in_parts_then_resume(src, tmp_path, capsys):
    """A recipe compiles to the same plan every time, so --part and --resume work as for the flags."""
    other = save_tiny_llama(str(tmp_path / "other"), layers=6, seed=5)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"slices:\n  - sources: [{{model: {src}, layer_range: [0, 4]}}]\n"
        f"  - sources: [{{model: {other}, layer_range: [2, 6], parameters: {{scale: 0.5}}}}]\n"
        "merge_method: passthrough\n"
    )
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(capsys, "upscale", recipe, whole, "--shard-size", "100KB", "--quiet")[0] == 0
    code, out, err = run(capsys, "upscale", recipe, parts, "--shard-size", "100KB", "--part", "1/2", "--quiet")
    assert code == 0 and "part 1/2" in out, err
    assert not (parts / "config.json").exists()
    code, out, err = run(capsys, "upscale", recipe, parts, "--shard-size", "100KB", "--resume", "--quiet")
    assert code == 0, err
    assert shards(whole) == shards(parts) and len(shards(whole)) > 2
