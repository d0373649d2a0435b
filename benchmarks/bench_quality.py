"""The quality study: TLI against DUS, block expansion (LLaMA Pro), stacking, MoE upcycling and
random-init injection on SmolLM2-135M + King James. Same as `tli study`; see docs/quality.md.

    python benchmarks/bench_quality.py --preset cpu --threads 2          # ~1 hour on 2 CPU cores
    python benchmarks/bench_quality.py --preset gpu --kernels --out docs/gpu   # one H100-class GPU
"""

from __future__ import annotations

import shlex
import sys

from tli_kernels.cli.main import build_parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(["study", *argv])
    command = "python benchmarks/bench_quality.py " + " ".join(shlex.quote(a) for a in argv)
    return args.handler(args, command=command)


if __name__ == "__main__":
    sys.exit(main())
