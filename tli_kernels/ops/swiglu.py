"""SwiGLU, silu(gate) * up, for gate/up as two tensors or packed as one [..., 2I] projection output.

Design trade-off. Elementwise and memory-bound: forward reads gate and up and writes y (3 passes over
[T, I]; the unfused `F.silu(g) * u` writes silu(g) and reads it back, 5 passes). The backward
recomputes sigmoid(g) from the saved inputs rather than saving silu(g), one tensor of [T, I] less per
layer. Rows are addressed by stride, so gate and up can be the two halves of one fused gate/up GEMM
output ([gate | up] along the last dimension) without a copy; the packed op then writes both
gradients into one [T, 2I] buffer, which is what that GEMM's backward wants. Grid: rows x column
blocks, int64 row offsets. Rounding follows `LlamaMLP`: silu(g) is rounded to the dtype before the
product. Custom ops for torch.compile, an autograd.Function or a direct call in eager (see `_triton.py`).
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
    cdiv,
    device_guard,
    jit,
    route,
    tl,
    use_triton,
)

MAX_BLOCK = 1024
NUM_WARPS = 4


def launch_config(n_cols: int) -> dict:
    """BLOCK and warps for rows of n_cols (shared with benchmarks/kernel_resources.py)."""
    return {"BLOCK": min(MAX_BLOCK, block_size(n_cols)), "num_warps": NUM_WARPS}


# ----------------------------------------------------------------------------------------- forward
@jit
def _swiglu_fwd_kernel(
    G,  # [M, I] rows at stride_g
    U,  # [M, I] rows at stride_u
    Y,  # [M, I] contiguous out
    stride_g,
    stride_u,
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (silu * u).to(Y.dtype.element_ty), mask=mask)


def _forward_triton(g: Tensor, u: Tensor) -> Tensor:
    rows, n_cols = g.shape
    y = torch.empty((rows, n_cols), dtype=g.dtype, device=g.device)
    if rows and n_cols:
        config = launch_config(n_cols)
        grid = (rows, cdiv(n_cols, config["BLOCK"]))
        with device_guard(g):
            _swiglu_fwd_kernel[grid](g, u, y, g.stride(0), u.stride(0), n_cols, **config)
    return y


# ---------------------------------------------------------------------------------------- backward
@jit
def _swiglu_bwd_kernel(
    DY,  # [M, I] contiguous
    G,
    U,
    DG,  # [M, I] out, rows at stride_dg
    DU,  # [M, I] out, rows at stride_du
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = (g * sig).to(DU.dtype.element_ty).to(tl.float32)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))  # d silu(g)/dg = sig * (1 + g * (1 - sig))
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (dy * silu).to(DU.dtype.element_ty), mask=mask)


def _backward_triton(dy: Tensor, g: Tensor, u: Tensor, dg: Tensor, du: Tensor) -> None:
    rows, n_cols = g.shape
    if rows and n_cols:
        config = launch_config(n_cols)
        grid = (rows, cdiv(n_cols, config["BLOCK"]))
        with device_guard(g):
            _swiglu_bwd_kernel[grid](
                dy, g, u, dg, du, g.stride(0), u.stride(0), dg.stride(0), du.stride(0), n_cols, **config
            )


# ------------------------------------------------------------- reference path (no Triton available)
def _backward_reference(dy: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    gf, dyf = g.float(), dy.float()
    sig = torch.sigmoid(gf)
    silu = (gf * sig).to(g.dtype).float()
    dg = dyf * u.float() * sig * (1.0 + gf * (1.0 - sig))
    return dg.to(g.dtype), (dyf * silu).to(u.dtype)


# ------------------------------------------------------- implementations (Triton or the reference)
def _rows(x: Tensor) -> Tensor:
    """A [M, I] view whose rows may be strided but whose elements are contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(gate: Tensor, up: Tensor) -> Tensor:
    gate, up = _rows(gate), _rows(up)
    if use_triton(_swiglu_fwd_kernel, gate):
        return _forward_triton(gate, up)
    return reference.swiglu(gate, up)


def _backward(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dy, gate, up = dy.contiguous(), _rows(gate), _rows(up)
    if use_triton(_swiglu_bwd_kernel, gate):
        dg = gate.new_empty(gate.shape)
        du = up.new_empty(up.shape)
        _backward_triton(dy, gate, up, dg, du)
        return dg, du
    return _backward_reference(dy, gate, up)


def _forward_packed(gate_up: Tensor) -> Tensor:
    gate_up = gate_up.contiguous()
    half = gate_up.shape[1] // 2
    gate, up = gate_up[:, :half], gate_up[:, half:]
    if use_triton(_swiglu_fwd_kernel, gate_up):
        return _forward_triton(gate, up)
    return reference.swiglu(gate, up)


def _backward_packed(dy: Tensor, gate_up: Tensor) -> Tensor:
    dy, gate_up = dy.contiguous(), gate_up.contiguous()
    half = gate_up.shape[1] // 2
    gate, up = gate_up[:, :half], gate_up[:, half:]
    if use_triton(_swiglu_bwd_kernel, gate_up):
        d_gate_up = torch.empty_like(gate_up)
        _backward_triton(dy, gate, up, d_gate_up[:, :half], d_gate_up[:, half:])
        return d_gate_up
    return torch.cat(_backward_reference(dy, gate, up), dim=1)


# --------------------------------------------------------- custom ops (what torch.compile sees)
@torch.library.custom_op("tli::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return _forward(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("tli::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return _backward(dy, gate, up)


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(dy, gate, up)


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("tli::swiglu_packed", mutates_args=())
def _swiglu_packed_op(gate_up: Tensor) -> Tensor:
    return _forward_packed(gate_up)


@_swiglu_packed_op.register_fake
def _(gate_up):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("tli::swiglu_packed_backward", mutates_args=())
def _swiglu_packed_backward_op(dy: Tensor, gate_up: Tensor) -> Tensor:
    return _backward_packed(dy, gate_up)


@_swiglu_packed_backward_op.register_fake
def _(dy, gate_up):
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


def _swiglu_packed_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_packed_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return _swiglu_packed_backward_op(dy, gate_up)


_swiglu_packed_op.register_autograd(_swiglu_packed_backward, setup_context=_swiglu_packed_setup)


# --------------------------------------------------------------- eager autograd (no dispatcher)
class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        return _backward(dy, *ctx.saved_tensors)


class _SwiGLUPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _forward_packed(gate_up)

    @staticmethod
    def backward(ctx, dy):
        return _backward_packed(dy, *ctx.saved_tensors)


# ------------------------------------------------------------------------------------ public API
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for two tensors of the same shape [..., I]. Differentiable."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match"
        )
    how = route(_swiglu_fwd_kernel, gate, up)
    if how == REFERENCE:
        return reference.swiglu(gate, up)  # any shape: no reshaping needed
    n = gate.shape[-1]
    g, u = gate.reshape(-1, n), up.reshape(-1, n)
    if how == CUSTOM_OP:
        y = _swiglu_op(g, u)
    elif how == AUTOGRAD:
        y = _SwiGLU.apply(g, u)
    else:
        y = _forward(g, u)
    return y.view(gate.shape)


def swiglu_packed(gate_up: Tensor) -> Tensor:
    """silu(gate) * up where gate_up = [gate | up] along the last dimension ([..., 2I] -> [..., I]),
    the output of one fused gate/up projection. Differentiable; its gradient is one [..., 2I] tensor."""
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"swiglu_packed: last dimension must be even ([gate | up]), got {width}")
    rows = gate_up.reshape(-1, width)
    how = route(_swiglu_fwd_kernel, rows)
    if how == CUSTOM_OP:
        out = _swiglu_packed_op(rows)
    elif how == AUTOGRAD:
        out = _SwiGLUPacked.apply(rows)
    else:
        out = _forward_packed(rows)
    return out.view(*gate_up.shape[:-1], width // 2)
