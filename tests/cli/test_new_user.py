"""What a new user trips over (issue 21): options that would silently do nothing, outputs smaller
than asked, a broken pipe, abbreviations, and what `tli` alone prints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import save_tiny_llama
from tli_kernels.cli.main import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("src") / "m"), layers=4)


@pytest.mark.parametrize("init", [None, "zero"])
def test_alpha_with_the_identity_init_is_refused(src, capsys, init):
    argv = ["plan", src, "--method", "tli", "--k", "2", "--alpha", "0.5"] + (["--init", init] if init else [])
    code, out, err = run(capsys, *argv)
    default = "" if init else " (the default)"
    assert code == 1 and out == ""
    assert err.startswith(f"tli: error: --alpha 0.5 has no effect with --init zero{default}: ") and err.count("\n") == 1


@pytest.mark.parametrize("extra", [["--init", "copy", "--alpha", "0.5"], ["--init", "zero", "--alpha", "1"], []])
def test_alpha_where_it_applies_is_accepted(src, capsys, extra):
    code, out, err = run(capsys, "plan", src, "--method", "tli", "--k", "2", *extra)
    assert code == 0, err


def test_dus_that_would_shrink_the_model_is_refused_without_allow_shrink(src, tmp_path, capsys):
    code, out, _ = run(capsys, "plan", src, "--method", "dus", "--m", "3")
    assert code == 0 and "note            --method dus --m 3: the output has 2 layers, fewer than the source's 4" in out
    dst = tmp_path / "dst"
    code, out, err = run(capsys, "upscale", src, dst, "--method", "dus", "--m", "3", "--quiet")
    assert code == 1 and err.count("\n") == 1 and "pass --allow-shrink" in err
    assert not dst.exists()
    code, out, err = run(capsys, "upscale", src, dst, "--method", "dus", "--m", "3", "--quiet", "--allow-shrink")
    assert code == 0, err
    assert f"wrote {dst}: 2 layers" in out
    code, out, err = run(capsys, "upscale", src, tmp_path / "same", "--method", "dus", "--m", "2", "--quiet")
    assert code == 0 and "note" not in out, err  # 4 -> 4 layers: not smaller


def test_a_closed_pipe_ends_quietly(src):
    """`tli plan ... | head`: no 'Broken pipe' error, the exit status of a program stopped by SIGPIPE."""
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "tli_kernels.cli.main", "plan", src, "--method", "tli", "--k", "2", "--json"]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before tli writes a byte
    proc = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, env=env, text=True, timeout=120)
    os.close(write)
    assert proc.stderr == "" and proc.returncode == 141


def test_abbreviated_options_are_refused(src, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", src, "--meth", "tli"])
    assert e.value.code == 2 and "unrecognized arguments: --meth tli" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", src, "--step", "2"])
    assert "unrecognized arguments: --step 2" in capsys.readouterr().err


def test_tli_alone_lists_the_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    for command in ("upscale", "plan", "inspect", "verify", "demo", "train", "study"):
        assert f"    {command} " in err  # the subcommand list of the help
    assert "tli train DST -o CKPT" in err  # and train among the examples


def test_verify_says_what_it_does_and_holds_one_model_at_a_time(src, tmp_path, capsys, monkeypatch):
    import gc
    import weakref

    import torch

    from tli_kernels import evaluation

    dst = tmp_path / "dst"
    assert run(capsys, "upscale", src, dst, "--method", "tli", "--k", "2", "--init", "copy", "--quiet")[0] == 0
    real_load, alive = evaluation.load_causal_lm, []

    def load(path, *args, **kwargs):
        gc.collect()
        alive.append([ref() is not None for ref in refs])  # earlier models still in memory when this one loads
        model, tok = real_load(path, *args, **kwargs)
        refs.append(weakref.ref(model))
        return model, tok

    refs: list = []
    monkeypatch.setattr(evaluation, "load_causal_lm", load)
    code, out, err = run(capsys, "verify", src, dst, "--seq-len", "32", "--max-tokens", "128")
    assert code == 0 and err == "", err  # stderr is not a terminal: no progress (a script's stderr keeps errors)
    assert alive == [[], [False]]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # at a terminal it says what it does
    code, out, err = run(capsys, "verify", src, dst, "--seq-len", "32", "--max-tokens", "128")
    assert code == 0, err
    assert f"verify: loading {src}" in err and f"verify: loading {dst}" in err and f"verify: scoring {dst}" in err
    # the same numbers as both models side by side
    monkeypatch.setattr(evaluation, "load_causal_lm", real_load)
    (a, _), (b, _) = real_load(src), real_load(str(dst))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, a.config.vocab_size, (1, 32), generator=g)
    ids = torch.randint(0, a.config.vocab_size, (128,), generator=g)
    batches = evaluation.windows(ids, 32, 128)
    assert f"max |logit diff| on the fixed prompt: {evaluation.max_logit_difference(a, b, prompt):.3e}" in out
    src_loss, dst_loss = evaluation.mean_loss(a, batches), evaluation.mean_loss(b, batches)
    assert f"source {src_loss:.4f}  upscaled {dst_loss:.4f}" in out
    assert run(capsys, "verify", src, dst, "--seq-len", "32", "--max-tokens", "128", "--quiet")[2] == ""


def test_the_progress_bar_counts_in_mb_as_the_summary_does(src, tmp_path, capsys):
    from tqdm import tqdm

    from tli_kernels.methods import plan_source

    _, plan = plan_source(src, "tli", None, {"k": 2})
    total = sum(s.data_bytes for s in plan.shards)
    assert tqdm.format_sizeof(total, divisor=1000) != tqdm.format_sizeof(total, divisor=1024)
    code, out, err = run(capsys, "upscale", src, tmp_path / "dst", "--method", "tli", "--k", "2")
    assert code == 0, err
    size = tqdm.format_sizeof(total, divisor=1000)
    assert f"| {size}/{size} [" in err  # kB as the summary's MB / GB, not KiB


def test_a_recipe_plan_header_says_what_the_recipe_is(src, tmp_path, capsys):
    code, recipe, err = run(capsys, "plan", src, "--method", "dus", "--m", "1", "--recipe")
    assert code == 0, err
    path = tmp_path / "r.yml"
    path.write_text(recipe)
    code, out, err = run(capsys, "plan", path)
    assert code == 0, err
    assert "method          recipe (2 slices from 1 model, passthrough)" in out
