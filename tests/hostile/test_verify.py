"""`tli verify` on hostile folders: one line naming what is wrong, never a traceback, never numbers
for a model other than the one on disk (transformers would fill missing layers with random weights)."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import save_tiny_llama
from tests.hostile.fuzzing import check_run, run_cli


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    src = save_tiny_llama(str(base / "src"), layers=2, shard=None)
    dst = str(base / "dst")
    assert run_cli(["upscale", src, dst, "--method", "tli", "--k", "1", "--quiet"])[0] == 0
    return str(base), src, dst


def _copy(path: str, to: str) -> str:
    os.makedirs(to)
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f, open(os.path.join(to, name), "wb") as g:
            g.write(f.read())
    return to


def verify(base, src, dst, *extra, names=()):
    argv = ["verify", src, dst, "--max-tokens", "64", "--seq-len", "32", *extra]
    return check_run(argv, src, dst, base, names)


def one_line(out, *words):
    assert out.code == 1 and not out.problems, out
    for w in words:
        assert w in out.err, (w, out.err)


def test_verify_refuses_a_config_with_more_layers_than_the_weights(models, tmp_path):
    base, src, dst = models
    bad = _copy(dst, str(tmp_path / "bad"))
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["num_hidden_layers"] += 3  # 7 layers described, 4 stored: 3 would be random
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    one_line(verify(str(tmp_path), src, bad), bad, "do not hold", "model.layers.4.")


def test_verify_refuses_truncated_weights(models, tmp_path):
    base, src, dst = models
    bad = _copy(dst, str(tmp_path / "bad"))
    weights = os.path.join(bad, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) - 100)
    one_line(verify(str(tmp_path), src, bad), weights, "truncated")


def test_verify_with_another_vocabulary(models, tmp_path):
    base, src, _ = models
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    config.vocab_size = 96
    other = str(tmp_path / "other")
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    one_line(verify(str(tmp_path), src, other), other, "vocab_size 96", src)


def test_verify_text_not_utf8(models, tmp_path):
    base, src, dst = models
    text = tmp_path / "text.txt"
    text.write_bytes(b"In the beginning \xff\xfe was the word" * 10)
    out = verify(str(tmp_path), src, dst, "--text", str(text), names=(str(text),))
    one_line(out, str(text), "not valid UTF-8")
