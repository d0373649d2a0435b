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
FAMILIES = ("files", "options", "dst", "edits", "kills", "during")
# Relative weight of each family in a run (kills and during are slow: real processes).
WEIGHTS = {"files": 60, "options": 20, "dst": 10, "edits": 6, "kills": 2, "during": 2}


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
