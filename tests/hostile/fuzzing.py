"""Hostile-input machinery shared by the hostile test suite (tests/hostile/) and the long fuzz
driver (tools/fuzz_hostile.py): small sources, mutations of their headers, index and config, and
the checks every case must pass whatever it did.

The contract each case is checked against (SPEC section 8, issue 13):
- the command exits 0 or 1 (never an exception, never a hang: an alarm turns a hang into a finding);
- exit 1 prints exactly one line `tli: error: ...` naming the file (a path under SRC or DST) or the
  option at fault, and no traceback;
- the source's bytes (and the kind of every entry: a link stays a link) are unchanged;
- nothing was created, changed or removed outside DST;
- after exit 1 DST is not a folder that tli or transformers accept as complete (no config.json
  without the unfinished-output marker); after exit 0 it is complete and tli reads it back;
- with the native engine built, both engines give the same exit code and, on success, the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import stat
import struct
from dataclasses import dataclass, field

from tli_kernels.checkpoint import executor_native
from tli_kernels.checkpoint.layout import CONFIG_NAME, INCOMPLETE_MARKER, INDEX_NAME, CheckpointLayout
from tli_kernels.checkpoint.synthetic import llama_config, write_checkpoint
from tli_kernels.cli.main import main as tli_main

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, vocab_size=64, head_dim=8,
             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
ENGINES = ["native", "python"] if executor_native.available() else ["python"]


def make_source(path: str, shards: int = 3, **overrides) -> str:
    write_checkpoint(path, llama_config("llama-3.2-1b", **{**SMALL, **overrides}), num_shards=shards)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:  # a side file, copied at the end
        json.dump({"model_max_length": 128}, f)
    return path


# ---- snapshots -----------------------------------------------------------------------------------
def snapshot(root: str, skip: str | None = None) -> dict[str, tuple]:
    """relative path -> (kind, sha256 of the bytes or the link target) for everything under root."""
    out: dict[str, tuple] = {}
    skip = os.path.abspath(skip) if skip else None
    for base, dirs, files in os.walk(root):
        if skip and (os.path.abspath(base) == skip or os.path.abspath(base).startswith(skip + os.sep)):
            dirs[:] = []
            continue
        for name in dirs + files:
            p = os.path.join(base, name)
            if skip and os.path.abspath(p) == skip:
                continue
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = ("file", hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
    return out


def is_complete(dst: str) -> bool:
    """What transformers and tli would take for a finished model folder."""
    return os.path.isfile(os.path.join(dst, CONFIG_NAME)) and not os.path.lexists(os.path.join(dst, INCOMPLETE_MARKER))


# ---- running the CLI in-process, with a hang alarm ---------------------------------------------------
class Hang(BaseException):  # not an Exception: the CLI's last-resort handler must not swallow it
    pass


def _alarm(signum, frame):
    raise Hang()


# Seconds after which a command counts as hung (the long driver may lower it).
HANG_SECONDS = 20


def run_cli(argv: list[str], timeout: int | None = None) -> tuple[int | str, str, str]:
    """(exit code or 'exception: ...' / 'hang', stdout, stderr) of `tli ARGV` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout or HANG_SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code: int | str = tli_main(argv)
    except Hang:
        code = "hang"
    except SystemExit as e:  # argparse usage errors
        code = e.code if isinstance(e.code, int) else 2
    except BaseException as e:  # noqa: BLE001 - an escaped exception is exactly what we look for
        code = f"exception: {type(e).__name__}: {e}"[:300]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue()


@dataclass
class Outcome:
    code: int | str
    err: str
    problems: list[str] = field(default_factory=list)


def check_run(argv: list[str], src: str, dst: str, area: str, names: tuple[str, ...] = ()) -> Outcome:
    """Run `tli ARGV` (which may write dst) and check the contract. area: the folder holding src and
    dst (everything in it but dst must be unchanged). names: other words the message may name the
    culprit by (an option)."""
    src_before = snapshot(src)
    area_before = snapshot(area, skip=dst)
    dst_before = snapshot(dst) if is_complete(dst) else None  # a finished folder a refusal must leave alone
    code, _, err = run_cli(argv)
    problems = []
    if code not in (0, 1):
        problems.append(f"exit {code!r}")
    if code == 1:
        lines = err.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("tli: error: "):
            problems.append(f"not one error line: {err.strip()[:300]!r}")
        elif not any(w in lines[0] for w in (src, dst, *names)):
            problems.append(f"message names neither the file nor the option: {lines[0][:300]!r}")
        if "Traceback" in err or "internal error" in err:
            problems.append("traceback or internal error")
        if os.path.isdir(dst) and is_complete(dst) and (dst_before is None or snapshot(dst) != dst_before):
            problems.append("a failed run left a folder that looks complete")
    partial_run = any(a == "--dry-run" or a.startswith("--part") for a in argv)
    if code == 0 and argv[0] == "upscale" and not partial_run:
        if not is_complete(dst):
            problems.append("exit 0 but DST is not complete")
        else:
            try:
                CheckpointLayout.open(dst)
            except Exception as e:  # noqa: BLE001
                problems.append(f"exit 0 but tli cannot read DST back: {e}"[:300])
    if snapshot(src) != src_before:
        problems.append("the source changed")
    if snapshot(area, skip=dst) != area_before:
        problems.append("something outside DST changed")
    return Outcome(code, err.strip(), problems)


# ---- mutations -------------------------------------------------------------------------------------
def shard_files(src: str) -> list[str]:
    return sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))


def read_raw_header(path: str) -> tuple[int, bytes, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    return n, data[8 : 8 + n], data[8 + n :]


def write_raw(path: str, n: int, header: bytes, rest: bytes) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + header + rest)


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["null", "bool", "int", "neg", "float", "str", "list", "obj", "huge"]
    k = rng.choice(kinds if depth < 2 else kinds[:6])
    if k == "null":
        return None
    if k == "bool":
        return rng.random() < 0.5
    if k == "int":
        return rng.choice([0, 1, 2, 7, 2**31, 2**63, 2**64 + 1])
    if k == "neg":
        return -rng.randint(1, 1000)
    if k == "float":
        return rng.choice([0.5, 1e300, -0.0, 3.5])
    if k == "str":
        return rng.choice(["", "BF16", "F32", "x", "é", "model.norm.weight", "../../etc/passwd", "a/b"])
    if k == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if k == "obj":
        return {rng.choice(["a", "dtype", "shape"]): _random_value(rng, depth + 1)}
    return 10**40


# Raw JSON texts that json.dumps cannot produce but a hostile file can hold.
RAW_VALUES = [
    "1" * 5000,  # more digits than Python converts
    "[" * 100_000 + "]" * 100_000,  # deeper than the recursion limit
    '"\\ud800"',  # a lone surrogate
    "NaN",
    "Infinity",
    "-1e999",
    '"\\u0000"',
]


def _raw_substitute(text: str, rng: random.Random) -> str:
    """Replace one JSON scalar or key in text with a raw hostile value."""
    anchors = [i for i, c in enumerate(text) if c in ":,[" and i + 1 < len(text)]
    if not anchors:
        return text
    i = rng.choice(anchors) + 1
    j = i
    while j < len(text) and text[j] not in ",]}":
        j += 1
    if text[i:j].strip().startswith(("{", "[")):
        return text
    return text[:i] + rng.choice(RAW_VALUES) + text[j:]


def mutate_header(src: str, rng: random.Random) -> str:
    """One hostile change to one shard's header; returns a short description."""
    name = rng.choice(shard_files(src))
    path = os.path.join(src, name)
    n, raw, rest = read_raw_header(path)
    try:
        json.loads(raw)
    except (ValueError, RecursionError):  # an earlier mutation broke it: flip a byte of what is there
        b = bytearray(raw or b" ")
        b[rng.randrange(len(b))] = rng.randrange(256)
        write_raw(path, n, bytes(b), rest)
        return f"header {name} flip"
    kind = rng.choice(["flip", "length", "json", "json", "json", "raw", "rename", "truncate", "append", "utf8"])
    if kind == "flip":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        write_raw(path, n, bytes(b), rest)
    elif kind == "length":
        n2 = rng.choice([0, 1, n - 1, n + 1, n + 8, 2**63, 100_000_001, len(rest) + n + 9])
        write_raw(path, n2, raw, rest)
    elif kind in ("json", "rename"):
        obj = json.loads(raw)
        tensors = [k for k in obj if k != "__metadata__"]
        t = rng.choice(tensors)
        if kind == "rename":
            m = t.split(".")
            new = rng.choice([
                t.replace("layers.1.", "layers.01.") if "layers.1." in t else t + "x",
                t.replace("layers.", "layers.١") if "layers." in t else "\u00e9" + t,
                t.replace("layers.0.", "layers.-1.") if "layers.0." in t else t.upper(),
                "",
                ".".join(m[:2] + ["99"] + m[3:]) if len(m) > 3 else t,
                "__metadata__",
            ])  # fmt: skip
            obj[new] = obj.pop(t)
        else:
            entry = obj[t]
            key = rng.choice(["dtype", "shape", "data_offsets", "del", "extra", "tensor", "metadata"])
            if key == "del":
                del obj[t][rng.choice(["dtype", "shape", "data_offsets"])]
            elif key == "extra":
                obj[t + ".bogus"] = {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}
            elif key == "tensor":
                obj[t] = _random_value(rng)
            elif key == "metadata":
                obj["__metadata__"] = _random_value(rng)
            elif key == "shape" and rng.random() < 0.5 and entry["shape"]:
                entry["shape"] = entry["shape"][::-1] + ([1] if rng.random() < 0.5 else [])
            else:
                entry[key] = _random_value(rng)
        text = json.dumps(obj, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        write_raw(path, len(text), text, rest)
    elif kind == "raw":
        text = _raw_substitute(raw.decode(), rng).encode()
        write_raw(path, len(text), text, rest)
    elif kind == "truncate":
        with open(path, "r+b") as f:
            f.truncate(rng.randrange(0, os.path.getsize(path)))
    elif kind == "append":
        with open(path, "ab") as f:
            f.write(os.urandom(rng.randint(1, 9)))
    else:  # bytes that are not UTF-8 inside a string of the header
        i = raw.index(b'"') + 1
        write_raw(path, n, raw[:i] + b"\xff\xfe" + raw[i + 2 :], rest)
    return f"header {name} {kind}"


def _load_or_flip(path: str, rng: random.Random):
    """The file's JSON, or None after flipping a byte of it when an earlier mutation broke it."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        b = bytearray(data or b" ")
        b[rng.randrange(len(b))] = rng.randrange(256)
        with open(path, "wb") as f:
            f.write(bytes(b))
        return None


def mutate_index(src: str, rng: random.Random) -> str:
    path = os.path.join(src, INDEX_NAME)
    obj = _load_or_flip(path, rng)
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict) or not obj["weight_map"]:
        return "index flip"
    kind = rng.choice(["entry", "entry", "weight_map", "metadata", "raw", "top", "utf8", "drop-tensor"])
    if kind == "entry":
        t = rng.choice(list(obj["weight_map"]))
        obj["weight_map"][t] = rng.choice(
            [_random_value(rng), "../" + obj["weight_map"][t], "/etc/passwd", "missing.safetensors", "", "."]
        )
    elif kind == "weight_map":
        obj["weight_map"] = _random_value(rng)
    elif kind == "metadata":
        obj["metadata"] = _random_value(rng)
    elif kind == "top":
        obj = _random_value(rng)
    elif kind == "drop-tensor":
        del obj["weight_map"][rng.choice(list(obj["weight_map"]))]
    text = json.dumps(obj)
    if kind == "raw":
        text = _raw_substitute(text, rng)
    data = text.encode()
    if kind == "utf8":
        data = data.replace(b'"', b'"\xc3\x28', 1)
    with open(path, "wb") as f:
        f.write(data)
    return f"index {kind}"


def mutate_config(src: str, rng: random.Random, skip_keys: tuple[str, ...] = ()) -> str:
    path = os.path.join(src, CONFIG_NAME)
    obj = _load_or_flip(path, rng)
    if not isinstance(obj, dict):
        return "config flip"
    kind = rng.choice(["field", "field", "field", "raw", "top", "utf8", "drop"])
    keys = [k for k in ("model_type", "hidden_size", "vocab_size", "tie_word_embeddings", "torch_dtype",
                        "num_hidden_layers", "architectures", "quantization_config", "initializer_range",
                        "layer_types", "rope_parameters") if k not in skip_keys]  # fmt: skip
    key = rng.choice(keys)
    if kind == "field":
        obj[key] = _random_value(rng)
    elif kind == "drop":
        obj.pop(key, None)
    elif kind == "top":
        obj = _random_value(rng)
    text = json.dumps(obj)
    if kind == "raw":  # the value of one field becomes a raw hostile JSON text
        obj[key] = "@RAW@"
        text = json.dumps(obj).replace('"@RAW@"', rng.choice(RAW_VALUES))
    data = text.encode()
    if kind == "utf8":
        data = data.replace(b'"', b'"\xed\xa0\x80', 1)  # a UTF-8-encoded surrogate: invalid UTF-8
    with open(path, "wb") as f:
        f.write(data)
    return f"config {kind} {key if kind in ('field', 'drop', 'raw') else ''}".strip()


MUTATORS = {"header": mutate_header, "index": mutate_index, "config": mutate_config}


def fuzz_case(base: str, pristine: str, seed: int, kinds=("header", "index", "config"), skip_config=()) -> tuple:
    """Copy `pristine` to base/src, apply 1-2 mutations chosen by seed; returns (src, description)."""
    rng = random.Random(seed)
    src = os.path.join(base, "src")
    shutil.copytree(pristine, src, symlinks=True)
    done = []
    for _ in range(rng.choice([1, 1, 1, 2])):
        kind = rng.choice(kinds)
        if kind == "index" and not os.path.exists(os.path.join(src, INDEX_NAME)):
            kind = "header"
        if kind == "config":
            done.append(mutate_config(src, rng, skip_config))
        else:
            done.append(MUTATORS[kind](src, rng))
    return src, "; ".join(done)


def run_case(base: str, src: str, argv_tail: list[str], command: str = "upscale") -> list[str]:
    """Run one command on src with every engine, check the contract; problems found (empty: clean)."""
    problems: list[str] = []
    results = []
    for engine in ENGINES if command == "upscale" else ["-"]:
        dst = os.path.join(base, f"dst-{engine}")
        if command == "upscale":
            argv = ["upscale", src, dst, *argv_tail, "--engine", engine, "--quiet"]
        elif command == "plan":
            argv = ["plan", src, *argv_tail]
        else:
            argv = ["inspect", src]
        outcome = check_run(argv, src, dst, base)
        problems += [f"[{engine}] {p}" for p in outcome.problems]
        results.append((engine, outcome, dst))
    if command == "upscale" and len(results) == 2:
        (_, a, da), (_, b, db) = results
        if a.code != b.code:
            problems.append(f"engines disagree: native exit {a.code}, python exit {b.code} ({a.err or b.err})"[:300])
        elif a.code == 0 and snapshot(da) != snapshot(db):
            problems.append("engines wrote different bytes")
    return problems
