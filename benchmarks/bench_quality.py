"""The quality study: TLI against DUS, block expansion (LLaMA Pro), stacking, MoE upcycling and
random-init injection on SmolLM2-135M + King James. Same as `tli study` (the library code is
tli_kernels/training/study.py), plus the shared harness's environment record; see docs/quality.md.

    python benchmarks/bench_quality.py --preset cpu --threads 2                  # 2 CPU cores: ~3 hours
    python benchmarks/bench_quality.py --preset gpu --kernels --out docs/gpu --workdir build/study-gpu
"""

from __future__ import annotations

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402  (this folder's shared harness)

from tli_kernels.cli.main import build_parser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(["study", *argv])
    command = "python benchmarks/bench_quality.py " + " ".join(shlex.quote(a) for a in argv)
    import torch  # noqa: F401  (harness.accelerator() reads the GPU only where torch is already imported)

    env = harness.environment()
    return args.handler(args, command=command, environment=env, environment_text=harness.describe_environment(env))


if __name__ == "__main__":
    sys.exit(main())
