"""Issue 20, the hangs: each input is answered with one line and exit 1 (or, where the input is
fine, exit 0), in a subprocess under a 2 GB address-space limit. The subprocess timeout is only a
guard that turns a hang into a failure; no assertion is about how long anything took.

- a YAML alias bomb in a recipe (expansion bounded, the value never printed);
- a FIFO named like a recipe (refused, not taken for a model folder that needs --method);
- a Hub cache whose refs/main is a FIFO;
- `tli train --text` on a FIFO and on /dev/zero (refused before anything is loaded);
- `tli train --dry-run --world-size 10**30` (bounded; large worlds cost what one rank costs).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from tests.hostile.fuzzing import make_source

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUARD_SECONDS = 300  # a hang guard only


def run_limited(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    full_env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tli_kernels.cli.main", *args], preexec_fn=limit, env=full_env,
                          capture_output=True, text=True, timeout=GUARD_SECONDS)  # fmt: skip


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("tli: error: "), done.stderr[-2000:]
    assert "internal error" not in lines[0] and "Traceback" not in done.stderr
    return lines[0]


def alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + f"\nmerge_method: *a{levels - 1}\nslices: []\n"


@pytest.mark.parametrize("command", ["plan", "upscale"])
def test_a_yaml_alias_bomb_is_refused_unexpanded(tmp_path, command):
    recipe = tmp_path / "bomb.yml"
    recipe.write_text(alias_bomb())
    assert len(recipe.read_bytes()) < 1000
    args = [command, str(recipe)] + ([str(tmp_path / "out")] if command == "upscale" else [])
    line = one_error_line(run_limited(args))
    assert str(recipe) in line and "alias" in line and len(line) < 400, line
    assert not os.path.exists(tmp_path / "out")


def test_a_deeply_nested_recipe_is_refused_naming_it(tmp_path):
    """3000 nested lists overflowed Python's recursion ('maximum recursion depth exceeded', no file)."""
    recipe = tmp_path / "nest.yml"
    recipe.write_text("merge_method: passthrough\nslices: " + "[" * 3000 + "]" * 3000 + "\n")
    line = one_error_line(run_limited(["plan", str(recipe)]))
    assert f"{recipe}: not valid YAML (nested more than 64 levels deep" in line, line


def test_a_recipe_may_still_reuse_a_value_through_an_alias(tmp_path):
    from tli_kernels.methods.recipe import load_recipe

    src = make_source(str(tmp_path / "src"), shards=1)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"slices:\n  - sources: [{{model: &m {src}, layer_range: [0, 2]}}]\n"
        "  - sources: [{model: *m, layer_range: [1, 4]}]\nmerge_method: passthrough\n"
    )
    assert [s.source.model for s in load_recipe(str(recipe)).slices] == [src, src]


def test_a_fifo_named_like_a_recipe_is_refused_as_such(tmp_path):
    fifo = tmp_path / "r.yml"
    os.mkfifo(fifo)
    line = one_error_line(run_limited(["upscale", str(fifo), str(tmp_path / "out")]))
    assert f"{fifo}: recipe is a FIFO (named pipe), not a regular file" in line, line
    assert "--method is required" not in line


def test_a_hub_cache_ref_that_is_a_fifo_is_refused(tmp_path):
    from tests.checkpoint.test_hub import lay_out_cache

    src = make_source(str(tmp_path / "src"), shards=1)
    cache = tmp_path / "hf-cache"
    lay_out_cache(cache, "org/tiny", src)
    ref = cache / "models--org--tiny" / "refs" / "main"
    ref.unlink()
    os.mkfifo(ref)
    done = run_limited(["plan", "org/tiny", "--method", "tli", "--k", "2"],
                       env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    line = one_error_line(done)
    assert f"{ref}: Hub cache ref is a FIFO (named pipe), not a regular file" in line, line


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize("flag", ["--text", "--eval-text", "--data"])
def test_train_refuses_a_fifo_or_a_device_as_text_up_front(tmp_path, kind, flag):
    path = "/dev/zero"
    if kind == "fifo":
        path = str(tmp_path / "text.txt")
        os.mkfifo(path)
    src = make_source(str(tmp_path / "src"), shards=1)
    line = one_error_line(run_limited(["train", src, flag, path, "-o", str(tmp_path / "o"), "--steps", "1"]))
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert f"{flag} {path}: is {what}, not a regular file" in line, line
    assert not os.path.exists(tmp_path / "o")


def test_dry_run_refuses_an_absurd_world_size(tmp_path):
    src = make_source(str(tmp_path / "src"), shards=1)
    line = one_error_line(run_limited(["train", src, "--method", "tli", "--k", "2", "--dry-run",
                                       "--world-size", str(10**30)]))  # fmt: skip
    assert f"--world-size {10**30}: more than" in line, line


def test_dry_run_of_a_large_world_costs_what_one_rank_costs(tmp_path):
    from tli_kernels.training.dry_run import LISTED_RANKS, dry_run
    from tli_kernels.training.trainer import TrainConfig

    src = make_source(str(tmp_path / "src"), shards=1)
    cfg = TrainConfig(model=src, method="tli", method_options={"k": 2})
    small, large = dry_run(cfg, world=3), dry_run(cfg, world=10**6)
    assert len(small.ranks) == 3 and len(large.ranks) == 1 and 10**6 > LISTED_RANKS
    assert small.bytes_read_all == sum(r.bytes_read for r in small.ranks) == large.bytes_read_all
    assert large.ranks[0].params == max(r.params for r in dry_run(cfg, world=10**3).ranks)
    assert "world size      1000000 ranks" in large.text()
