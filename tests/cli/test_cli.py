"""The command line: success paths, and every kind of bad input giving one clear line and exit 1
with the source untouched and nothing that passes for a finished output."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from tests.helpers import save_tiny_llama, tree_digest
from tli_kernels.checkpoint.layout import INCOMPLETE_MARKER
from tli_kernels.checkpoint.plan import SurgeryPlan
from tli_kernels.cli.main import main


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the fixtures printed (transformers' progress bars)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_no_finished_output(dst: str) -> None:
    if not os.path.exists(dst):
        return
    assert not os.path.exists(os.path.join(dst, "config.json")), "a failed run left a loadable folder"
    assert os.path.exists(os.path.join(dst, INCOMPLETE_MARKER))


def test_upscale_plan_inspect_verify(tmp_path, capsys):
    src = save_tiny_llama(str(tmp_path / "src"), layers=4)
    dst = tmp_path / "dst"
    code, out, err = run(
        capsys, "upscale", src, dst, "--method", "tli", "--k", "2", "--init", "copy", "--alpha", "0.5", "--quiet",
        "--engine", "python",
    )  # fmt: skip
    assert code == 0, err
    assert "6 layers" in out and f"wrote {dst}" in out
    code, out, _ = run(capsys, "inspect", dst)
    assert code == 0 and "layers        6" in out and "injected layers [2, 5]" in out
    code, out, _ = run(capsys, "inspect", dst, "--json")
    info = json.loads(out)
    assert info["num_layers"] == 6 and info["tli"]["residual_scales"] == {"2": 0.5, "5": 0.5}
    code, out, _ = run(capsys, "plan", src, "--method", "tli", "--k", "2", "--json")
    plan = SurgeryPlan.from_json(json.loads(out))
    assert len(plan.layers) == 6 and plan.to_json() == json.loads(out)
    code, out, _ = run(capsys, "plan", src, "--method", "dus", "--m", "1")
    assert code == 0 and "layer map       0 1 2 1 2 3" in out
    code, out, err = run(capsys, "verify", src, dst, "--max-tokens", "256", "--seq-len", "64")
    assert code == 0, err
    assert "layers          4 -> 6" in out and "max |logit diff|" in out and "held-out loss" in out


def test_dry_run_writes_nothing(tmp_path, capsys):
    src = save_tiny_llama(str(tmp_path / "src"), layers=4)
    dst = tmp_path / "dst"
    code, out, _ = run(capsys, "upscale", src, dst, "--method", "stack", "--times", "3", "--dry-run")
    assert code == 0 and "would write" in out and "12 layers" in out
    assert not dst.exists()


def test_overwrite_and_existing_destination(tmp_path, capsys):
    src = save_tiny_llama(str(tmp_path / "src"), layers=4)
    dst = tmp_path / "dst"
    assert run(capsys, "upscale", src, dst, "--method", "tli", "--k", "2", "--quiet")[0] == 0
    before = tree_digest(str(dst))
    code, _, err = run(capsys, "upscale", src, dst, "--method", "tli", "--k", "4", "--quiet")
    assert code == 1 and "already exists; pass --overwrite" in err and err.count("\n") == 1
    assert tree_digest(str(dst)) == before
    code, _, err = run(capsys, "upscale", src, dst, "--method", "tli", "--k", "4", "--quiet", "--overwrite")
    assert code == 0, err
    assert json.load(open(dst / "config.json"))["num_hidden_layers"] == 5
    # --overwrite never deletes a folder that is not a model folder
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    code, _, err = run(capsys, "upscale", src, other, "--method", "tli", "--k", "2", "--overwrite", "--quiet")
    assert code == 1 and "does not look like a model folder" in err
    assert (other / "thesis.txt").read_text() == "precious"


def _truncate(path, by=10):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - by)


def _header_longer_than_file(path):
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", os.path.getsize(path) + 100))


def _overlap(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    names = [k for k in header if k != "__metadata__"]
    a, b = names[0], names[1]
    b0, b1 = header[b]["data_offsets"]
    # b claims to start 2 bytes into a; keep its size, the total stays consistent only by lying
    header[b]["data_offsets"] = [header[a]["data_offsets"][1] - 2, b1 - 2]
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _index_missing_tensor(src):
    p = os.path.join(src, "model.safetensors.index.json")
    idx = json.load(open(p))
    idx["weight_map"]["model.layers.0.mlp.extra.weight"] = next(iter(idx["weight_map"].values()))
    json.dump(idx, open(p, "w"))


def _index_missing_file(src):
    p = os.path.join(src, "model.safetensors.index.json")
    idx = json.load(open(p))
    idx["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    json.dump(idx, open(p, "w"))


def _first_shard(src):
    return os.path.join(src, sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[0])


def _set_config(src, **kv):
    p = os.path.join(src, "config.json")
    cfg = json.load(open(p))
    cfg.update(kv)
    json.dump(cfg, open(p, "w"))


def _pickle_only(src):
    for f in os.listdir(src):
        if "safetensors" in f:
            os.unlink(os.path.join(src, f))
    open(os.path.join(src, "pytorch_model.bin"), "wb").write(b"\x80\x02")


BAD_SOURCES = {
    "truncated shard": (lambda s: _truncate(_first_shard(s)), "truncated"),
    "header longer than file": (lambda s: _header_longer_than_file(_first_shard(s)), "runs past the end"),
    "overlapping offsets": (lambda s: _overlap(_first_shard(s)), "overlap"),
    "index names missing tensor": (_index_missing_tensor, "model.layers.0.mlp.extra.weight"),
    "index names missing file": (_index_missing_file, "model-00009-of-00009.safetensors"),
    "unsupported architecture": (
        lambda s: _set_config(s, model_type="made_up_lm", architectures=["MadeUpForCausalLM"]),
        "unsupported architecture model_type='made_up_lm'",
    ),
    "quantized": (lambda s: _set_config(s, quantization_config={"quant_method": "bitsandbytes"}), "quantized"),
    "layer count lies": (lambda s: _set_config(s, num_hidden_layers=3), "num_hidden_layers is 3"),
    "pickle only": (_pickle_only, "pickle"),
    "no config": (lambda s: os.unlink(os.path.join(s, "config.json")), "missing config.json"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source(tmp_path, capsys, case):
    src = save_tiny_llama(str(tmp_path / "src"), layers=4)
    breaker, match = BAD_SOURCES[case]
    breaker(src)
    before = tree_digest(src)
    dst = str(tmp_path / "dst")
    code, out, err = run(capsys, "upscale", src, dst, "--method", "tli", "--k", "2", "--quiet")
    assert code == 1
    assert err.startswith("tli: error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert "Traceback" not in err
    assert tree_digest(src) == before
    assert_no_finished_output(dst)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--method", "tli", "--k", "0"], "--k 0: must be between 1 and 4"),
        (["--method", "tli", "--k", "5"], "--k 5: must be between 1 and 4"),
        (["--method", "dus", "--k", "2"], "--k does not apply to --method dus"),
        (["--method", "passthrough", "--layers", "0-9"], "layer 9 does not exist"),
        (["--method", "tli", "--shard-size", "lots"], "--shard-size 'lots'"),
        (["--method", "tli", "--part", "3/2"], "--part '3/2'"),
        (["--method", "moe-upcycle", "--experts", "2", "--top-k", "3"], "--top-k 3"),
    ],
)
def test_bad_options(tmp_path, capsys, argv, match):
    src = save_tiny_llama(str(tmp_path / "src"), layers=4)
    dst = str(tmp_path / "dst")
    code, _, err = run(capsys, "upscale", src, dst, *argv, "--quiet")
    assert code == 1 and match in err and err.count("\n") == 1, err
    assert not os.path.exists(dst)


def test_destination_inside_or_around_source(tmp_path, capsys):
    src = save_tiny_llama(str(tmp_path / "src"), layers=4)
    before = tree_digest(src)
    for dst, match in [
        (os.path.join(src, "up"), "inside the source"),
        (src, "is the source folder"),
        (str(tmp_path), "contains the source"),
    ]:
        code, _, err = run(capsys, "upscale", src, dst, "--method", "tli", "--k", "2", "--overwrite", "--quiet")
        assert code == 1 and match in err, err
    assert tree_digest(src) == before


def test_source_changing_before_execution_leaves_no_finished_output(tmp_path, capsys, monkeypatch):
    """The source shrinks after planning: the executor notices, DST stays marked incomplete."""
    import tli_kernels.upscale as up

    src = save_tiny_llama(str(tmp_path / "src"), layers=4)
    real = up.execute_python

    def sabotage(plan, layout, dst, **kw):
        _truncate(_first_shard(src), by=64)
        return real(plan, layout, dst, **kw)

    monkeypatch.setattr(up, "execute_python", sabotage)
    dst = str(tmp_path / "dst")
    code, _, err = run(capsys, "upscale", src, dst, "--method", "tli", "--k", "2", "--quiet", "--engine", "python")
    assert code == 1 and "size changed" in err and os.path.basename(_first_shard(src)) in err, err
    assert_no_finished_output(dst)
    assert os.path.exists(dst)
    code, _, err = run(capsys, "inspect", dst)
    assert code == 1 and "unfinished tli output" in err


def test_real_process_exit_codes(tmp_path):
    src = save_tiny_llama(str(tmp_path / "src"), layers=2)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(__file__)))}
    cmd = [sys.executable, "-m", "tli_kernels.cli.main"]
    ok = subprocess.run(
        cmd + ["upscale", src, str(tmp_path / "d"), "--method", "tli", "--k", "1", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        cmd + ["upscale", src, str(tmp_path / "d"), "--method", "tli", "--k", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 1 and bad.stderr.strip().startswith("tli: error:")
    usage = subprocess.run(cmd + ["upscale", src], capture_output=True, text=True, env=env)
    assert usage.returncode == 2
    shutil.rmtree(tmp_path / "d")


def test_conversion_path_does_not_import_torch():
    """`tli upscale` starts fast and small: neither the parser nor the conversion code imports torch."""
    code = (
        "import sys; from tli_kernels.cli.main import build_parser; build_parser(); "
        "import tli_kernels.upscale, tli_kernels.checkpoint.output; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo}
    )
    assert proc.returncode == 0, proc.stderr
    from tli_kernels.training import cli, trainer

    assert cli.TRAIN_CHOICES == trainer.TRAIN_CHOICES
