"""RMSNorm, and the residual-scaled add fused with the RMSNorm that follows it.

Design trade-off. Both are memory-bound: the floor is the bytes moved. One program owns one row (the
whole hidden dimension sits in registers), so the statistics take one read. The fused op reads the
residual and the branch once and writes the new residual and its norm once: 4 row-passes where the
unfused `r + a*b` then `rmsnorm` costs 6 (write r', read it back) plus a separate scale. The backward
saves the new residual and the float32 1/rms per row (not the normalised output) and recomputes
x_hat, which costs a few FLOPs and saves a tensor per norm. The weight gradient is reduced in two
steps: each program accumulates its rows in float32 registers, then a [programs, N] sum in PyTorch;
that keeps the kernel free of atomics and deterministic. alpha is either a Python float (a constant
folded into the launch) or a one-element float32 tensor, a learnable scale whose gradient
sum(dr' * branch) is reduced the same way.

Numerics follow `LlamaRMSNorm`: statistics in float32, x_hat rounded to the input dtype before the
weight multiplies it, so on the reference path and in float32 the patched model matches the stock one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tli_kernels import reference
from tli_kernels.ops._triton import block_size, jit, num_warps_for, reduction_programs, tl, use_triton

MAX_HIDDEN = 65536  # one row per program must fit in registers


# ----------------------------------------------------------------------------------------- forward
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
    HAS_RESIDUAL: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    offsets = row * N + cols
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        alpha = scale
        if HAS_ALPHA:
            alpha = tl.load(ALPHA).to(tl.float32) * scale
        r = tl.load(RESIDUAL + offsets, mask=mask, other=0.0).to(tl.float32)
        r = (r + alpha * x).to(RESIDUAL_OUT.dtype.element_ty)
        tl.store(RESIDUAL_OUT + offsets, r, mask=mask)
        x = r.to(tl.float32)  # normalise the rounded residual, as the unfused code does
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    x_hat = x * rstd
    if HAS_RESIDUAL:
        x_hat = x_hat.to(RESIDUAL_OUT.dtype.element_ty).to(tl.float32)
    else:
        x_hat = x_hat.to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offsets, (x_hat * w).to(Y.dtype.element_ty), mask=mask)


def _check_width(n: int) -> None:
    if n > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {n} exceeds the kernel's row limit {MAX_HIDDEN}")


def _forward_triton(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None, alpha: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    rows, n = x.shape
    _check_width(n)
    norm_in_dtype = residual.dtype if residual is not None else x.dtype
    y = torch.empty((rows, n), dtype=torch.promote_types(norm_in_dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    residual_out = torch.empty_like(residual) if residual is not None else None
    if rows:
        block = block_size(n)
        _rms_norm_fwd_kernel[(rows,)](
            x, residual, alpha, weight, y, residual_out, rstd, n, eps, scale,
            HAS_RESIDUAL=residual is not None, HAS_ALPHA=alpha is not None, BLOCK_N=block,
            num_warps=num_warps_for(block),
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
    DW_PARTIAL,  # [programs, N] float32 out (NEED_DW)
    DALPHA_PARTIAL,  # [programs] float32 out (NEED_DALPHA)
    M,
    N,
    rows_per_program,
    scale,
    HAS_DRESIDUAL_OUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    NEED_DALPHA: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dalpha = tl.zeros((BLOCK_N,), dtype=tl.float32)
    alpha = scale
    if HAS_ALPHA:
        alpha = tl.load(ALPHA).to(tl.float32) * scale
    row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds: the loop index is int64 too
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        offsets = row * N + cols
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        w_dy = w * dy
        dx = (w_dy - x_hat * (tl.sum(x_hat * w_dy, axis=0) / N)) * rstd
        if NEED_DW:
            dw += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        if HAS_DRESIDUAL_OUT:
            dx += tl.load(DRESIDUAL_OUT + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            tl.store(DBRANCH + offsets, (alpha * dx).to(DBRANCH.dtype.element_ty), mask=mask)
        if NEED_DALPHA:
            dalpha += dx * tl.load(BRANCH + offsets, mask=mask, other=0.0).to(tl.float32)
    if NEED_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)
    if NEED_DALPHA:
        tl.store(DALPHA_PARTIAL + pid, tl.sum(dalpha, axis=0) * scale)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rows, n = x.shape
    dx = torch.empty_like(x)
    d_branch = torch.empty_like(x) if has_residual else x.new_empty(0)
    programs = reduction_programs(x, rows)
    rows_per_program = -(-rows // programs) if rows else 0
    need_dalpha = branch is not None
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device) if need_dw else None
    dalpha_partial = torch.empty(programs, dtype=torch.float32, device=x.device) if need_dalpha else None
    if rows:
        block = block_size(n)
        _rms_norm_bwd_kernel[(programs,)](
            dy, d_residual_out, x, weight, rstd, branch, alpha, dx, d_branch, dw_partial, dalpha_partial,
            rows, n, rows_per_program, scale,
            HAS_DRESIDUAL_OUT=d_residual_out is not None, HAS_RESIDUAL=has_residual,
            HAS_ALPHA=alpha is not None, NEED_DALPHA=need_dalpha, NEED_DW=need_dw, BLOCK_N=block,
            num_warps=num_warps_for(block),
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
def _rstd_reference(x: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # r' = r + a*b is linear: the add's grads follow from dr' = d(norm input) + d(residual out).
    dx, dw = reference.rms_norm_backward(dy, x, weight, eps)
    if d_residual_out is not None:
        dx = dx + d_residual_out.float()
    alpha_value = scale * (alpha.float() if alpha is not None else 1.0)
    d_branch = (alpha_value * dx).to(x.dtype) if has_residual else x.new_empty(0)
    dw = dw.to(weight.dtype) if need_dw else weight.new_empty(0)
    if branch is not None:
        d_alpha = (dx * branch.float()).sum().reshape(1) * scale
    else:
        d_alpha = x.new_empty(0, dtype=torch.float32)
    return dx.to(x.dtype), d_branch, dw, d_alpha


# ------------------------------------------------------------------------- custom ops and autograd
@torch.library.custom_op("tli::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    x = x.contiguous()
    if use_triton(_rms_norm_fwd_kernel, x):
        y, rstd, _ = _forward_triton(x, weight.contiguous(), eps, None, None, 1.0)
        return y, rstd
    return reference.rms_norm(x, weight, eps), _rstd_reference(x, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("tli::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    residual: Tensor, branch: Tensor, weight: Tensor, alpha: Tensor | None, scale: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    residual, branch = residual.contiguous(), branch.contiguous()
    if use_triton(_rms_norm_fwd_kernel, residual):
        y, rstd, new_residual = _forward_triton(branch, weight.contiguous(), eps, residual, alpha, scale)
        return new_residual, y, rstd
    alpha_value = scale * (alpha.float() if alpha is not None else 1.0)
    new_residual, y = reference.add_rms_norm(residual, branch, weight, eps, alpha_value)
    return new_residual, y, _rstd_reference(new_residual, eps)


@_add_rms_norm_op.register_fake
def _(residual, branch, weight, alpha, scale, eps):
    out_dtype = torch.promote_types(residual.dtype, weight.dtype)
    rows = residual.shape[0]
    return (
        torch.empty_like(residual),
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dy = dy.contiguous()
    d_residual_out = d_residual_out.contiguous() if d_residual_out is not None else None
    branch = branch.contiguous() if branch is not None else None
    if use_triton(_rms_norm_bwd_kernel, x):
        return _backward_triton(dy, d_residual_out, x, weight, rstd, branch, alpha, scale, has_residual, need_dw)
    return _backward_reference(dy, d_residual_out, x, weight, eps, branch, alpha, scale, has_residual, need_dw)


@_rms_norm_backward_op.register_fake
def _(dy, d_residual_out, x, weight, rstd, branch, alpha, scale, eps, has_residual, need_dw):
    return (
        torch.empty_like(x),
        torch.empty_like(x) if has_residual else x.new_empty(0),
        torch.empty_like(weight) if need_dw else weight.new_empty(0),
        x.new_empty(1 if branch is not None else 0, dtype=torch.float32),
    )


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.eps = eps


def _rms_norm_backward(ctx, dy, _d_rstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    dx, _, dw, _ = _rms_norm_backward_op(dy, None, x, weight, rstd, None, None, 1.0, ctx.eps, False, need_dw)
    return dx, (dw if need_dw else None), None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _add_rms_norm_setup(ctx, inputs, output):
    residual, branch, weight, alpha, scale, eps = inputs
    new_residual, _, rstd = output
    need_dalpha = alpha is not None and ctx.needs_input_grad[3]
    # The branch is kept alive only when alpha learns: d alpha = sum(dr' * branch).
    ctx.save_for_backward(new_residual, weight, rstd, branch if need_dalpha else None, alpha)
    ctx.scale, ctx.eps, ctx.branch_dtype = scale, eps, branch.dtype


def _add_rms_norm_backward(ctx, d_new_residual, dy, _d_rstd):
    new_residual, weight, rstd, branch, alpha = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[2]
    d_residual, d_branch, dw, d_alpha = _rms_norm_backward_op(
        dy, d_new_residual, new_residual, weight, rstd, branch, alpha, ctx.scale, ctx.eps, True, need_dw
    )
    return (
        d_residual,
        d_branch.to(ctx.branch_dtype),
        dw if need_dw else None,
        d_alpha.to(alpha.dtype) if branch is not None else None,
        None,
        None,
    )


_add_rms_norm_op.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


# ------------------------------------------------------------------------------------ public API
def _check_weight(name: str, x: Tensor, weight: Tensor) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"{name}: weight of shape {tuple(weight.shape)} does not match the last dimension of the "
            f"input of shape {tuple(x.shape)}"
        )


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """weight * x / rms(x) over the last dimension (Hugging Face Llama numerics). Differentiable."""
    _check_weight("rms_norm", x, weight)
    y, _ = _rms_norm_op(x.reshape(-1, x.shape[-1]), weight, float(eps))
    return y.view(x.shape)


def add_rms_norm(
    residual: Tensor, branch: Tensor, weight: Tensor, eps: float = 1e-6, alpha: float | Tensor = 1.0
) -> tuple[Tensor, Tensor]:
    """r' = residual + alpha * branch and rms_norm(r') in one pass; returns (r', rms_norm(r')).

    `alpha` is a float (a constant) or a one-element float32 tensor (e.g. a learnable scale, which
    then receives its gradient)."""
    _check_weight("add_rms_norm", residual, weight)
    if residual.shape != branch.shape:
        raise ValueError(
            f"add_rms_norm: residual {tuple(residual.shape)} and branch {tuple(branch.shape)} differ in shape"
        )
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"add_rms_norm: alpha must have one element, got shape {tuple(alpha.shape)}")
        alpha_tensor, scale = alpha.reshape(1), 1.0
    else:
        alpha_tensor, scale = None, float(alpha)
    n = residual.shape[-1]
    new_residual, y, _ = _add_rms_norm_op(
        residual.reshape(-1, n), branch.reshape(-1, n), weight, alpha_tensor, scale, float(eps)
    )
    return new_residual.view(residual.shape), y.view(residual.shape)
