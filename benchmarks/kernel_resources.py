"""Registers, spills and shared memory of every tli kernel as compiled for a GPU, without the GPU.

Triton compiles for a named target on any machine (its wheel carries ptxas and cuobjdump), so this
builds each kernel with the launch configuration its launcher would use at the model shapes that
matter (hidden 2048 / 4096 / 8192 / 16384 / 65536; head_dim 64 / 128 at 32 to 128 heads) for sm_90
(H100/H200) and reads the resource usage back from the cubin. A STACK above 0 means spills to local
memory: for a memory-bound kernel, extra traffic per thread. The test suite runs this for the norms
(tests/ops/test_kernel_resources.py); run it yourself after changing a kernel or a launch size:

    python benchmarks/kernel_resources.py [--arch 90] [--only rms_norm] [--json OUT.json]

TRITON_INTERPRET must be unset (the interpreter builds no code).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIDDEN = (576, 2048, 3072, 4096, 8192, 16384, 65536)  # SmolLM2, Llama 3.2-1B/3B, 3-8B, 3-70B, 3.1-405B, 64k
ROPE = ((32, 8, 64), (32, 8, 128), (64, 8, 128), (128, 8, 128))  # (q heads, kv heads, head_dim)
DTYPE = "bf16"


def _ops(name: str):
    return importlib.import_module(f"tli_kernels.ops.{name}")


def configs(only: str | None = None) -> list[dict]:
    """Every (kernel, signature, constexprs, warps) a launcher would use at the shapes above."""
    rms, rope, swiglu, scaled_add = _ops("rms_norm"), _ops("rope"), _ops("swiglu"), _ops("scaled_add")
    e, f = f"*{DTYPE}", "*fp32"
    out = []
    for n in HIDDEN:
        for residual in (False, True):
            config = rms.launch_config(n)
            sig = {"X": e, "RESIDUAL": e if residual else "constexpr", "ALPHA": f if residual else "constexpr",
                   "W": e, "Y": e, "RESIDUAL_OUT": e if residual else "constexpr", "RSTD": f, "N": "i32",
                   "eps": "fp32", "scale": "fp32", "w_offset": "fp32"}  # fmt: skip
            const = {"HAS_RESIDUAL": residual, "HAS_ALPHA": residual, "CAST_BEFORE_WEIGHT": True,
                     "BLOCK_N": config["BLOCK_N"], "ONE_PASS": config["ONE_PASS"]}  # fmt: skip
            if not residual:
                const.update(RESIDUAL=None, ALPHA=None, RESIDUAL_OUT=None)
            out.append(dict(op="rms_norm", kernel=rms._rms_norm_fwd_kernel, case=f"fwd N={n} residual={residual}",
                            signature=sig, constexprs=const, num_warps=config["num_warps"]))  # fmt: skip
            config = rms.launch_config(n, backward=True)
            sig = {"DY": e, "DRESIDUAL_OUT": e if residual else "constexpr", "X": e, "W": e, "RSTD": f,
                   "BRANCH": e if residual else "constexpr", "ALPHA": f if residual else "constexpr", "DX": e,
                   "DBRANCH": e if residual else "constexpr", "DW_PARTIAL": f,
                   "DALPHA_PARTIAL": f if residual else "constexpr", "M": "i32", "N": "i32",
                   "rows_per_program": "i32", "scale": "fp32", "w_offset": "fp32"}  # fmt: skip
            const = {"HAS_DRESIDUAL_OUT": residual, "HAS_RESIDUAL": residual, "HAS_ALPHA": residual,
                     "NEED_DALPHA": residual, "NEED_DW": True, "CAST_BEFORE_WEIGHT": True,
                     "BLOCK_N": config["BLOCK_N"], "ONE_PASS": config["ONE_PASS"]}  # fmt: skip
            if not residual:
                const.update(DRESIDUAL_OUT=None, BRANCH=None, ALPHA=None, DBRANCH=None, DALPHA_PARTIAL=None)
            out.append(dict(op="rms_norm", kernel=rms._rms_norm_bwd_kernel, case=f"bwd N={n} residual={residual}",
                            signature=sig, constexprs=const, num_warps=config["num_warps"]))  # fmt: skip
    for q_heads, k_heads, head_dim in ROPE:
        config = rope.launch_config(q_heads, k_heads, head_dim)
        sig = {"Q": e, "K": e, "COS": e, "SIN": e, "Q_OUT": e, "K_OUT": e, "seq_len": "i32", "q_heads": "i32",
               "k_heads": "i32", "stride_qb": "i64", "stride_qs": "i64", "stride_kb": "i64", "stride_ks": "i64",
               "stride_cb": "i64", "stride_cs": "i64"}  # fmt: skip
        const = {k: v for k, v in config.items() if k != "num_warps"} | {"BACKWARD": False}
        out.append(dict(op="rope", kernel=rope._rope_kernel, case=f"{q_heads}/{k_heads} heads, head_dim {head_dim}",
                        signature=sig, constexprs=const, num_warps=config["num_warps"]))  # fmt: skip
    config = swiglu.launch_config(14336)
    sig = {"G": e, "U": e, "Y": e, "stride_g": "i64", "stride_u": "i64", "n_cols": "i32"}
    for act, act_id in swiglu.ACTIVATION_IDS.items():
        out.append(dict(op="swiglu", kernel=swiglu._swiglu_fwd_kernel, case=f"fwd {act}", signature=sig,
                        constexprs={"ACTIVATION": act_id, "BLOCK": config["BLOCK"]},
                        num_warps=config["num_warps"]))  # fmt: skip
    sig = {"DY": e, "G": e, "U": e, "DG": e, "DU": e, "stride_g": "i64", "stride_u": "i64", "stride_dg": "i64",
           "stride_du": "i64", "n_cols": "i32"}  # fmt: skip
    for act, act_id in swiglu.ACTIVATION_IDS.items():
        out.append(dict(op="swiglu", kernel=swiglu._swiglu_bwd_kernel, case=f"bwd {act}", signature=sig,
                        constexprs={"ACTIVATION": act_id, "BLOCK": config["BLOCK"]},
                        num_warps=config["num_warps"]))  # fmt: skip
    sig = {"R": e, "B": e, "ALPHA": f, "OUT": e, "n": "i64", "scale": "fp32"}
    out.append(dict(op="scaled_add", kernel=scaled_add._scaled_add_fwd_kernel, case="fwd, learnable alpha",
                    signature=sig, constexprs={"HAS_ALPHA": True, "BLOCK": scaled_add.BLOCK},
                    num_warps=scaled_add.NUM_WARPS))  # fmt: skip
    sig = {"DOUT": e, "B": e, "ALPHA": f, "DB": e, "DALPHA_PARTIAL": f, "n": "i64", "scale": "fp32"}
    out.append(dict(op="scaled_add", kernel=scaled_add._scaled_add_bwd_kernel, case="bwd, learnable alpha",
                    signature=sig, constexprs={"HAS_ALPHA": True, "NEED_DALPHA": True, "BLOCK": scaled_add.BLOCK},
                    num_warps=scaled_add.NUM_WARPS))  # fmt: skip
    return [c for c in out if only is None or c["op"] == only]


def compile_one(config: dict, arch: int) -> dict:
    """Compile for sm_<arch> and read REG / STACK / SHARED from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = config["kernel"]
    names = list(kernel.arg_names)
    signature = {name: config["signature"].get(name, "constexpr") for name in names}
    constexprs = {(names.index(k),): v for k, v in config["constexprs"].items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": config["num_warps"]})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(usage["REG"]), "stack_bytes": int(usage["STACK"]), "local_bytes": int(usage["LOCAL"]),
            "shared_bytes": int(usage["SHARED"])}  # fmt: skip


def measure(only: str | None = None, arch: int = 90) -> list[dict]:
    rows = []
    for config in configs(only):
        entry = {"op": config["op"], "kernel": config["kernel"].__name__, "case": config["case"],
                 "num_warps": config["num_warps"],
                 "constexprs": {k: v for k, v in config["constexprs"].items() if v is not None}}  # fmt: skip
        try:
            entry.update(compile_one(config, arch))
        except Exception as error:  # recorded per kernel: one that does not compile is itself the finding
            entry["error"] = f"{type(error).__name__}: {error}"
        rows.append(entry)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--only", choices=["rms_norm", "rope", "swiglu", "scaled_add"])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    sys.path.insert(0, str(REPO))
    rows = measure(args.only, args.arch)
    print(f"sm_{args.arch}, {DTYPE} pointers; STACK > 0 = spills to local memory")
    for r in rows:
        usage = r.get("error") or f"REG {r['registers']:3d}  STACK {r['stack_bytes']:5d}  SHARED {r['shared_bytes']}"
        print(f"{r['kernel']:26s} {r['case']:34s} warps {r['num_warps']:2d}  {usage}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
