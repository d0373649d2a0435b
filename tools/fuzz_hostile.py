"""Long hostile-input fuzz run for `tli` (not part of CI; tests/hostile/test_fuzz.py is its CI slice).

Runs thousands of seeded cases against the contract checked by tests/hostile/fuzzing.py (exit 0 or
one line naming the file or option, source bytes unchanged, nothing changed outside DST, no
complete-looking folder after a failure, both engines alike) in six families:

  files     header / index / config mutations (all config fields, layout-owned ones included),
            through upscale (both engines, several method settings), plan and inspect
  options   random values for every numeric and size option of `tli upscale` and `tli plan`
  dst       hostile output paths: links (dangling, to the source, to a file), files, FIFOs, an
            existing output, a folder inside the source, links planted in an unfinished DST
  edits     the source edited or replaced between a --part run and --resume
  kills     SIGKILL / SIGINT of a real `tli upscale` at a random moment, then --resume: the
            result must equal an uninterrupted run byte for byte
  during    the source edited while a native-engine run writes (a real process)
  recipes   hostile mergekit recipes: alias bombs, huge or non-finite scales, bad layer ranges and
            keys, deep nesting, non-UTF-8, special files named *.yml (plan and upscale)
  hub       a Hugging Face cache with hostile refs (FIFO, garbage, trailing newline), flipped or
            truncated blobs, dangling links, missing snapshots (plan by Hub id, offline)
  bin       zip-format pytorch_model.bin sources with flipped, truncated or planted bytes (a pickle
            that would create a file must never run)
  data      `tli train` inputs: FIFOs, /dev/zero, links, JSONL with lone surrogates or bad JSON,
            text without a line break, empty files, non-integer token arrays
  ckpt      `tli train --resume` of a damaged training checkpoint: edited training_state.json values
            (manifest updated to match), a pickle planted in DCP's .metadata, foreign and unlisted
            files, links; the planted code must never run

    PYTHONPATH=. python tools/fuzz_hostile.py --cases 4000 --seed 0 [--families files,options] [--json out.json]

Prints every finding with its family, seed and description (rerun one with --only SEED), then a
summary table of outcomes per family.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.hostile import fuzzing as F  # noqa: E402
from tli_kernels.checkpoint import executor_native  # noqa: E402
from tli_kernels.checkpoint.layout import INCOMPLETE_MARKER  # noqa: E402

METHOD_ARGS = [
    ["--method", "tli", "--k", "2", "--init", "average", "--alpha", "0.5", "--shard-size", "20KB"],
    ["--method", "tli", "--k", "1", "--init", "random", "--alpha", "2", "--dtype", "fp16", "--shard-size", "9KB"],
    ["--method", "dus", "--m", "1", "--dtype", "fp32"],
    ["--method", "stack", "--times", "2", "--shard-size", "30KB"],
    ["--method", "passthrough", "--layers", "0-2,1-3"],
    ["--method", "moe-upcycle", "--experts", "2", "--top-k", "1", "--shard-size", "40KB"],
    ["--method", "block-expansion", "--k", "3"],
]
FAMILIES = ("files", "options", "dst", "edits", "kills", "during", "recipes", "hub", "bin", "data", "ckpt")
# Relative weight of each family in a run (kills and during are slow: real processes; ckpt trains).
WEIGHTS = {"files": 60, "options": 20, "dst": 10, "edits": 6, "kills": 2, "during": 2, "recipes": 20, "hub": 10,
           "bin": 8, "data": 10, "ckpt": 4}  # fmt: skip
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Run:
    def __init__(self, root: str):
        self.root = root
        self.pristine = {n: F.make_source(os.path.join(root, f"pristine-{n}"), shards=n) for n in (1, 3)}
        self.findings: list[dict] = []
        self.outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._orig_check = F.check_run
        F.check_run = self._counting_check

    def _counting_check(self, argv, src, dst, area, names=()):
        outcome = self._orig_check(argv, src, dst, area, names)
        self.outcomes[self.family][_kind(outcome)] += 1
        return outcome

    def case_dir(self, seed: int) -> str:
        base = os.path.join(self.root, f"case-{seed}")
        os.makedirs(base)
        return base

    def finding(self, seed: int, what: str, problems: list[str]) -> None:
        self.findings.append({"family": self.family, "seed": seed, "case": what, "problems": problems[:3]})
        print(f"FINDING [{self.family} seed {seed}] {what}: {problems[0][:400]}", flush=True)

    # ---- families ----------------------------------------------------------------------------------
    def files(self, seed: int, rng: random.Random) -> None:
        base = self.case_dir(seed)
        shards = rng.choice([1, 3, 3])
        src, what = F.fuzz_case(base, self.pristine[shards], seed)
        command = rng.choice(["upscale", "upscale", "upscale", "plan", "inspect"])
        args = rng.choice(METHOD_ARGS)
        problems = F.run_case(base, src, args if command != "inspect" else [], command)
        if problems:
            self.finding(seed, f"{what}; {command} {' '.join(args)}", problems)

    def options(self, seed: int, rng: random.Random) -> None:
        base = self.case_dir(seed)
        src = os.path.join(base, "src")
        shutil.copytree(self.pristine[3], src)
        values = {
            "--alpha": ["0", "-0", "1e-50", "3.4e38", "3.5e38", "1e308", "-1e40", "nan", "inf", "-inf", "1e6", "abc"],
            "--k": ["0", "-1", "1", "4", "5", "99999999999999999999", "1.5", "x"],
            "--shard-size": ["0", "1", "0.5", "1KB", "1e3", "-5MB", "5GiB", "99999999999999999999TB", "", "10 MB"],
            "--max-memory": ["0", "1", "512KiB", "1MB", "512MB", "1e9", "99999999999999999999TB", "-1"],
            "--threads": ["0", "-1", "1", "3", "256", "257", "100000", "x"],
            "--seed": ["-1", "0", "18446744073709551617", "1" * 5000],
            "--part": ["0/1", "1/0", "2/1", "1/1", "1/3", "3/3", "a/b", "1/99999999999999999999"],
            "--dtype": ["fp16", "bf16", "fp32", "keep", "int8"],
            "--init": ["copy", "zero", "random", "average", "ones"],
        }
        argv_tail = ["--method", "tli"]
        chosen = rng.sample(sorted(values), rng.randint(1, 3))
        for opt in chosen:
            argv_tail.append(f"{opt}={rng.choice(values[opt])}")
        engine = rng.choice(F.ENGINES)
        dst = os.path.join(base, "dst")
        command = rng.choice(["upscale", "upscale", "plan"])
        if command == "upscale":
            argv = ["upscale", src, dst, *argv_tail, "--engine", engine, "--quiet"]
        else:
            plan_options = ("--method", "--alpha", "--k", "--shard-size", "--seed", "--dtype", "--init")
            argv = ["plan", src, *[a for a in argv_tail if a.split("=")[0] in plan_options]]
        outcome = F.check_run(argv, src, dst, base, names=tuple(chosen))
        problems = [p for p in outcome.problems if not (outcome.code == 2 and p.startswith("exit 2"))]
        if outcome.code == 1 and not any(o in outcome.err for o in chosen) and not problems:
            problems.append(f"the error names none of the options given ({chosen}): {outcome.err[:200]}")
        if problems:
            self.finding(seed, " ".join(argv[3:] if command == "upscale" else argv[2:]), problems)

    def dst(self, seed: int, rng: random.Random) -> None:
        base = self.case_dir(seed)
        src = os.path.join(base, "src")
        shutil.copytree(self.pristine[3], src)
        outside = os.path.join(base, "outside")
        os.makedirs(outside)
        with open(os.path.join(outside, "keep.txt"), "w") as f:
            f.write("keep")
        args = METHOD_ARGS[0]
        dst = os.path.join(base, "dst")
        kind = rng.choice(["dangling link", "link to source", "link to outside dir", "file", "fifo", "inside source",
                           "existing output", "link to existing output", "planted links", "source linked into dst",
                           "dst is source parent"])  # fmt: skip
        extra = rng.choice([[], ["--overwrite"], ["--resume"], ["--part", "1/2"]])
        if kind == "dangling link":
            os.symlink(os.path.join(base, "nowhere"), dst)
        elif kind == "link to source":
            os.symlink(src, dst)
        elif kind == "link to outside dir":
            os.symlink(outside, dst)
        elif kind == "file":
            with open(dst, "w") as f:
                f.write("x")
        elif kind == "fifo":
            os.mkfifo(dst)
        elif kind == "inside source":
            dst = os.path.join(src, "out")
        elif kind == "dst is source parent":
            dst = base
        elif kind in ("existing output", "link to existing output", "source linked into dst", "planted links"):
            real = os.path.join(base, "real") if kind == "link to existing output" else dst
            part = ["--part", "1/2"] if kind == "planted links" else []
            code, _, err = F.run_cli(["upscale", src, real, *args, "--quiet", *part])
            assert code == 0, err
            if kind == "link to existing output":
                os.symlink(real, dst)
            if kind == "source linked into dst":
                name = F.shard_files(src)[rng.randrange(3)]
                os.replace(os.path.join(src, name), os.path.join(dst, "kept-" + name))
                os.symlink(os.path.join(dst, "kept-" + name), os.path.join(src, name))
            if kind == "planted links":  # links under every name the resume may write
                count = int(re.search(r"of-(\d+)", F.shard_files(dst)[0]).group(1))
                names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
                names += ["config.json", "tli_provenance.json", "model.safetensors.index.json", "tokenizer_config.json"]
                for n in names:
                    for suffix in (f".tmp-{os.getpid()}", ".partial", "" if n.endswith(".safetensors") else None):
                        p = os.path.join(dst, n + suffix) if suffix is not None else None
                        if p and not os.path.lexists(p):
                            os.symlink(os.path.join(outside, "keep.txt"), p)
                    side = os.path.join(dst, ".tli-shards", n + ".json.tmp")
                    if n.endswith(".safetensors") and not os.path.lexists(side):
                        os.symlink(os.path.join(outside, "keep.txt"), side)
                extra = ["--resume"]
        engine = rng.choice(F.ENGINES)
        argv = ["upscale", src, dst, *args, "--quiet", "--engine", engine, *extra]
        area = base if kind not in ("dst is source parent",) else os.path.dirname(base)
        outcome = F.check_run(argv, src, dst, area)
        problems = list(outcome.problems)
        with open(os.path.join(outside, "keep.txt")) as f:
            if f.read() != "keep":
                problems.append("a file outside DST was written through a link")
        if problems:
            self.finding(seed, f"{kind} {' '.join(extra)} ({engine})", problems)

    def edits(self, seed: int, rng: random.Random) -> None:
        base = self.case_dir(seed)
        src = os.path.join(base, "src")
        shutil.copytree(self.pristine[3], src)
        args = METHOD_ARGS[0]
        engine = rng.choice(F.ENGINES)
        dst = os.path.join(base, "dst")
        code, _, err = F.run_cli(["upscale", src, dst, *args, "--quiet", "--part", "1/2", "--engine", engine])
        assert code == 0, err
        victim = os.path.join(src, rng.choice(F.shard_files(src) + ["config.json", "tokenizer_config.json"]))
        kind = rng.choice(["byte in place, mtime restored", "byte in place", "new file same content",
                           "new file other data", "touch", "chmod", "untouched"])  # fmt: skip
        st = os.stat(victim)
        with open(victim, "rb") as f:
            data = bytearray(f.read())
        if kind.startswith("byte"):
            data[rng.randrange(len(data) // 2, len(data))] ^= 0x10
            with open(victim, "r+b") as f:
                f.write(bytes(data))
            if "restored" in kind:
                os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif kind.startswith("new file"):
            if kind.endswith("other data"):
                data[-1] ^= 0x01
            with open(victim + ".new", "wb") as f:
                f.write(bytes(data))
            os.replace(victim + ".new", victim)
        elif kind == "touch":
            os.utime(victim)
        elif kind == "chmod":
            os.chmod(victim, 0o600)
        outcome = F.check_run(["upscale", src, dst, *args, "--quiet", "--resume", "--engine", engine], src, dst, base)
        problems = list(outcome.problems)
        content_changed = kind in ("byte in place, mtime restored", "byte in place", "new file other data")
        if content_changed and outcome.code == 0:
            problems.append("resumed over a source whose content changed")
        if kind == "untouched" and outcome.code != 0:
            problems.append(f"refused to resume over an untouched source: {outcome.err[:200]}")
        if problems:
            self.finding(seed, f"{kind} {os.path.basename(victim)} ({engine})", problems)

    def kills(self, seed: int, rng: random.Random) -> None:
        base = self.case_dir(seed)
        src = os.path.join(base, "src")
        shutil.copytree(self.pristine[3], src)
        args = METHOD_ARGS[0]
        ref = os.path.join(base, "ref")
        assert F.run_cli(["upscale", src, ref, *args, "--quiet"])[0] == 0
        dst = os.path.join(base, "dst")
        engine = rng.choice(F.ENGINES)
        sig = rng.choice([signal.SIGKILL, signal.SIGINT])
        env = {**os.environ, executor_native.TEST_DELAY_ENV: "3000"}
        cmd = [sys.executable, "-m", "tli_kernels.cli.main", "upscale", src, dst, *args, "--quiet", "--engine", engine]
        problems = []
        for attempt in range(rng.randint(1, 2)):
            proc = subprocess.Popen(cmd + (["--resume"] if attempt else []), env=env, stderr=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, text=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
            time.sleep(rng.uniform(0.05, 0.8))
            if proc.poll() is None:
                proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
            if proc.returncode not in (0, 1, 130, -9, -2) or "Traceback" in err:
                problems.append(f"exit {proc.returncode}: {err[-300:]}")
            if proc.returncode != 0 and F.is_complete(dst) and os.listdir(dst) != os.listdir(ref):
                problems.append("a killed run left a complete-looking folder that differs from the reference")
            if proc.returncode == 0:
                break
        if not F.is_complete(dst):  # a marker: --resume; killed before the marker landed: run again
            extra = ["--resume"] if os.path.lexists(os.path.join(dst, INCOMPLETE_MARKER)) else []
            outcome = F.check_run(["upscale", src, dst, *args, "--quiet", *extra], src, dst, base)
            problems += outcome.problems
        if sorted(os.listdir(dst)) != sorted(os.listdir(ref)):
            problems.append(f"after resume the folder differs: {sorted(set(os.listdir(dst)) ^ set(os.listdir(ref)))}")
        elif F.snapshot(dst) != F.snapshot(ref):
            problems.append("after resume the bytes differ from an uninterrupted run")
        if problems:
            self.finding(seed, f"{sig.name} ({engine})", problems)

    def during(self, seed: int, rng: random.Random) -> None:
        if not executor_native.available():
            return
        base = self.case_dir(seed)
        src = os.path.join(base, "src")
        shutil.copytree(self.pristine[3], src)
        dst = os.path.join(base, "dst")
        env = {**os.environ, executor_native.TEST_DELAY_ENV: "10000"}
        cmd = [sys.executable, "-m", "tli_kernels.cli.main", "upscale", src, dst, *METHOD_ARGS[0], "--quiet"]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 60
        while not (os.path.isdir(dst) and any(n.endswith(".partial") for n in os.listdir(dst))):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        victim = os.path.join(src, rng.choice(F.shard_files(src)))
        kind = rng.choice(["byte in place, mtime restored", "replace by rename", "truncate", "append"])
        st = os.stat(victim)
        with open(victim, "rb") as f:
            data = bytearray(f.read())
        if kind.startswith("byte"):
            with open(victim, "r+b") as f:
                f.seek(len(data) - 3)
                f.write(bytes([data[-3] ^ 0x20]))
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif kind == "replace by rename":
            data[-3] ^= 0x20
            with open(victim + ".new", "wb") as f:
                f.write(bytes(data))
            os.replace(victim + ".new", victim)
        elif kind == "truncate":
            os.truncate(victim, len(data) - 4096)
        else:
            with open(victim, "ab") as f:
                f.write(b"\0" * 10)
        _, err = proc.communicate(timeout=120)
        problems = []
        if proc.returncode == 0:
            problems.append("a run whose source changed under it finished (rc 0)")
        elif proc.returncode != 1 or "Traceback" in err or victim not in err:
            problems.append(f"exit {proc.returncode}, message {err.strip()[-300:]!r}")
        if F.is_complete(dst):
            problems.append("left a complete-looking folder")
        if problems:
            self.finding(seed, kind, problems)

    # ---- issue 20's surfaces ---------------------------------------------------------------------
    def _one_line_contract(self, seed: int, what: str, code, err: str, names: tuple[str, ...]) -> list[str]:
        problems = []
        if code not in (0, 1):
            problems.append(f"exit {code!r}: {err.strip()[-300:]}")
        if code == 1:
            lines = err.strip().splitlines()
            if len(lines) != 1 or not lines[0].startswith("tli: error: "):
                problems.append(f"not one error line: {err.strip()[:300]!r}")
            elif not any(n in lines[0] for n in names):
                problems.append(f"message names none of {names}: {lines[0][:300]!r}")
            if "internal error" in err or "Traceback" in err:
                problems.append(f"internal error: {err.strip()[-300:]}")
            if len(err) > 2000:
                problems.append(f"a {len(err)}-character message")
        self.outcomes[self.family]["finding" if problems else ("accepted" if code == 0 else f"exit {code}")] += 1
        return problems

    def recipes(self, seed: int, rng: random.Random) -> None:
        base = self.case_dir(seed)
        src = os.path.join(base, "src")
        shutil.copytree(self.pristine[1], src)
        recipe = os.path.join(base, "r.yml")
        kind = rng.choice(["bomb", "scale", "range", "keys", "nest", "bytes", "fifo", "model", "huge", "method"])
        model = value = None  # the culprit a message may name instead of the recipe
        scale = rng.choice(["1e39", "-1e39", ".nan", ".inf", "-.inf", "'x'", "[1, 2]", "{a: 1}", "1e-45", "0", "-0.0"])
        rng_pair = rng.choice(["[0, 4]", "[3, 1]", "[-1, 2]", "[0, 99]", "[0]", "'0-4'", "[0.5, 2]", "[0, 1e30]",
                               "[true, 2]", "null"])  # fmt: skip
        if kind == "bomb":
            levels, width = rng.randint(3, 12), rng.randint(2, 12)
            lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
            lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
            key = rng.choice(["merge_method", "base_model", "dtype", "slices", "tokenizer_source"])
            text = "\n".join(lines) + f"\n{key}: *a{levels - 1}\nmerge_method: passthrough\n" * (key != "merge_method")
            if key == "merge_method":
                text = "\n".join(lines) + f"\nmerge_method: *a{levels - 1}\nslices: []\n"
        elif kind in ("scale", "range", "model"):
            model = src if kind != "model" else rng.choice(["/nonexistent", "org/none", "", "a@b@c", src + "+lora",
                                                             os.path.join(base, "fifo-model")])  # fmt: skip
            if model.endswith("fifo-model"):
                os.mkfifo(model)
            layer_range = rng_pair if kind == "range" else "[0, 4]"
            params = f", parameters: {{scale: {scale}}}" if kind == "scale" else ""
            text = (f"slices:\n  - sources: [{{model: '{model}', layer_range: {layer_range}{params}}}]\n"
                    "merge_method: passthrough\ndtype: bfloat16\n")  # fmt: skip
        elif kind == "keys":
            key = rng.choice(["dtype", "out_dtype", "tokenizer_source", "base_model", "parameters", "slices", "models"])
            value = rng.choice(["int8", "[1]", "{x: 1}", "''", "null", "1e400", "'" + "x" * 5000 + "'"])
            text = f"slices:\n  - sources: [{{model: '{src}', layer_range: [0, 4]}}]\nmerge_method: passthrough\n"
            text += f"{key}: {value}\n"
        elif kind == "nest":
            depth = rng.randint(50, 5000)
            text = "merge_method: passthrough\nslices: " + "[" * depth + "]" * depth + "\n"
        elif kind == "bytes":
            text = None
            with open(recipe, "wb") as f:
                f.write(bytes(rng.randrange(256) for _ in range(rng.randint(0, 400))))
        elif kind == "fifo":
            text = None
            os.mkfifo(recipe)
        elif kind == "huge":
            text = f"merge_method: passthrough\nslices: []\nx: '{'y' * rng.choice([10, 2 << 20])}'\n"
        else:
            method = rng.choice(["linear", "ties", "[1]", "null", "PASSTHROUGH"])
            text = f"slices:\n  - sources: [{{model: '{src}', layer_range: [0, 4]}}]\nmerge_method: {method}\n"
        if text is not None:
            with open(recipe, "w") as f:
                f.write(text)
        dst = os.path.join(base, "dst")
        argv = ["plan", recipe] if rng.random() < 0.5 else ["upscale", recipe, dst, "--quiet"]
        culprits = (recipe, "recipe", *(str(x).strip("'")[:50] for x in (model, value) if x))
        outcome = F.check_run(argv, src, dst, base, names=culprits)  # the recipe, or the model / value at fault
        if outcome.problems or (outcome.code == 1 and len(outcome.err) > 2000):
            self.finding(seed, f"recipe {kind} {argv[0]}", outcome.problems or ["a long message"])

    def hub(self, seed: int, rng: random.Random) -> None:
        from tests.checkpoint.test_hub import lay_out_cache

        base = self.case_dir(seed)
        cache = os.path.join(base, "cache")
        snap = lay_out_cache(_Path(cache), "org/tiny", self.pristine[3], commit=COMMIT)
        repo = os.path.join(cache, "models--org--tiny")
        ref = os.path.join(repo, "refs", "main")
        kind = rng.choice(["fifo-ref", "garbage-ref", "newline-ref", "dir-ref", "empty-ref", "flip-blob",
                           "truncate-blob", "dangling", "no-snapshot", "huge-ref", "link-ref"])  # fmt: skip
        blobs = sorted(os.listdir(os.path.join(repo, "blobs")))
        victim = os.path.join(repo, "blobs", rng.choice(blobs))
        if kind == "fifo-ref":
            os.unlink(ref)
            os.mkfifo(ref)
        elif kind == "garbage-ref":
            open(ref, "wb").write(bytes(rng.randrange(256) for _ in range(rng.randint(1, 80))))
        elif kind == "newline-ref":
            open(ref, "w").write(rng.choice(["\n", " ", "\r\n", "\n\n"]) * rng.randint(0, 1) + COMMIT + "\n")
        elif kind == "dir-ref":
            os.unlink(ref)
            os.mkdir(ref)
        elif kind == "empty-ref":
            open(ref, "w").close()
        elif kind == "huge-ref":
            open(ref, "w").write(COMMIT + " " * (5 << 20))
        elif kind == "link-ref":
            os.unlink(ref)
            os.symlink(rng.choice(["/dev/zero", "/nonexistent", victim]), ref)
        elif kind == "flip-blob":
            data = bytearray(open(victim, "rb").read())
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            open(victim, "wb").write(bytes(data))
        elif kind == "truncate-blob":
            os.truncate(victim, rng.randrange(max(os.path.getsize(victim), 1)))
        elif kind == "dangling":
            os.unlink(victim)
        else:
            shutil.rmtree(snap)
        old = {k: os.environ.get(k) for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
        os.environ.update(HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1")
        try:
            code, _, err = F.run_cli(["plan", "org/tiny", "--method", "tli", "--k", "2"])
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        problems = self._one_line_contract(seed, kind, code, err, ("org/tiny", cache))
        if kind in ("flip-blob", "truncate-blob") and code == 0:
            problems.append("a blob that no longer matches its hash was accepted")
        if kind == "newline-ref" and code != 0:
            problems.append(f"a ref with white space around the commit was refused: {err.strip()[:200]}")
        if problems:
            self.finding(seed, f"hub {kind}", problems)

    def bin(self, seed: int, rng: random.Random) -> None:
        import pickle
        import zipfile

        import torch
        from safetensors.torch import load_file

        base = self.case_dir(seed)
        src = os.path.join(base, "src")
        shutil.copytree(self.pristine[1], src, ignore=shutil.ignore_patterns("*.safetensors"))
        state = load_file(os.path.join(self.pristine[1], "model.safetensors"))
        path = os.path.join(src, "pytorch_model.bin")
        torch.save(state, path)
        marker = os.path.join(base, "PWNED")
        kind = rng.choice(["flip", "truncate", "pickle", "append", "zero"])
        data = bytearray(open(path, "rb").read())
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            data = data[: rng.randrange(len(data))]
        elif kind == "append":
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
        elif kind == "zero":
            start, n = rng.randrange(len(data)), rng.randint(1, 4096)
            data[start : start + n] = bytes(len(data[start : start + n]))
        if kind == "pickle":  # data.pkl replaced by a payload that would create the marker
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                members = {n: z.read(n) for n in names}
            pkl = next(n for n in names if n.endswith("data.pkl"))
            members[pkl] = pickle.dumps(_Plant(marker), protocol=2)
            with zipfile.ZipFile(path, "w") as z:
                for n in names:
                    z.writestr(n, members[n])
        else:
            open(path, "wb").write(bytes(data))
        dst = os.path.join(base, "dst")
        upscale = ["upscale", src, dst, "--method", "tli", "--k", "2", "--engine", rng.choice(F.ENGINES), "--quiet"]
        argv = ["plan", src, "--method", "tli", "--k", "2"] if rng.random() < 0.5 else upscale
        outcome = F.check_run(argv, src, dst, base)
        problems = list(outcome.problems)
        if os.path.exists(marker):
            problems.append("a pickle in a .bin ran")
        if problems:
            self.finding(seed, f"bin {kind} {argv[0]}", problems)

    def data(self, seed: int, rng: random.Random) -> None:
        import numpy as np

        base = self.case_dir(seed)
        kind = rng.choice(["fifo", "dev-zero", "link-dev", "surrogate", "bad-json", "no-newline", "empty",
                           "float-ids", "object-npy", "dir"])  # fmt: skip
        flag = rng.choice(["--text", "--data", "--eval-text", "--eval-data"])
        path = os.path.join(base, "input" + {"surrogate": ".jsonl", "bad-json": ".jsonl", "float-ids": ".npy",
                                             "object-npy": ".npy"}.get(kind, ".txt"))  # fmt: skip
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dev-zero":
            path = "/dev/zero"
        elif kind == "link-dev":
            os.symlink("/dev/zero", path)
        elif kind == "surrogate":
            open(path, "w").write('{"text": "a"}\n{"text": "x \\ud800 y"}\n' * rng.randint(1, 50))
        elif kind == "bad-json":
            open(path, "w").write('{"text": "a"}\n{"text": \n' * rng.randint(1, 50))
        elif kind == "no-newline":
            open(path, "w").write("word " * rng.randint(1, 20000))
        elif kind == "empty":
            open(path, "w").close()
        elif kind == "float-ids":
            np.save(path, np.random.default_rng(seed).random(1000))
        elif kind == "object-npy":
            np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        else:
            os.mkdir(path)
        out = os.path.join(base, "out")
        code, _, err = F.run_cli(["train", self.pristine[1], flag, path, "-o", out, "--steps", "1", "--seq-len", "8",
                                  "--micro-batch", "1", "--eval-tokens", "16", "--quiet"])  # fmt: skip
        problems = self._one_line_contract(seed, kind, code, err, (path, flag, "tokenizer"))  # the model has none
        if code == 0 and kind in ("fifo", "dev-zero", "link-dev", "surrogate", "bad-json", "float-ids", "object-npy"):
            problems.append("accepted")
        if problems:
            self.finding(seed, f"data {kind} {flag}", problems)

    def _stopped_checkpoint(self) -> tuple[str, str]:
        """(output folder, token file) of a `tli train` stopped after step 2 of 4, made once per run."""
        if not hasattr(self, "_ckpt"):
            import numpy as np

            root = os.path.join(self.root, "ckpt-pristine")
            os.makedirs(root)
            ids = os.path.join(root, "ids.npy")
            np.save(ids, np.random.default_rng(0).integers(0, 64, 4000).astype(np.int32))
            out = os.path.join(root, "out")
            code, _, err = F.run_cli(self._train_args(ids, out) + ["--stop-after", "2"])
            assert code == 0, err
            self._ckpt = (out, ids)
        return self._ckpt

    def _train_args(self, ids: str, out: str) -> list[str]:
        return ["train", self.pristine[1], "--data", ids, "--eval-data", ids, "-o", out, "--steps", "4",
                "--seq-len", "8", "--micro-batch", "1", "--eval-tokens", "16", "--threads", "1", "--quiet"]  # fmt: skip

    def ckpt(self, seed: int, rng: random.Random) -> None:
        import pickle

        from tli_kernels.training import checkpoints as C

        pristine, ids = self._stopped_checkpoint()
        base = self.case_dir(seed)
        out = os.path.join(base, "out")
        shutil.copytree(pristine, out, symlinks=True)
        step = C.latest_checkpoint(out)
        marker = os.path.join(base, "PWNED")
        kind = rng.choice(["state-value", "state-value", "metadata-pickle", "distcp-pickle", "unlisted", "foreign",
                           "link", "drop-entry", "manifest-value"])  # fmt: skip
        relist = None
        if kind == "state-value":
            path = os.path.join(step, C.STATE_FILE)
            state = json.load(open(path))
            key = rng.choice(sorted(state))
            value = rng.choice([-3, 0, 10**30, 1.5, "x", None, [], {}, [1, 2], {"a": 1}, True, float("nan")])
            if isinstance(state[key], dict) and state[key] and rng.random() < 0.5:
                state[key][rng.choice(sorted(state[key]))] = value
            else:
                state[key] = value
            open(path, "w").write(json.dumps(state))
            relist = C.STATE_FILE
        elif kind in ("metadata-pickle", "distcp-pickle"):
            name = f"{C.STATE_DIR}/.metadata" if kind == "metadata-pickle" else f"{C.STATE_DIR}/__0_0.distcp"
            with open(os.path.join(step, name), "wb") as f:
                pickle.dump(_Plant(marker), f)
            relist = name
        elif kind == "unlisted":
            open(os.path.join(step, rng.choice(["x.bin", f"{C.STATE_DIR}/__1_0.distcp", "extra.json"])), "wb").write(
                b"x"
            )
        elif kind == "foreign":
            os.unlink(os.path.join(step, C.STATE_DIR, "__0_0.distcp"))
            shutil.copyfile(os.path.join(step, C.STATE_FILE), os.path.join(step, C.STATE_DIR, "__0_0.distcp"))
            relist = f"{C.STATE_DIR}/__0_0.distcp" if rng.random() < 0.5 else None
        elif kind == "link":
            target = os.path.join(step, C.STATE_DIR, "__0_0.distcp")
            os.rename(target, target + ".orig")
            os.symlink(target + ".orig", target)
        elif kind == "drop-entry":
            path = os.path.join(step, C.MANIFEST_FILE)
            manifest = json.load(open(path))
            del manifest["files"][rng.choice(sorted(manifest["files"]))]
            open(path, "w").write(json.dumps(manifest))
        else:
            path = os.path.join(step, C.MANIFEST_FILE)
            manifest = json.load(open(path))
            manifest[rng.choice(["step", "format", "files", "plan_sha256"])] = rng.choice([-1, "x", None, [], {}])
            open(path, "w").write(json.dumps(manifest))
        if relist is not None:
            path = os.path.join(step, C.MANIFEST_FILE)
            manifest = json.load(open(path))
            target = os.path.join(step, relist)
            manifest["files"][relist] = {"size": os.path.getsize(target), "sha256": C.file_sha256(target)}
            open(path, "w").write(json.dumps(manifest))
        code, _, err = F.run_cli(self._train_args(ids, out) + ["--resume"])
        problems = self._one_line_contract(seed, kind, code, err, (out, "--resume"))
        if os.path.exists(marker):
            problems.append("code planted in the checkpoint ran")
        if code == 0 and kind not in ("state-value",):
            problems.append("a damaged checkpoint was resumed")
        if problems:
            self.finding(seed, f"ckpt {kind}", problems)


class _Plant:
    """Unpickling this creates the folder `marker`: proof that code from the input ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _Path(p: str):
    import pathlib

    return pathlib.Path(p)


def _kind(outcome) -> str:
    if outcome.code == 2:
        return "exit 2 (usage)"
    if outcome.problems:
        return "finding"
    if outcome.code == 0:
        return "accepted"
    return f"exit {outcome.code}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="first seed; case i uses seed + i")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--only", type=int, default=None, help="run just this seed (the family it drew)")
    p.add_argument("--json", default=None, help="write the findings and counts here")
    p.add_argument("--keep", action="store_true", help="keep the case folders (default: removed)")
    p.add_argument("--hang-seconds", type=int, default=10, help="a command running longer counts as a hang")
    args = p.parse_args(argv)
    F.HANG_SECONDS = args.hang_seconds
    families = [f for f in args.families.split(",") if f]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        p.error(f"unknown family {bad[0]}")
    root = tempfile.mkdtemp(prefix="tli-fuzz-")
    run = Run(root)
    seeds = [args.only] if args.only is not None else range(args.seed, args.seed + args.cases)
    per_family = collections.Counter()
    started = time.time()
    for seed in seeds:
        rng = random.Random(seed)
        run.family = rng.choices(families, weights=[WEIGHTS[f] for f in families])[0]
        per_family[run.family] += 1
        try:
            getattr(run, run.family)(seed, rng)
        except Exception as e:  # noqa: BLE001 - a crash of the harness is a finding too
            run.finding(seed, "harness", [f"{type(e).__name__}: {e}"])
        if not args.keep:
            shutil.rmtree(os.path.join(root, f"case-{seed}"), ignore_errors=True)
    took = time.time() - started
    print(f"\n{sum(per_family.values())} cases, seeds {seeds[0]}..{seeds[-1]}, {took:.0f} s, "
          f"{len(run.findings)} with findings")  # fmt: skip
    print(f"{'family':<9} {'cases':>6}  outcomes of the commands run (a case may run several)")
    for fam in FAMILIES:
        if per_family[fam]:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(run.outcomes[fam].items()))
            print(f"{fam:<9} {per_family[fam]:>6}  {counts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": dict(per_family), "seconds": took, "findings": run.findings,
                       "outcomes": {k: dict(v) for k, v in run.outcomes.items()}}, f, indent=1)  # fmt: skip
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if run.findings else 0


if __name__ == "__main__":
    sys.exit(main())
