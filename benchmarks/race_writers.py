"""Two writers in one output folder: a benchmark-style check (not a unit test) of `tli upscale`'s
one-writer lock, for both engines.

Each trial starts two `tli upscale` processes on one DST at the same instant (both import tli first,
then wait on a shared "go" file), in one of two scenarios:

- fresh:  DST does not exist; both run the same command (two jobs started at once);
- resume: DST holds an interrupted run (`--part 1/2` done); both run the same command with `--resume`
          (a retried job).

Afterwards the trial is *wrong* if DST looks finished (config.json, no marker) but any file differs
from a reference run, or a process exited 0 without a finished DST; it is *stuck* if neither
finished it. It also counts the losers refused by the lock and whether their message names DST.

    PYTHONPATH=. python benchmarks/race_writers.py --trials 48 [--engines native,python] [--code DIR]

--code runs another checkout's tli (e.g. the commit before the lock, to see the races it had).
Prints one line per engine and exits 1 if any trial was wrong or stuck.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = ["--method", "tli", "--k", "2", "--init", "average", "--alpha", "0.5", "--dtype", "fp16",
          "--shard-size", "2MB", "--quiet"]  # fmt: skip
# Imports tli, then waits for the go file, so both racers start writing at the same instant.
RACER = (
    "import os, sys, time\n"
    "from tli_kernels.cli.main import main\n"
    "go, ready = sys.argv[1], sys.argv[2]\n"
    "open(ready, 'w').close()\n"
    "while not os.path.exists(go): time.sleep(0.0005)\n"
    "sys.exit(main(sys.argv[3:]))\n"
)


def make_source(path: str) -> None:
    from tli_kernels.checkpoint.synthetic import llama_config, write_checkpoint

    config = llama_config(
        "llama-3.2-1b", hidden_size=256, intermediate_size=704, num_hidden_layers=8, vocab_size=4000, head_dim=64
    )
    write_checkpoint(path, config, num_shards=3)


def tli(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": code}
    return subprocess.run(
        [sys.executable, "-m", "tli_kernels.cli.main", *args], env=env, capture_output=True, text=True, cwd=code
    )  # fmt: skip (cwd: `-m` and `-c` put it first on sys.path)


def same_output(dst: str, ref: str) -> bool:
    names = sorted(n for n in os.listdir(ref) if n != "README.md")  # the card names the command's DST
    if sorted(n for n in os.listdir(dst) if n != "README.md") != names:
        return False
    return all(filecmp.cmp(os.path.join(dst, n), os.path.join(ref, n), shallow=False) for n in names)


def finished(dst: str) -> bool:
    return os.path.isfile(os.path.join(dst, "config.json")) and not os.path.lexists(
        os.path.join(dst, ".tli-incomplete.json")
    )


def trial(code: str, src: str, ref: str, work: str, engine: str, scenario: str) -> dict:
    dst = os.path.join(work, "dst")
    shutil.rmtree(dst, ignore_errors=True)
    args = ["upscale", src, dst, *METHOD, "--engine", engine]
    if scenario == "resume":
        done = tli(code, *args, "--part", "1/2")
        assert done.returncode == 0, done.stderr
        args.append("--resume")
    go = os.path.join(work, "go")
    ready = [os.path.join(work, f"ready-{i}") for i in range(2)]
    for path in (go, *ready):
        if os.path.exists(path):
            os.unlink(path)
    env = {**os.environ, "PYTHONPATH": code}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, go, ready[i], *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=code) for i in range(2)]  # fmt: skip
    while not all(os.path.exists(r) for r in ready):  # both have imported tli and wait on the go file
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    open(go, "w").close()
    outs = [(p.wait(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    ok = finished(dst)
    correct = ok and same_output(dst, ref)
    codes = [rc for rc, _ in outs]
    losers = [err.strip().splitlines()[-1] if err.strip() else "" for rc, err in outs if rc != 0]
    return {
        "wrong": (ok and not correct) or (0 in codes and not ok),
        "stuck": not ok,
        "codes": codes,
        "refused_by_lock": sum("is being written by" in m for m in losers),
        "losers": losers,
        "losers_name_dst": all(os.path.abspath(dst) in m or dst in m for m in losers),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=48, help="per engine, alternating the two scenarios")
    ap.add_argument("--engines", default="native,python")
    ap.add_argument("--code", default=REPO, help="the checkout whose tli runs (default: this one)")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="tli-race-")
    a.code = os.path.abspath(a.code)
    sys.path.insert(0, a.code)
    src, ref = os.path.join(work, "src"), os.path.join(work, "ref")
    make_source(src)
    shutil.rmtree(ref, ignore_errors=True)
    done = tli(a.code, "upscale", src, ref, *METHOD, "--engine", "python")
    assert done.returncode == 0, done.stderr
    failed = False
    for engine in a.engines.split(","):
        results = {"fresh": [], "resume": []}
        for t in range(a.trials):
            scenario = ("fresh", "resume")[t % 2]
            r = trial(a.code, src, ref, work, engine, scenario)
            results[scenario].append(r)
            if r["wrong"] or r["stuck"]:
                print(f"  {engine} {scenario} trial {t}: wrong={r['wrong']} stuck={r['stuck']} codes={r['codes']} "
                      f"losers={r['losers']}", flush=True)  # fmt: skip
        every = results["fresh"] + results["resume"]
        wrong = sum(r["wrong"] for r in every)
        stuck = sum(r["stuck"] for r in every)
        refused = sum(r["refused_by_lock"] for r in every)
        both_ok = sum(r["codes"] == [0, 0] for r in every)
        named = sum(r["losers_name_dst"] for r in every if r["losers"])
        with_losers = sum(bool(r["losers"]) for r in every)
        print(
            f"{engine}: {len(every)} racing trials ({len(results['fresh'])} fresh, {len(results['resume'])} resume): "
            f"{wrong} wrong, {stuck} with no finished folder; {refused} losers refused by the lock, "
            f"{both_ok} trials where both exited 0; losers' messages naming DST: {named}/{with_losers}",
            flush=True,
        )
        failed |= bool(wrong or stuck)
    shutil.rmtree(work, ignore_errors=True) if a.workdir is None else None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
