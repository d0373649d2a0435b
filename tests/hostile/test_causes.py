"""One test per cause of issue 13 (hostile inputs and faults) that the conversion path owns.

Every test checks the same contract (tests/hostile/fuzzing.py, check_run): exit 0 or 1, one line
naming the file or option at fault, the source's bytes unchanged, nothing changed outside DST, and
no folder left that tli or transformers would take for complete. The layer-structure causes
(aliases, layer counts, config types) are tested with the layout code (issue 9), the `tli train`
ones with the trainer (issue 12).
"""

from __future__ import annotations

import filecmp
import json
import os
import resource
import struct
import subprocess
import sys
import time

import pytest

from tests.hostile.fuzzing import (
    ENGINES,
    check_run,
    is_complete,
    make_source,
    read_raw_header,
    run_cli,
    shard_files,
    snapshot,
    write_raw,
)
from tli_kernels.checkpoint import executor_native, executor_python, output
from tli_kernels.checkpoint.layout import CONFIG_NAME, INCOMPLETE_MARKER, INDEX_NAME, PROVENANCE_NAME
from tli_kernels.checkpoint.outdir import OutputDir

TLI = ["--method", "tli", "--k", "2", "--init", "average", "--alpha", "0.5", "--shard-size", "20KB"]
needs_native = pytest.mark.skipif(not executor_native.available(), reason="native engine not built")


@pytest.fixture
def area(tmp_path):
    """tmp_path with a source, and a file outside both source and DST that nothing may touch."""
    make_source(str(tmp_path / "src"))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim.txt").write_text("not tli's")
    return tmp_path


def upscale(area, *extra, engine="python", dst="dst", names=()):
    src, d = str(area / "src"), str(area / dst)
    return check_run(["upscale", src, d, *TLI, "--quiet", "--engine", engine, *extra], src, d, str(area), names)


def reference(area) -> str:
    """An uninterrupted run of the same source into area/ref."""
    assert upscale(area, dst="ref").code == 0
    return str(area / "ref")


def assert_same_folder(a: str, b: str) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


def flip_data_byte(path: str, where: float = 0.5) -> None:
    """Change one byte of the data (not the header) of a safetensors file, in place."""
    n, _, rest = read_raw_header(path)
    pos = 8 + n + int(len(rest) * where)
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))


def rewrite_all_data(path: str) -> None:
    """A fine-tune saved over the file: same header and size, every data byte different."""
    n, header, rest = read_raw_header(path)
    write_raw(path, n, header, bytes(b ^ 0x5A for b in rest))


def one_line(outcome, *words):
    assert outcome.code == 1, outcome
    assert not outcome.problems, outcome.problems
    for w in words:
        assert w in outcome.err, (w, outcome.err)


# ---- 1. --alpha: nothing float32 cannot hold, no overflow into inf/NaN --------------------------------
@pytest.mark.parametrize("alpha", ["1e40", "-1e40", "inf", "nan"])
def test_alpha_beyond_float32_is_refused_before_writing(area, alpha):
    src, dst = str(area / "src"), str(area / "dst")
    argv = ["upscale", src, dst, "--method", "tli", "--k", "2", "--init", "copy", f"--alpha={alpha}", "--quiet"]
    one_line(check_run(argv, src, dst, str(area), names=("--alpha",)), "--alpha")
    assert not os.path.exists(dst)
    plan = check_run(
        ["plan", src, "--method", "tli", "--k", "2", f"--alpha={alpha}"], src, dst, str(area), ("--alpha",)
    )
    one_line(plan, "--alpha")


def test_library_call_with_alpha_beyond_float32(area):
    from tli_kernels.upscale import upscale as upscale_call

    with pytest.raises(ValueError, match="--alpha 1e\\+40"):
        upscale_call(str(area / "src"), str(area / "dst"), "tli", options=dict(k=2, init="copy", alpha=1e40))
    assert not os.path.exists(area / "dst")


@pytest.mark.parametrize("engine", ENGINES)
def test_finite_alpha_that_overflows_the_weights(area, engine):
    """float32 holds 1e6, but 1e6 x these weights overflows float16: refused, naming --alpha and the tensor."""
    out = upscale(area, "--init", "copy", "--alpha=1e6", "--dtype", "fp16", engine=engine, names=("--alpha",))
    one_line(out, "--alpha 1e+06", "overflows F16", "tensor 'model.layers.")
    # the same weights at bf16 (range 3e38) take that alpha: the result is finite and written
    assert upscale(area, "--init", "copy", "--alpha=1e6", engine=engine, dst="ok").code == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_dtype_that_cannot_hold_the_weights(tmp_path, engine):
    """An F32 weight of 1e5 cast to fp16 would be inf: refused, naming --dtype."""
    src = make_source(str(tmp_path / "src"), shards=1)
    path = os.path.join(src, "model.safetensors")
    n, header, rest = read_raw_header(path)
    entry = json.loads(header)["model.norm.weight"]
    # model.norm.weight is BF16 here: write 0x47C3 (bf16 for 99840) into its first element
    pos = entry["data_offsets"][0]
    write_raw(path, n, header, rest[:pos] + struct.pack("<H", 0x47C3) + rest[pos + 2 :])
    dst = str(tmp_path / "dst")
    argv = ["upscale", src, dst, *TLI, "--dtype", "fp16", "--engine", engine, "--quiet"]
    one_line(check_run(argv, src, dst, str(tmp_path), ("--dtype",)), "--dtype", "'model.norm.weight'")


# ---- 2. the source edited between a kill and --resume ---------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("edit", ["one-byte-in-place-mtime-restored", "rewritten-as-a-new-file"])
def test_source_edited_between_kill_and_resume(area, engine, edit):
    assert upscale(area, "--part", "1/2", engine=engine).code == 0  # what a killed run leaves
    victim = os.path.join(area / "src", shard_files(str(area / "src"))[-1])
    if edit.startswith("one-byte"):  # between the fingerprint's samples? ctime still sees it
        st = os.stat(victim)
        flip_data_byte(victim, 0.37)
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(victim).st_mtime_ns == st.st_mtime_ns
    else:  # a fine-tune saved under the same name: new inode, same header and size
        with open(victim, "rb") as f:
            data = f.read()
        with open(victim + ".new", "wb") as f:
            f.write(data)
        rewrite_all_data(victim + ".new")
        os.replace(victim + ".new", victim)
    out = upscale(area, "--resume", engine=engine)
    one_line(out, victim, "source changed since", "--overwrite")
    assert os.path.exists(area / "dst" / INCOMPLETE_MARKER)


# ---- 3. --overwrite never removes what the source uses -----------------------------------------------
def test_overwrite_refuses_a_dst_holding_the_source_data(area):
    ref = reference(area)
    src = area / "src"
    for name in shard_files(str(src)):  # the source's weights are links into the output folder
        os.replace(src / name, area / "ref" / f"kept-{name}")
        os.symlink(area / "ref" / f"kept-{name}", src / name)
    before = snapshot(ref)
    out = check_run(["upscale", str(src), ref, *TLI, "--quiet", "--overwrite"], str(src), ref, str(area))
    one_line(out, "inside DST", str(src))
    assert snapshot(ref) == before  # (check_run skips DST; it is unchanged too)


def test_overwrite_refuses_a_symlinked_dst(area):
    reference(area)
    os.symlink(area / "ref", area / "link")
    before = snapshot(str(area / "ref"))
    out = upscale(area, "--overwrite", dst="link")
    one_line(out, str(area / "link"), "symbolic link")
    assert snapshot(str(area / "ref")) == before


# ---- 4. the source replaced or edited while a run is writing --------------------------------------
@pytest.mark.parametrize("edit", ["in-place-mtime-restored", "replaced-by-rename"])
def test_source_changed_during_a_python_engine_run(area, monkeypatch, edit):
    victim = os.path.join(area / "src", shard_files(str(area / "src"))[0])
    real, calls = executor_python._write_shard, []

    def after_first_shard(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            if edit.startswith("in-place"):
                st = os.stat(victim)
                flip_data_byte(victim)
                os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
            else:
                with open(victim, "rb") as f:
                    data = f.read()
                with open(victim + ".new", "wb") as f:
                    f.write(data)
                rewrite_all_data(victim + ".new")
                os.replace(victim + ".new", victim)

    monkeypatch.setattr(executor_python, "_write_shard", after_first_shard)
    src, dst = str(area / "src"), str(area / "dst")
    code, _, err = run_cli(["upscale", src, dst, *TLI, "--quiet", "--engine", "python"])
    assert code == 1 and victim in err and "changed" in err and len(err.strip().splitlines()) == 1, err
    assert not is_complete(dst)


@needs_native
def test_source_edited_in_place_with_mtime_restored_during_a_native_run(area):
    src, dst = str(area / "src"), str(area / "dst")
    victim = os.path.join(src, shard_files(src)[-1])
    env = {**os.environ, executor_native.TEST_DELAY_ENV: "20000"}
    cmd = [sys.executable, "-m", "tli_kernels.cli.main", "upscale", src, dst, *TLI, "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (os.path.isdir(dst) and any(n.endswith(".partial") for n in os.listdir(dst))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    st = os.stat(victim)
    flip_data_byte(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and victim in err and "ctime" in err and "Traceback" not in err, err
    assert not is_complete(dst)


# ---- 6. links planted in DST are never written through -----------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_links_planted_in_dst_are_replaced_not_followed(area, engine):
    ref = reference(area)
    src = area / "src"
    first = upscale(area, "--part", "1/2", engine=engine)
    assert first.code == 0
    dst = area / "dst"
    outside = area / "outside"
    written = set(os.listdir(dst))
    todo = sorted(n for n in os.listdir(ref) if n.endswith(".safetensors") and n not in written)
    assert len(todo) >= 2
    pid = os.getpid()  # the in-process run's temporary names are NAME.tmp-PID
    for name in (CONFIG_NAME, PROVENANCE_NAME, INDEX_NAME, "tokenizer_config.json"):
        os.symlink(outside / "victim.txt", dst / f"{name}.tmp-{pid}")
    os.symlink(src / shard_files(str(src))[0], dst / f"{todo[0]}.partial")  # would truncate the source
    os.link(outside / "victim.txt", dst / f"{todo[1]}.partial")  # a hard link: same inode
    os.symlink(outside / "victim.txt", dst / todo[1])  # a link under a final name
    os.symlink(outside / "victim.txt", dst / output.SHARDS_DIR / f"{todo[0]}.json.tmp")  # native sidecar tmp
    out = upscale(area, "--resume", engine=engine)
    assert out.code == 0 and not out.problems, out
    assert (outside / "victim.txt").read_text() == "not tli's"
    assert_same_folder(str(dst), ref)


def test_tli_folder_replaced_by_a_link_is_an_error(area):
    assert upscale(area, "--part", "1/2").code == 0
    shards = area / "dst" / output.SHARDS_DIR
    for name in os.listdir(shards):
        os.unlink(shards / name)
    shards.rmdir()
    os.symlink(area / "outside", shards)
    out = upscale(area, "--resume")
    one_line(out, str(shards), "link")


# ---- 9. --resume --verify full keeps only shards it can verify fully --------------------------------
def test_resume_with_verify_full_rewrites_shards_recorded_with_samples(area):
    ref = reference(area)
    first = upscale(area, "--part", "1/2")
    assert first.code == 0
    dst = area / "dst"
    victim = sorted(n for n in os.listdir(dst) if n.endswith(".safetensors"))[0]
    flip_data_byte(str(dst / victim), 0.5)  # between the 4 KiB samples: the sampled checksum is blind here
    out = upscale(area, "--resume", "--verify", "full")
    assert out.code == 0 and not out.problems, out
    assert_same_folder(str(dst), ref)


# ---- hangs: special files refused before any read -----------------------------------------------
def _fifo(path):
    os.unlink(path) if os.path.lexists(path) else None
    os.mkfifo(path)


SPECIAL = {
    "config FIFO": (1, lambda s: _fifo(os.path.join(s, CONFIG_NAME)), CONFIG_NAME),
    "single weights FIFO": (1, lambda s: _fifo(os.path.join(s, "model.safetensors")), "model.safetensors"),
    "shard FIFO": (3, lambda s: _fifo(os.path.join(s, shard_files(s)[1])), "model-00002-of-00003.safetensors"),
    "index FIFO": (3, lambda s: _fifo(os.path.join(s, INDEX_NAME)), INDEX_NAME),
    "side file FIFO": (1, lambda s: _fifo(os.path.join(s, "tokenizer_config.json")), "tokenizer_config.json"),
    "weights a char device": (
        1,
        lambda s: (os.unlink(os.path.join(s, "model.safetensors")), os.symlink("/dev/zero", f"{s}/model.safetensors")),
        "model.safetensors",
    ),
    "weights a folder": (
        1,
        lambda s: (os.unlink(os.path.join(s, "model.safetensors")), os.mkdir(os.path.join(s, "model.safetensors"))),
        "model.safetensors",
    ),
}


@pytest.mark.parametrize("case", list(SPECIAL))
@pytest.mark.parametrize("command", ["inspect", "plan", "upscale"])
def test_special_files_are_refused_before_reading(tmp_path, case, command):
    shards, breaker, culprit = SPECIAL[case]
    src = make_source(str(tmp_path / "src"), shards=shards)
    breaker(src)
    dst = str(tmp_path / "dst")
    argv = {"inspect": ["inspect", src], "plan": ["plan", src, *TLI], "upscale": ["upscale", src, dst, *TLI, "--quiet"]}
    out = check_run(argv[command], src, dst, str(tmp_path))
    one_line(out, os.path.join(src, culprit), "not a regular file")


def test_fifo_config_does_not_hang_a_real_process(tmp_path):
    src = make_source(str(tmp_path / "src"), shards=1)
    _fifo(os.path.join(src, CONFIG_NAME))
    done = subprocess.run(
        [sys.executable, "-m", "tli_kernels.cli.main", "plan", src, *TLI], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "FIFO" in done.stderr and CONFIG_NAME in done.stderr, done.stderr


@pytest.mark.parametrize("what", ["marker FIFO", "provenance FIFO"])
def test_special_files_in_an_output_folder(area, what):
    if what == "marker FIFO":
        assert upscale(area, "--part", "1/2").code == 0
        _fifo(str(area / "dst" / INCOMPLETE_MARKER))
        one_line(upscale(area, "--resume"), INCOMPLETE_MARKER)
    else:
        ref = reference(area)
        _fifo(os.path.join(ref, PROVENANCE_NAME))
        one_line(check_run(["inspect", ref], ref, ref, str(area)), PROVENANCE_NAME)


# ---- tracebacks and messages that named nothing: damaged JSON of every kind ------------------------
def _edit_header(src, edit):
    path = os.path.join(src, shard_files(src)[0])
    _, raw, rest = read_raw_header(path)
    text = edit(raw.decode().rstrip())
    data = text.encode() if isinstance(text, str) else text
    write_raw(path, len(data), data, rest)
    return path


def _first_tensor_field(field: str, value: str):
    def edit(text):
        obj = json.loads(text)
        name = next(k for k in obj if k != "__metadata__")
        obj[name][field] = "@V@"
        return json.dumps(obj).replace('"@V@"', value)

    return edit


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    return path


DAMAGED = {
    "header dtype a list": (lambda s: _edit_header(s, _first_tensor_field("dtype", '["BF16"]')), "unknown dtype"),
    "header dtype an object": (lambda s: _edit_header(s, _first_tensor_field("dtype", '{"a": 1}')), "unknown dtype"),
    "5000-digit shape": (lambda s: _edit_header(s, _first_tensor_field("shape", "[" + "9" * 5000 + "]")), "number"),
    "header nested 100000 deep": (
        lambda s: _edit_header(s, _first_tensor_field("shape", "[" * 100_000 + "]" * 100_000)),
        "nested too deeply",
    ),
    "tensor name with a lone surrogate": (
        lambda s: _edit_header(s, lambda t: t.replace('"model.', '"\\udc80model.', 1)),
        "lone UTF-16 surrogate",
    ),
    "header not UTF-8": (
        lambda s: _edit_header(s, lambda t: t.encode().replace(b'"model.', b'"\xffmodel.', 1)),
        "UTF-8",
    ),
    "config not UTF-8": (lambda s: _write(f"{s}/config.json", b'{"model_type": "ll\xe9ama"}'), "not valid UTF-8"),
    "config nested deep": (
        lambda s: _write(f"{s}/config.json", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "deep",
    ),
    "config giant number": (lambda s: _write(f"{s}/config.json", b'{"vocab_size": ' + b"7" * 5000 + b"}"), "number"),
    "index not UTF-8": (lambda s: _write(f"{s}/{INDEX_NAME}", b'{"weight_map": {"\xc3(": "x"}}'), "not valid UTF-8"),
    "index nested deep": (lambda s: _write(f"{s}/{INDEX_NAME}", b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    "index a list": (lambda s: _write(f"{s}/{INDEX_NAME}", b"[]"), "JSON array, not an object"),
    "index path outside": (
        lambda s: _write(f"{s}/{INDEX_NAME}", json.dumps({"weight_map": {"model.norm.weight": "../x"}}).encode()),
        "not a file name in this folder",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_json_is_named(tmp_path, case):
    src = make_source(str(tmp_path / "src"), shards=3)
    breaker, words = DAMAGED[case]
    path = breaker(src)
    for argv in (["inspect", src], ["upscale", src, str(tmp_path / "dst"), *TLI, "--quiet"]):
        out = check_run(argv, src, str(tmp_path / "dst"), str(tmp_path))
        one_line(out, path, words)


@pytest.mark.parametrize("content", [b"[]", b"{not json", b'{"plan_sha256": 7}', b"\xff"])
def test_damaged_marker_on_resume(area, content):
    assert upscale(area, "--part", "1/2").code == 0
    _write(str(area / "dst" / INCOMPLETE_MARKER), content)
    one_line(upscale(area, "--resume"), str(area / "dst" / INCOMPLETE_MARKER), "marker")


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b'{"injected_layers": "2"}', b'{"source": []}'])
def test_damaged_provenance_for_inspect(area, content):
    ref = reference(area)
    _write(os.path.join(ref, PROVENANCE_NAME), content)
    one_line(check_run(["inspect", ref], ref, ref, str(area)), os.path.join(ref, PROVENANCE_NAME), "provenance")


# ---- faults while finishing --------------------------------------------------------------------
def test_full_disk_while_finishing_names_the_output_file(tmp_path):
    """A side file larger than the file-size limit: the copy into DST fails, and the message names
    DST's file, not the source's."""
    src = make_source(str(tmp_path / "src"))
    with open(os.path.join(src, "tokenizer.json"), "wb") as f:
        f.write(b"{" + b" " * 400_000 + b"}")
    dst = str(tmp_path / "dst")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    cmd = [sys.executable, "-m", "tli_kernels.cli.main", "upscale", src, dst, *TLI, "--quiet"]
    done = subprocess.run(cmd, preexec_fn=limit, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert os.path.join(dst, "tokenizer.json") in done.stderr and "File too large" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not is_complete(dst)
    assert run_cli(["upscale", src, dst, *TLI, "--quiet", "--resume"])[0] == 0  # the space is back: finish it
    assert is_complete(dst) and not [n for n in os.listdir(dst) if ".tmp" in n or n.endswith(".partial")]


MUTATING = ("write_atomic", "copy_in", "unlink", "rmtree", "rename", "create")


def test_kill_anywhere_in_the_final_step(area, monkeypatch):
    """Stop the run at every write of finish() in turn: the folder is either refused (marker present)
    or complete with nothing of tli's bookkeeping left; --resume then gives the reference bytes."""
    ref = reference(area)
    originals = {m: getattr(OutputDir, m) for m in MUTATING}
    k = 0
    while True:
        dst = area / f"dst{k}"
        assert upscale(area, "--part", "1/1", engine=ENGINES[0], dst=f"dst{k}").code == 0
        calls = [0]

        def stop_at(method, stop=k + 1, calls=calls):
            def wrapper(self, *args, **kwargs):
                calls[0] += 1
                if calls[0] == stop:
                    raise KeyboardInterrupt  # what a kill would leave: nothing after this point
                return originals[method](self, *args, **kwargs)

            return wrapper

        with monkeypatch.context() as m:
            for name in MUTATING:
                m.setattr(OutputDir, name, stop_at(name))
            code, _, _ = run_cli(["upscale", str(area / "src"), str(dst), *TLI, "--quiet", "--resume"])
        if code == 0:
            break  # k is past the last write: the run finished
        assert code == 130
        if not os.path.lexists(dst / INCOMPLETE_MARKER):
            assert_same_folder(str(dst), ref)  # complete, and nothing else in it
        assert upscale(area, "--resume", dst=f"dst{k}").code == 0
        assert_same_folder(str(dst), ref)
        k += 1
    assert k >= 8  # every write of the final step was interrupted once


def test_free_disk_message_states_sizes(tmp_path, monkeypatch):
    src = make_source(str(tmp_path / "src"))
    monkeypatch.setattr(output, "free_bytes", lambda path: 1234)
    out = check_run(["upscale", src, str(tmp_path / "dst"), *TLI, "--quiet"], src, str(tmp_path / "dst"), str(tmp_path))
    one_line(out, "not enough free disk", "1234 bytes")
    assert "0.00 GB" not in out.err and " kB (" in out.err
