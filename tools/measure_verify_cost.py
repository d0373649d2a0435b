"""What `--verify full` costs against the default sampled checksum, measured side by side.

Writes a dense Llama-3.2-1B-shaped checkpoint with fewer layers, then alternates (so load changes
hit both alike): `tli upscale` with --verify sample and with --verify full (native engine, fresh
DST each time), and the re-verification a --resume does of every finished shard (a `--part 1/1`
run leaves all shards and the marker; `--resume` re-reads them with the recorded coverage and
finishes). Prints medians and ratios with the machine and versions.

    PYTHONPATH=. python tools/measure_verify_cost.py [--layers 4] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tli_kernels import __version__  # noqa: E402
from tli_kernels.checkpoint.synthetic import write_preset  # noqa: E402

ARGS = ["--method", "tli", "--k", "2", "--init", "copy", "--alpha", "1", "--quiet", "--engine", "native"]


def tli(*argv: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tli_kernels.cli.main", *argv], check=True)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="tli-verify-cost-")
    src = os.path.join(work, "src")
    if not os.path.exists(src):
        write_preset(src, "llama-3.2-1b", layers=args.layers)
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    times: dict[str, list[float]] = {"write sample": [], "write full": [], "resume sample": [], "resume full": []}
    for _ in range(args.repeats):
        for mode in ("sample", "full"):
            dst = os.path.join(work, f"out-{mode}")
            shutil.rmtree(dst, ignore_errors=True)
            times[f"write {mode}"].append(tli("upscale", src, dst, *ARGS, "--verify", mode))
            shutil.rmtree(dst)
            tli("upscale", src, dst, *ARGS, "--verify", mode, "--part", "1/1")
            times[f"resume {mode}"].append(tli("upscale", src, dst, *ARGS, "--verify", mode, "--resume"))
    out_size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"python {platform.python_version()}, tli {__version__}; {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print(f"source {size / 1e9:.2f} GB ({args.layers} layers of Llama-3.2-1B), output {out_size / 1e9:.2f} GB, "
          f"median of {args.repeats}, alternated")  # fmt: skip
    print(f"{'':<16}{'sample':>10}{'full':>10}{'full/sample':>13}")
    for what in ("write", "resume"):
        a, b = statistics.median(times[f"{what} sample"]), statistics.median(times[f"{what} full"])
        print(f"{'tli upscale' if what == 'write' else '--resume check':<16}{a:>9.2f}s{b:>9.2f}s{b / a:>12.2f}x")
    if not args.workdir:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
