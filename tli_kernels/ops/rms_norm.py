"""RMSNorm, and the residual-scaled add fused with the RMSNorm that follows it.

Design trade-off. Both are memory-bound: the floor is the bytes moved. One program owns one row; up to
ONE_PASS_MAX columns (4096 in the backward, which holds more row vectors) the whole row sits in
registers, so the statistics take one read. Wider rows (Llama-3.1-405B's 16384) would spill to local
memory (compiled for sm_90: 1-3.5 KB of stack per thread), so beyond that the row is walked in column
chunks twice: the second read of a row just read comes from L2, not HBM. The fused op reads the residual
and the branch once and writes the new residual and its norm once: 4 row-passes where the unfused `r +
a*b` then `rmsnorm` costs 6 (write r', read it back). The backward saves the new residual and the
float32 1/rms per row (not the normalised output) and recomputes x_hat, which costs a few FLOPs and
saves a tensor per norm. The weight gradient is reduced in two steps: one program per SM accumulates its
rows in float32 (registers for a one-pass row, its own L2-resident row of the partial buffer for a
chunked one), then a [programs, N] sum in PyTorch; that keeps the kernel free of atomics and
deterministic. alpha is either a Python float (a constant, passed to the kernel as float32) or a one-
element float32 tensor, a learnable scale whose gradient sum(dr' * branch) is accumulated as a float32
scalar per program and summed the same way.

Numerics follow transformers: statistics in float32; with CAST_BEFORE_WEIGHT (`LlamaRMSNorm` and most
families) x_hat is rounded to the input dtype before the weight multiplies it, without it (Gemma,
OLMo2) x_hat * (w + offset) is computed in float32 and rounded once to the input dtype. `offset` is
Gemma's parametrisation, a norm computing x_hat * (1 + w): added to w as it is loaded, so the weight
(and its gradient) stays the stored parameter.
Inputs are made contiguous before the op (the saved tensor is the one the forward read) and incoming
gradients before the backward kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tli_kernels import reference
from tli_kernels.ops._triton import (
    AUTOGRAD,
    CUSTOM_OP,
    REFERENCE,
    block_size,
    device_guard,
    jit,
    reduction_programs,
    route,
    tl,
    use_triton,
)

# Widest row kept whole in registers, forward and backward (the backward holds more row vectors: w,
# dw, x, dy, dx). Compiled for sm_90 with Triton 3.6 and 3.9 (benchmarks/kernel_resources.py), every
# configuration below is free of spills at hidden 576 to 65536; one-pass rows beyond these spill.
ONE_PASS_MAX = 8192
ONE_PASS_MAX_BACKWARD = 4096
CHUNK = 4096  # columns per step when a row is walked in chunks
CHUNK_WARPS = 32


def launch_config(n: int, backward: bool = False) -> dict:
    """BLOCK_N, ONE_PASS and num_warps for rows of n columns (shared with benchmarks/kernel_resources.py).
    ptxas caps the registers at 64K / threads (16 warps: 128 a thread, 32 warps: 64); the warps are
    chosen so that no configuration spills."""
    if n <= (ONE_PASS_MAX_BACKWARD if backward else ONE_PASS_MAX):
        block = block_size(n)
        if backward:  # two programs per SM (see _triton.PROGRAMS_PER_SM): 8 warps each, measured best
            warps = 8 if block <= 4096 else 32
        else:
            warps = 4 if block <= 1024 else 8 if block <= 4096 else 32
        return {"BLOCK_N": block, "ONE_PASS": True, "num_warps": warps}
    return {"BLOCK_N": CHUNK, "ONE_PASS": False, "num_warps": CHUNK_WARPS}


# ----------------------------------------------------------------------------------------- forward
@jit
def _norm_input(X, RESIDUAL, RESIDUAL_OUT, offsets, mask, alpha, HAS_RESIDUAL: tl.constexpr):
    """The row chunk to normalise, in float32: X, or RESIDUAL + alpha * X rounded and stored to RESIDUAL_OUT."""
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RESIDUAL + offsets, mask=mask, other=0.0).to(tl.float32)
        r = (r + alpha * x).to(RESIDUAL_OUT.dtype.element_ty)
        tl.store(RESIDUAL_OUT + offsets, r, mask=mask)
        x = r.to(tl.float32)  # normalise the rounded residual, as the unfused code does
    return x


@jit
def _store_normed(
    X, Y, W, RESIDUAL_OUT, x, rstd, w_offset, cols, offsets, mask,
    HAS_RESIDUAL: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
):  # fmt: skip
    x_hat = x * rstd
    if CAST_BEFORE_WEIGHT:
        if HAS_RESIDUAL:
            x_hat = x_hat.to(RESIDUAL_OUT.dtype.element_ty).to(tl.float32)
        else:
            x_hat = x_hat.to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + w_offset
    tl.store(Y + offsets, (x_hat * w).to(Y.dtype.element_ty), mask=mask)


@jit
def _rms_norm_fwd_kernel(
    X,  # [M, N] the norm input, or the branch when HAS_RESIDUAL
    RESIDUAL,  # [M, N] (HAS_RESIDUAL)
    ALPHA,  # [1] float32 (HAS_ALPHA); the scale applied is ALPHA[0] * scale
    W,  # [N]
    Y,  # [M, N] out: the normalised rows
    RESIDUAL_OUT,  # [M, N] out: RESIDUAL + alpha * X (HAS_RESIDUAL)
    RSTD,  # [M] float32 out: 1 / rms
    N,
    eps,
    scale,
    w_offset,  # added to each weight as loaded: 1.0 for Gemma's (1 + w)
    HAS_RESIDUAL: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,  # Llama's rounding of x_hat to the input dtype (see the docstring)
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,  # the whole row in one block; else chunks of BLOCK_N, read twice
):
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    cols = tl.arange(0, BLOCK_N)
    alpha = scale
    if HAS_ALPHA:
        alpha = tl.load(ALPHA).to(tl.float32) * scale
    if ONE_PASS:
        mask = cols < N
        x = _norm_input(X, RESIDUAL, RESIDUAL_OUT, base + cols, mask, alpha, HAS_RESIDUAL)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        tl.store(RSTD + row, rstd)
        _store_normed(
            X, Y, W, RESIDUAL_OUT, x, rstd, w_offset, cols, base + cols, mask, HAS_RESIDUAL, CAST_BEFORE_WEIGHT
        )
    else:
        squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            chunk = start + cols
            mask = chunk < N
            x = _norm_input(X, RESIDUAL, RESIDUAL_OUT, base + chunk, mask, alpha, HAS_RESIDUAL)
            squares += x * x
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / N + eps)
        tl.store(RSTD + row, rstd)
        if HAS_RESIDUAL:
            tl.debug_barrier()  # the new residual stored above is read back below
        for start in range(0, N, BLOCK_N):
            chunk = start + cols
            mask = chunk < N
            if HAS_RESIDUAL:
                x = tl.load(RESIDUAL_OUT + base + chunk, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(X + base + chunk, mask=mask, other=0.0).to(tl.float32)
            _store_normed(
                X, Y, W, RESIDUAL_OUT, x, rstd, w_offset, chunk, base + chunk, mask, HAS_RESIDUAL, CAST_BEFORE_WEIGHT
            )


def output_dtype(norm_in_dtype: torch.dtype, weight_dtype: torch.dtype, cast_before_weight: bool) -> torch.dtype:
    """Llama's norm returns weight * x_hat.to(dtype) (the promotion); Gemma's and OLMo2's the input dtype."""
    return torch.promote_types(norm_in_dtype, weight_dtype) if cast_before_weight else norm_in_dtype


def _forward_triton(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None, alpha: Tensor | None, scale: float,
    offset: float, cast_before_weight: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    rows, n = x.shape
    norm_in_dtype = residual.dtype if residual is not None else x.dtype
    y = torch.empty((rows, n), dtype=output_dtype(norm_in_dtype, weight.dtype, cast_before_weight), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    residual_out = torch.empty_like(residual) if residual is not None else None
    if rows:
        with device_guard(x):
            _rms_norm_fwd_kernel[(rows,)](
                x, residual, alpha, weight, y, residual_out, rstd, n, eps, scale, offset,
                HAS_RESIDUAL=residual is not None, HAS_ALPHA=alpha is not None,
                CAST_BEFORE_WEIGHT=cast_before_weight, **launch_config(n),
            )  # fmt: skip
    return y, rstd, residual_out


# ---------------------------------------------------------------------------------------- backward
@jit
def _rms_norm_bwd_kernel(
    DY,  # [M, N] grad of the normalised output
    DRESIDUAL_OUT,  # [M, N] grad arriving at the new residual directly (HAS_DRESIDUAL_OUT)
    X,  # [M, N] the norm input (the new residual when HAS_RESIDUAL)
    W,  # [N]
    RSTD,  # [M] float32
    BRANCH,  # [M, N] (NEED_DALPHA)
    ALPHA,  # [1] float32 (HAS_ALPHA)
    DX,  # [M, N] out: grad of X (= grad of the old residual when HAS_RESIDUAL)
    DBRANCH,  # [M, N] out: alpha * DX (HAS_RESIDUAL)
    DW_PARTIAL,  # [programs, N] float32 out (NEED_DW); zero-filled when not ONE_PASS (accumulated in place)
    DALPHA_PARTIAL,  # [programs] float32 out (NEED_DALPHA)
    M,
    N,
    rows_per_program,
    scale,
    w_offset,
    HAS_DRESIDUAL_OUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    NEED_DALPHA: tl.constexpr,
    NEED_DW: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    alpha = scale
    if HAS_ALPHA:
        alpha = tl.load(ALPHA).to(tl.float32) * scale
    dalpha = 0.0  # a float32 scalar: sum(dr' * branch) over this program's rows
    row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds: the loop index is int64 too
    row_end = tl.minimum(row_start + rows_per_program, M)
    if ONE_PASS:
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + w_offset
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for row in range(row_start, row_end):
            offsets = row * N + cols
            x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            w_dy = w * dy
            dx = (w_dy - x_hat * (tl.sum(x_hat * w_dy, axis=0) / N)) * rstd
            if NEED_DW:
                if CAST_BEFORE_WEIGHT:
                    dw += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
                else:
                    dw += dy * x_hat
            if HAS_DRESIDUAL_OUT:
                dx += tl.load(DRESIDUAL_OUT + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_RESIDUAL:
                tl.store(DBRANCH + offsets, (alpha * dx).to(DBRANCH.dtype.element_ty), mask=mask)
            if NEED_DALPHA:
                dalpha += tl.sum(dx * tl.load(BRANCH + offsets, mask=mask, other=0.0).to(tl.float32), axis=0)
        if NEED_DW:
            tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)
    else:
        for row in range(row_start, row_end):
            base = row * N
            rstd = tl.load(RSTD + row)
            dot = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum(x * w * dy): the row's projection term
            for start in range(0, N, BLOCK_N):
                chunk = start + cols
                mask = chunk < N
                x = tl.load(X + base + chunk, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + base + chunk, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + chunk, mask=mask, other=0.0).to(tl.float32) + w_offset
                dot += x * w * dy
            mean_term = tl.sum(dot, axis=0) * rstd / N
            for start in range(0, N, BLOCK_N):
                chunk = start + cols
                mask = chunk < N
                x = tl.load(X + base + chunk, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + base + chunk, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + chunk, mask=mask, other=0.0).to(tl.float32) + w_offset
                x_hat = x * rstd
                dx = (w * dy - x_hat * mean_term) * rstd
                if NEED_DW:  # this program's own partial row: same thread, same elements every row
                    partial = DW_PARTIAL + pid.to(tl.int64) * N + chunk
                    acc = tl.load(partial, mask=mask, other=0.0)
                    if CAST_BEFORE_WEIGHT:
                        x_hat = x_hat.to(X.dtype.element_ty).to(tl.float32)
                    tl.store(partial, acc + dy * x_hat, mask=mask)
                if HAS_DRESIDUAL_OUT:
                    dx += tl.load(DRESIDUAL_OUT + base + chunk, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + base + chunk, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_RESIDUAL:
                    tl.store(DBRANCH + base + chunk, (alpha * dx).to(DBRANCH.dtype.element_ty), mask=mask)
                if NEED_DALPHA:
                    b = tl.load(BRANCH + base + chunk, mask=mask, other=0.0).to(tl.float32)
                    dalpha += tl.sum(dx * b, axis=0)
    if NEED_DALPHA:
        tl.store(DALPHA_PARTIAL + pid, dalpha * scale)


def _backward_triton(
    dy: Tensor,
    d_residual_out: Tensor | None,
    x: Tensor,
    weight: Tensor,
    rstd: Tensor,
    branch: Tensor | None,
    alpha: Tensor | None,
    scale: float,
    has_residual: bool,
    need_dw: bool,
    offset: float,
    cast_before_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rows, n = x.shape
    dx = torch.empty_like(x)
    d_branch = torch.empty_like(x) if has_residual else x.new_empty(0)
    programs = reduction_programs(x, rows)
    rows_per_program = -(-rows // programs) if rows else 0
    need_dalpha = branch is not None
    config = launch_config(n, backward=True)
    dw_partial = None
    if need_dw:
        make = torch.empty if config["ONE_PASS"] else torch.zeros
        dw_partial = make((programs, n), dtype=torch.float32, device=x.device)
    dalpha_partial = torch.empty(programs, dtype=torch.float32, device=x.device) if need_dalpha else None
    if rows:
        with device_guard(x):
            _rms_norm_bwd_kernel[(programs,)](
                dy, d_residual_out, x, weight, rstd, branch, alpha, dx, d_branch, dw_partial, dalpha_partial,
                rows, n, rows_per_program, scale, offset,
                HAS_DRESIDUAL_OUT=d_residual_out is not None, HAS_RESIDUAL=has_residual,
                HAS_ALPHA=alpha is not None, NEED_DALPHA=need_dalpha, NEED_DW=need_dw,
                CAST_BEFORE_WEIGHT=cast_before_weight, **config,
            )  # fmt: skip
    if need_dw:
        dw = dw_partial.sum(0).to(weight.dtype) if rows else torch.zeros_like(weight)
    else:
        dw = weight.new_empty(0)
    if need_dalpha:
        d_alpha = dalpha_partial.sum(0, keepdim=True) if rows else torch.zeros(1, device=x.device)
    else:
        d_alpha = x.new_empty(0, dtype=torch.float32)
    return dx, d_branch, dw, d_alpha


# ------------------------------------------------------------- reference path (no Triton available)
def _forward_reference(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None, alpha: Tensor | None, scale: float,
    offset: float = 0.0, cast_before_weight: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """(y, rstd [..., 1], new residual or None) for inputs of any shape."""
    new_residual = None
    if residual is not None:
        new_residual = reference.scaled_add(residual, x, _alpha_value(alpha, scale))
        x = new_residual
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight and offset == 0.0:  # Llama's norm, the common case, without another call
        y = weight * (xf * rstd).to(x.dtype)
    else:
        y = reference.apply_weight(xf * rstd, x.dtype, weight, offset, cast_before_weight)
    return y, rstd, new_residual


def _alpha_value(alpha: Tensor | None, scale: float) -> float | Tensor:
    """alpha as float32 arithmetic sees it: the tensor times scale, or the float scale."""
    return alpha.float() * scale if alpha is not None else scale


def _backward_reference(
    dy: Tensor,
    d_residual_out: Tensor | None,
    x: Tensor,
    weight: Tensor,
    eps: float,
    branch: Tensor | None,
    alpha: Tensor | None,
    scale: float,
    has_residual: bool,
    need_dw: bool,
    offset: float,
    cast_before_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # r' = r + a*b is linear: the add's grads follow from dr' = d(norm input) + d(residual out).
    dx, dw = reference.rms_norm_backward(dy, x, weight, eps, offset, cast_before_weight)
    if d_residual_out is not None:
        dx = dx + d_residual_out.float()
    d_branch = (_alpha_value(alpha, scale) * dx).to(x.dtype) if has_residual else x.new_empty(0)
    dw = dw.to(weight.dtype) if need_dw else weight.new_empty(0)
    if branch is not None:
        d_alpha = (dx * branch.float()).sum().reshape(1) * scale
    else:
        d_alpha = x.new_empty(0, dtype=torch.float32)
    return dx.to(x.dtype), d_branch, dw, d_alpha


# ------------------------------------------------------- implementations (Triton or the reference)
def _forward(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None, alpha: Tensor | None = None,
    scale: float = 1.0, offset: float = 0.0, cast_before_weight: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """(y, rstd, new residual or None) for contiguous 2-D inputs."""
    if use_triton(_rms_norm_fwd_kernel, x):
        return _forward_triton(x, weight.contiguous(), eps, residual, alpha, scale, offset, cast_before_weight)
    y, rstd, new_residual = _forward_reference(x, weight, eps, residual, alpha, scale, offset, cast_before_weight)
    return y, rstd.view(-1), new_residual


def _backward(
    dy: Tensor,
    d_residual_out: Tensor | None,
    x: Tensor,
    weight: Tensor,
    rstd: Tensor,
    branch: Tensor | None,
    alpha: Tensor | None,
    scale: float,
    eps: float,
    has_residual: bool,
    need_dw: bool,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Every row the kernel reads at stride N: the saved input is contiguous already (the public functions
    # make it so), incoming gradients may not be (a sliced or expanded dy).
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()
    d_residual_out = d_residual_out.contiguous() if d_residual_out is not None else None
    branch = branch.contiguous() if branch is not None else None
    args = (branch, alpha, scale, has_residual, need_dw, offset, cast_before_weight)
    if use_triton(_rms_norm_bwd_kernel, x):
        return _backward_triton(dy, d_residual_out, x, weight, rstd, *args)
    return _backward_reference(dy, d_residual_out, x, weight, eps, *args)


# --------------------------------------------------------- custom ops (what torch.compile sees)
# `offset` and `cast_before_weight` select the family's numerics (see the module docstring); their
# defaults are Llama's, so the ops' schemas read as before for every family that uses those.
@torch.library.custom_op("tli::rms_norm", mutates_args=())
def _rms_norm_op(
    x: Tensor, weight: Tensor, eps: float, offset: float = 0.0, cast_before_weight: bool = True
) -> tuple[Tensor, Tensor]:
    y, rstd, _ = _forward(x.contiguous(), weight, eps, offset=offset, cast_before_weight=cast_before_weight)
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps, offset=0.0, cast_before_weight=True):
    out_dtype = output_dtype(x.dtype, weight.dtype, cast_before_weight)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("tli::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    residual: Tensor, branch: Tensor, weight: Tensor, alpha: Tensor | None, scale: float, eps: float,
    offset: float = 0.0, cast_before_weight: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    y, rstd, new_residual = _forward(
        branch.contiguous(), weight, eps, residual.contiguous(), alpha, scale, offset, cast_before_weight
    )
    return new_residual, y, rstd


@_add_rms_norm_op.register_fake
def _(residual, branch, weight, alpha, scale, eps, offset=0.0, cast_before_weight=True):
    out_dtype = output_dtype(residual.dtype, weight.dtype, cast_before_weight)
    rows = residual.shape[0]
    return (
        torch.empty_like(residual, memory_format=torch.contiguous_format),
        residual.new_empty(residual.shape, dtype=out_dtype),
        residual.new_empty(rows, dtype=torch.float32),
    )


@torch.library.custom_op("tli::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: Tensor,
    d_residual_out: Tensor | None,
    x: Tensor,
    weight: Tensor,
    rstd: Tensor,
    branch: Tensor | None,
    alpha: Tensor | None,
    scale: float,
    eps: float,
    has_residual: bool,
    need_dw: bool,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward(
        dy, d_residual_out, x, weight, rstd, branch, alpha, scale, eps, has_residual, need_dw, offset,
        cast_before_weight,
    )  # fmt: skip


@_rms_norm_backward_op.register_fake
def _(dy, d_residual_out, x, weight, rstd, branch, alpha, scale, eps, has_residual, need_dw, offset=0.0,
      cast_before_weight=True):  # fmt: skip
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format) if has_residual else x.new_empty(0),
        torch.empty_like(weight) if need_dw else weight.new_empty(0),
        x.new_empty(1 if branch is not None else 0, dtype=torch.float32),
    )


# What the two autograd paths (the custom op's registration, used under torch.compile, and the eager
# autograd.Functions) save and compute; they differ only in how the backward kernel is called.
def _save_rms_norm(ctx, x, weight, rstd, eps, offset, cast_before_weight) -> None:
    ctx.save_for_backward(x, weight, rstd)
    ctx.eps, ctx.offset, ctx.cast_before_weight = eps, offset, cast_before_weight


def _rms_norm_grads(ctx, dy, backward):
    x, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    dx, _, dw, _ = backward(
        dy, None, x, weight, rstd, None, None, 1.0, ctx.eps, False, need_dw, ctx.offset, ctx.cast_before_weight
    )
    return dx, (dw if need_dw else None), None, None, None


def _save_add_rms_norm(ctx, new_residual, weight, rstd, branch, alpha, scale, eps, offset, cast_before_weight):
    need_dalpha = alpha is not None and ctx.needs_input_grad[3]
    # The branch is kept alive only when alpha learns: d alpha = sum(dr' * branch).
    ctx.save_for_backward(new_residual, weight, rstd, branch if need_dalpha else None, alpha)
    ctx.scale, ctx.eps, ctx.branch_dtype = scale, eps, branch.dtype
    ctx.offset, ctx.cast_before_weight = offset, cast_before_weight


def _add_rms_norm_grads(ctx, d_new_residual, dy, backward):
    new_residual, weight, rstd, branch, alpha = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[2]
    d_residual, d_branch, dw, d_alpha = backward(
        dy, d_new_residual, new_residual, weight, rstd, branch, alpha, ctx.scale, ctx.eps, True, need_dw,
        ctx.offset, ctx.cast_before_weight,
    )  # fmt: skip
    return (
        d_residual,
        d_branch.to(ctx.branch_dtype),
        dw if need_dw else None,
        d_alpha.to(alpha.dtype) if branch is not None else None,
        None,
        None,
        None,
        None,
    )


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps, offset, cast_before_weight = inputs
    _save_rms_norm(ctx, x, weight, output[1], eps, offset, cast_before_weight)


def _rms_norm_backward(ctx, dy, _d_rstd):
    return _rms_norm_grads(ctx, dy, _rms_norm_backward_op)


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _add_rms_norm_setup(ctx, inputs, output):
    residual, branch, weight, alpha, scale, eps, offset, cast_before_weight = inputs
    new_residual, _, rstd = output
    _save_add_rms_norm(ctx, new_residual, weight, rstd, branch, alpha, scale, eps, offset, cast_before_weight)


def _add_rms_norm_backward(ctx, d_new_residual, dy, _d_rstd):
    return _add_rms_norm_grads(ctx, d_new_residual, dy, _rms_norm_backward_op)


_add_rms_norm_op.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


# --------------------------------------------------------------- eager autograd (no dispatcher)
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, offset: float, cast_before_weight: bool) -> Tensor:
        y, rstd, _ = _forward(x, weight, eps, offset=offset, cast_before_weight=cast_before_weight)
        _save_rms_norm(ctx, x, weight, rstd, eps, offset, cast_before_weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _rms_norm_grads(ctx, dy, _backward)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, branch, weight, alpha, scale, eps, offset, cast_before_weight):
        y, rstd, new_residual = _forward(branch, weight, eps, residual, alpha, scale, offset, cast_before_weight)
        _save_add_rms_norm(ctx, new_residual, weight, rstd, branch, alpha, scale, eps, offset, cast_before_weight)
        return new_residual, y

    @staticmethod
    def backward(ctx, d_new_residual, dy):
        return _add_rms_norm_grads(ctx, d_new_residual, dy, _backward)


# ------------------------------------------------------------------------------------ public API
def _check_weight(name: str, x: Tensor, weight: Tensor) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"{name}: weight of shape {tuple(weight.shape)} does not match the last dimension of the "
            f"input of shape {tuple(x.shape)}"
        )


def _rows(x: Tensor) -> Tensor:
    """x as contiguous [M, N] rows: what the kernels read, and what the backward gets saved."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def rms_norm(
    x: Tensor, weight: Tensor, eps: float = 1e-6, *, offset: float = 0.0, cast_before_weight: bool = True
) -> Tensor:
    """(weight + offset) * x / rms(x) over the last dimension. Differentiable.

    Defaults: Hugging Face Llama numerics (x / rms(x) rounded to x's dtype before the weight). Gemma's
    norm is `offset=1.0, cast_before_weight=False` (x_hat * (1 + w) in float32, rounded once), OLMo2's
    `cast_before_weight=False`."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        _check_weight("rms_norm", x, weight)
    eps, offset = float(eps), float(offset)
    how = route(_rms_norm_fwd_kernel, x, weight)
    if how == REFERENCE:  # the reference takes any shape: no reshaping
        return _forward_reference(x, weight, eps, None, None, 1.0, offset, cast_before_weight)[0]
    rows = _rows(x)
    if how == CUSTOM_OP:
        y, _ = _rms_norm_op(rows, weight, eps, offset, cast_before_weight)
    elif how == AUTOGRAD:
        y = _RMSNorm.apply(rows, weight, eps, offset, cast_before_weight)
    else:
        y, _, _ = _forward_triton(rows, weight.contiguous(), eps, None, None, 1.0, offset, cast_before_weight)
    return y.view(x.shape)


def add_rms_norm(
    residual: Tensor,
    branch: Tensor,
    weight: Tensor,
    eps: float = 1e-6,
    alpha: float | Tensor = 1.0,
    *,
    scale: float = 1.0,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> tuple[Tensor, Tensor]:
    """r' = residual + alpha * scale * branch and rms_norm(r') in one pass; returns (r', rms_norm(r')).

    `alpha` is a float (a constant, applied in float32) or a one-element float32 tensor (e.g. a
    learnable scale, which then receives its gradient); `scale` a constant factor on top (Granite's
    residual multiplier). `offset` and `cast_before_weight` as in `rms_norm`."""
    if weight.dim() != 1 or residual.shape[-1] != weight.shape[0]:
        _check_weight("add_rms_norm", residual, weight)
    if residual.shape != branch.shape:
        raise ValueError(
            f"add_rms_norm: residual {tuple(residual.shape)} and branch {tuple(branch.shape)} differ in shape"
        )
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"add_rms_norm: alpha must have one element, got shape {tuple(alpha.shape)}")
        alpha_tensor, scale = alpha.reshape(1), float(scale)
    else:
        alpha_tensor, scale = None, float(alpha) * float(scale)
    eps, offset = float(eps), float(offset)
    how = route(_rms_norm_fwd_kernel, residual, branch, weight, alpha_tensor)
    if how == REFERENCE:
        y, _, new_residual = _forward_reference(
            branch, weight, eps, residual, alpha_tensor, scale, offset, cast_before_weight
        )
        return new_residual, y
    r, b = _rows(residual), _rows(branch)
    if how == CUSTOM_OP:
        new_residual, y, _ = _add_rms_norm_op(r, b, weight, alpha_tensor, scale, eps, offset, cast_before_weight)
    elif how == AUTOGRAD:
        new_residual, y = _AddRMSNorm.apply(r, b, weight, alpha_tensor, scale, eps, offset, cast_before_weight)
    else:
        y, _, new_residual = _forward_triton(
            b, weight.contiguous(), eps, r, alpha_tensor, scale, offset, cast_before_weight
        )
    return new_residual.view(residual.shape), y.view(residual.shape)
