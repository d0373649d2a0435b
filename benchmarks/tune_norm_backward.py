"""Sweep the RMSNorm backward kernel's launch (programs per SM x warps) at one shape, on a GPU.

The first H200 window measured the norm backwards at 42-61% of the copy bandwidth while every other
kernel reached 80-102%: one program per SM walks its rows one at a time, a row-wide reduction between
its loads and its stores, so few bytes are in flight. More programs per SM (fewer warps each, so that
several fit) put more rows in flight; the cost is one float32 row of dw partials per program. This
script times each launch of `_rms_norm_bwd_kernel` (plain and with the residual, as `add_rms_norm`'s
backward runs it) with the partials' sum, checks dx, d branch and dw against the default launch and a
float32 reference, and prints a table (JSON with --out).

    python benchmarks/tune_norm_backward.py [--rows 8192 --n 4096] [--out FILE]
    TRITON_INTERPRET=1 python benchmarks/tune_norm_backward.py --smoke     # CPU: tiny, checks only
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

from tli_kernels.ops._triton import reduction_programs  # noqa: E402

rn = importlib.import_module("tli_kernels.ops.rms_norm")  # the module (the package exports a function of that name)


CONFIGS = [(1, None), (2, 4), (2, 8), (2, 16), (4, 4), (4, 8), (8, 4), (8, 8), (16, 4)]  # (programs / SM, warps)


def run(case: dict, programs: int, warps: int | None, block: int):
    x, dy, w, rstd, dres = case["x"], case["dy"], case["w"], case["rstd"], case["dres"]
    rows, n = x.shape
    has_residual = dres is not None
    dx = torch.empty_like(x)
    d_branch = torch.empty_like(x) if has_residual else x.new_empty(0)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    config = rn.launch_config(n, backward=True)
    if warps is not None:
        config = {**config, "num_warps": warps}
    assert config["ONE_PASS"] and config["BLOCK_N"] == block
    rn._rms_norm_bwd_kernel[(programs,)](
        dy, dres, x, w, rstd, None, None, dx, d_branch, dw_partial, None,
        rows, n, -(-rows // programs), 1.0, 0.0,
        HAS_DRESIDUAL_OUT=has_residual, HAS_RESIDUAL=has_residual, HAS_ALPHA=False, NEED_DALPHA=False,
        NEED_DW=True, CAST_BEFORE_WEIGHT=True, **config,
    )  # fmt: skip
    return dx, d_branch, dw_partial.sum(0).to(w.dtype)


def reference(case: dict):
    x, dy, w, rstd, dres = (t.float() if t is not None else None for t in (case["x"], case["dy"], case["w"],
                                                                           case["rstd"], case["dres"]))  # fmt: skip
    x_hat = x * rstd[:, None]
    w_dy = w * dy
    dx = (w_dy - x_hat * (x_hat * w_dy).mean(-1, keepdim=True)) * rstd[:, None]
    if dres is not None:
        dx = dx + dres
    dw = (dy * x_hat.to(case["x"].dtype).float()).sum(0)
    return dx, dw


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    rows, n = (args.rows, args.n) if cuda else (64, 256)
    dtype = torch.bfloat16 if cuda else torch.float32
    sms = reduction_programs(torch.empty(1, device=device), 1 << 30)
    block = rn.launch_config(n, backward=True)["BLOCK_N"]
    g = torch.Generator(device=device).manual_seed(0)
    results = {"rows": rows, "n": n, "dtype": str(dtype), "sms": sms, "device": torch.cuda.get_device_name(0) if cuda
               else "cpu", "cases": {}}  # fmt: skip
    for name, with_residual in (("rms_norm", False), ("add_rms_norm", True)):
        x = torch.randn(rows, n, device=device, generator=g).to(dtype)
        case = {
            "x": x,
            "dy": torch.randn(rows, n, device=device, generator=g).to(dtype),
            "w": (torch.rand(n, device=device, generator=g) + 0.5).to(dtype),
            "rstd": torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5),
            "dres": torch.randn(rows, n, device=device, generator=g).to(dtype) if with_residual else None,
        }
        tensors = 5 if with_residual else 3  # x, dy, dx (+ d residual out, d branch), each rows x n
        min_bytes = tensors * rows * n * x.element_size()
        want_dx, want_dw = reference(case)
        base = run(case, sms, None, block)
        rows_out = []
        for mult, warps in CONFIGS:
            programs = max(1, min(rows, sms * mult)) if cuda else max(1, min(rows, 4 * mult))
            entry = {"programs_per_sm": mult, "programs": programs,
                     "num_warps": warps or rn.launch_config(n, backward=True)["num_warps"]}  # fmt: skip
            try:
                dx, d_branch, dw = run(case, programs, warps, block)
                entry["err_dx_vs_fp32"] = rel(dx, want_dx)
                entry["err_dw_vs_fp32"] = rel(dw, want_dw)
                entry["dx_equal_to_default"] = bool(torch.equal(dx, base[0]))
                entry["dw_err_vs_default"] = rel(dw, base[2])
                if with_residual:
                    entry["d_branch_equal_to_dx"] = bool(torch.equal(d_branch, dx))
                if cuda:
                    import triton.testing

                    launch = lambda c=case, p=programs, w=warps: run(c, p, w, block)  # noqa: E731
                    ms = triton.testing.do_bench(launch, warmup=25, rep=100, return_mode="median")
                    entry["ms"] = ms
                    entry["gb_per_s"] = min_bytes / ms / 1e6
            except Exception as error:  # a launch that cannot compile or run (registers): recorded
                entry["error"] = f"{type(error).__name__}: {error}"[:300]
            rows_out.append(entry)
            print(name, json.dumps(entry), flush=True)
        results["cases"][name] = {"min_bytes": min_bytes, "configs": rows_out}
    print(f"\n{'case':<14}{'prog/SM':>8}{'warps':>6}{'us':>9}{'GB/s':>8}{'dx err':>10}{'dw err':>10}  same dx")
    for name, c in results["cases"].items():
        for e in c["configs"]:
            us = f"{e['ms'] * 1e3:9.1f}" if "ms" in e else f"{'-':>9}"
            gbs = f"{e['gb_per_s']:8.0f}" if "gb_per_s" in e else f"{'-':>8}"
            print(f"{name:<14}{e['programs_per_sm']:>8}{e['num_warps']:>6}{us}{gbs}"
                  f"{e.get('err_dx_vs_fp32', float('nan')):10.2e}{e.get('err_dw_vs_fp32', float('nan')):10.2e}"
                  f"  {e.get('dx_equal_to_default', e.get('error'))}")  # fmt: skip
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    bad = [e for c in results["cases"].values() for e in c["configs"]
           if "error" not in e and (e["err_dx_vs_fp32"] > 2e-2 or e["err_dw_vs_fp32"] > 2e-2)]  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
