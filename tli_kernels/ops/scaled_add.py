"""The residual add that ends a decoder block, r + alpha * b, with alpha applied in float32.

Design trade-off. An injected layer scales both residual branches by the same alpha. The first add is
fused into `add_rms_norm`, whose kernel applies alpha in float32; this op does the second one the same
way, so both branches (and `fold_residual_scales`, which multiplies the float32 alpha into the weights)
use one float32 value. The PyTorch ops it replaces did not: `addcmul(r, b, alpha.to(bf16))` rounds a
learnable alpha to bf16, and `torch.add(r, b, alpha=a)` rounds a fixed one to bf16 on CPU. Flat and
elementwise: forward reads r and b and writes the sum (3 passes, as `torch.add`); backward passes the
gradient through to r untouched, writes alpha * g for b and, for a learnable alpha, reduces sum(g * b)
in float32 in the same pass (one float32 partial per program, summed in PyTorch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tli_kernels import reference
from tli_kernels.ops._triton import AUTOGRAD, CUSTOM_OP, cdiv, device_guard, jit, route, tl, use_triton

BLOCK = 2048
NUM_WARPS = 8


@jit
def _scaled_add_fwd_kernel(R, B, ALPHA, OUT, n, scale, HAS_ALPHA: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    alpha = scale
    if HAS_ALPHA:
        alpha = tl.load(ALPHA).to(tl.float32) * scale
    r = tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, (r + alpha * b).to(OUT.dtype.element_ty), mask=mask)


@jit
def _scaled_add_bwd_kernel(
    DOUT,  # [n] grad of the sum
    B,  # [n] the branch (NEED_DALPHA)
    ALPHA,  # [1] float32 (HAS_ALPHA)
    DB,  # [n] out: alpha * DOUT
    DALPHA_PARTIAL,  # [programs] float32 out: sum(DOUT * B) of this block (NEED_DALPHA)
    n,
    scale,
    HAS_ALPHA: tl.constexpr,
    NEED_DALPHA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    alpha = scale
    if HAS_ALPHA:
        alpha = tl.load(ALPHA).to(tl.float32) * scale
    g = tl.load(DOUT + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DB + offsets, (alpha * g).to(DB.dtype.element_ty), mask=mask)
    if NEED_DALPHA:
        b = tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(DALPHA_PARTIAL + pid, tl.sum(g * b, axis=0) * scale)


# ------------------------------------------------------- implementations (Triton or the reference)
def _forward(residual: Tensor, branch: Tensor, alpha: Tensor | None, scale: float) -> Tensor:
    if use_triton(_scaled_add_fwd_kernel, residual):
        out_dtype = torch.promote_types(residual.dtype, branch.dtype)
        out = torch.empty(residual.shape, dtype=out_dtype, device=residual.device)
        n = residual.numel()
        if n:
            with device_guard(residual):
                _scaled_add_fwd_kernel[(cdiv(n, BLOCK),)](
                    residual, branch, alpha, out, n, scale, HAS_ALPHA=alpha is not None, BLOCK=BLOCK,
                    num_warps=NUM_WARPS,
                )  # fmt: skip
        return out
    return reference.scaled_add(residual, branch, alpha.float() * scale if alpha is not None else scale)


def _backward(dout: Tensor, branch: Tensor | None, alpha: Tensor | None, scale: float, branch_dtype: torch.dtype):
    """(d branch, d alpha): alpha * dout in branch's dtype, and sum(dout * branch) in float32 when branch is given."""
    dout = dout.contiguous()
    if use_triton(_scaled_add_bwd_kernel, dout):
        n = dout.numel()
        programs = max(1, cdiv(n, BLOCK))
        d_branch = torch.empty(dout.shape, dtype=branch_dtype, device=dout.device)
        partial = torch.zeros(programs, dtype=torch.float32, device=dout.device) if branch is not None else None
        if n:
            with device_guard(dout):
                _scaled_add_bwd_kernel[(programs,)](
                    dout, branch, alpha, d_branch, partial, n, scale, HAS_ALPHA=alpha is not None,
                    NEED_DALPHA=branch is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
                )  # fmt: skip
        d_alpha = partial.sum(0, keepdim=True) if branch is not None else None
        return d_branch, d_alpha
    g = dout.float()
    d_branch = ((alpha.float() * scale if alpha is not None else scale) * g).to(branch_dtype)
    d_alpha = (g * branch.float()).sum().reshape(1) * scale if branch is not None else None
    return d_branch, d_alpha


# --------------------------------------------------------- custom ops (what torch.compile sees)
@torch.library.custom_op("tli::scaled_add", mutates_args=())
def _scaled_add_op(residual: Tensor, branch: Tensor, alpha: Tensor | None, scale: float) -> Tensor:
    return _forward(residual.contiguous(), branch.contiguous(), alpha, scale)


@_scaled_add_op.register_fake
def _(residual, branch, alpha, scale):
    return residual.new_empty(residual.shape, dtype=torch.promote_types(residual.dtype, branch.dtype))


@torch.library.custom_op("tli::scaled_add_backward", mutates_args=())
def _scaled_add_backward_op(
    dout: Tensor, branch: Tensor | None, alpha: Tensor | None, scale: float, need_dalpha: bool
) -> tuple[Tensor, Tensor]:
    d_branch, d_alpha = _backward(dout, branch if need_dalpha else None, alpha, scale, dout.dtype)
    return d_branch, (d_alpha if d_alpha is not None else dout.new_empty(0, dtype=torch.float32))


@_scaled_add_backward_op.register_fake
def _(dout, branch, alpha, scale, need_dalpha):
    return (
        torch.empty_like(dout, memory_format=torch.contiguous_format),
        dout.new_empty(1 if need_dalpha else 0, dtype=torch.float32),
    )


def _setup(ctx, inputs, output):
    residual, branch, alpha, scale = inputs
    ctx.need_dalpha = alpha is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(branch if ctx.need_dalpha else None, alpha)
    ctx.scale, ctx.residual_dtype, ctx.branch_dtype = scale, residual.dtype, branch.dtype


def _backward_autograd(ctx, dout):
    branch, alpha = ctx.saved_tensors
    d_branch, d_alpha = _scaled_add_backward_op(dout, branch, alpha, ctx.scale, ctx.need_dalpha)
    d_alpha = d_alpha.to(alpha.dtype) if ctx.need_dalpha else None
    return dout.to(ctx.residual_dtype), d_branch.to(ctx.branch_dtype), d_alpha, None


_scaled_add_op.register_autograd(_backward_autograd, setup_context=_setup)


# --------------------------------------------------------------- eager autograd (no dispatcher)
class _ScaledAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, branch, alpha, scale):
        ctx.need_dalpha = alpha is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(branch if ctx.need_dalpha else None, alpha)
        ctx.scale, ctx.residual_dtype, ctx.branch_dtype = scale, residual.dtype, branch.dtype
        return _forward(residual, branch, alpha, scale)

    @staticmethod
    def backward(ctx, dout):
        branch, alpha = ctx.saved_tensors
        d_branch, d_alpha = _backward(dout, branch, alpha, ctx.scale, ctx.branch_dtype)
        return dout.to(ctx.residual_dtype), d_branch, (d_alpha.to(alpha.dtype) if ctx.need_dalpha else None), None


# ------------------------------------------------------------------------------------ public API
def scaled_add(residual: Tensor, branch: Tensor, alpha: float | Tensor, *, scale: float = 1.0) -> Tensor:
    """residual + alpha * scale * branch in float32, rounded once to the promoted dtype of residual and branch
    (bf16 autocast leaves a float32 residual beside a bf16 branch: the sum is float32, as stock's
    `residual + branch`; the gradients come back in each input's dtype). `alpha`: a float
    (applied as float32) or a one-element float32 tensor (e.g. a learnable scale, which receives its
    gradient); `scale` a constant factor on top (Granite's residual multiplier). Differentiable."""
    if residual.shape != branch.shape or not (residual.is_floating_point() and branch.is_floating_point()):
        raise ValueError(
            f"scaled_add: residual {tuple(residual.shape)} {residual.dtype} and branch {tuple(branch.shape)} "
            f"{branch.dtype} must have one shape and floating dtypes"
        )
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"scaled_add: alpha must have one element, got shape {tuple(alpha.shape)}")
        alpha_tensor, scale = alpha.reshape(1), float(scale)
    else:
        alpha_tensor, scale = None, float(alpha) * float(scale)
    r, b = residual.contiguous(), branch.contiguous()
    how = route(_scaled_add_fwd_kernel, r, b, alpha_tensor)
    if how == CUSTOM_OP:
        return _scaled_add_op(r, b, alpha_tensor, scale)
    if how == AUTOGRAD:
        return _ScaledAdd.apply(r, b, alpha_tensor, scale)
    return _forward(r, b, alpha_tensor, scale)
