"""Gated activations act(gate) * up: SwiGLU (silu) and GeGLU (tanh GELU, Gemma's), for gate/up as two
tensors or packed as one [..., 2I] projection output.

Design trade-off. Elementwise and memory-bound: forward reads gate and up and writes y (3 passes over
[T, I]; the unfused `F.silu(g) * u` writes silu(g) and reads it back, 5 passes). The backward
recomputes sigmoid(g) from the saved inputs rather than saving silu(g), one tensor of [T, I] less per
layer. Rows are addressed by stride, so gate and up can be the two halves of one fused gate/up GEMM
output ([gate | up] along the last dimension) without a copy; the packed op then writes both
gradients into one [T, 2I] buffer, which is what that GEMM's backward wants. Grid: rows x column
blocks, int64 row offsets. Rounding follows transformers' gated MLPs: act(g) is rounded to the dtype
before the product. The activation is a constexpr (one kernel each, no branch at run time); the tanh
GELU is written g * sigmoid(2u) with u = sqrt(2/pi) (g + 0.044715 g^3), which is 0.5 g (1 + tanh(u))
without the cancellation of 1 + tanh(u) for large negative g. Custom ops for torch.compile, an
autograd.Function or a direct call in eager (see `_triton.py`).
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
ACTIVATION_IDS = {"silu": 0, "gelu_tanh": 1}
GELU_TANH_2K = 1.5957691216057308  # 2 * sqrt(2 / pi)
GELU_TANH_C = 0.044715  # both written out as literals in the kernels (Triton reads no plain globals)


def launch_config(n_cols: int) -> dict:
    """BLOCK and warps for rows of n_cols (shared with benchmarks/kernel_resources.py)."""
    return {"BLOCK": min(MAX_BLOCK, block_size(n_cols)), "num_warps": NUM_WARPS}


# ----------------------------------------------------------------------------------------- forward
@jit
def _gate(g, ACTIVATION: tl.constexpr):
    """(sigmoid term s, act(g) = g * s) in float32."""
    if ACTIVATION == 0:
        s = tl.sigmoid(g)
    else:
        s = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))  # GELU_TANH_2K, GELU_TANH_C
    return s, g * s


@jit
def _swiglu_fwd_kernel(
    G,  # [M, I] rows at stride_g
    U,  # [M, I] rows at stride_u
    Y,  # [M, I] contiguous out
    stride_g,
    stride_u,
    n_cols,
    ACTIVATION: tl.constexpr,  # 0 silu, 1 tanh GELU
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    _, act = _gate(g, ACTIVATION)
    act = act.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (act * u).to(Y.dtype.element_ty), mask=mask)


def _forward_triton(g: Tensor, u: Tensor, activation: str) -> Tensor:
    rows, n_cols = g.shape
    y = torch.empty((rows, n_cols), dtype=g.dtype, device=g.device)
    if rows and n_cols:
        config = launch_config(n_cols)
        grid = (rows, cdiv(n_cols, config["BLOCK"]))
        with device_guard(g):
            _swiglu_fwd_kernel[grid](
                g, u, y, g.stride(0), u.stride(0), n_cols, ACTIVATION=ACTIVATION_IDS[activation], **config
            )
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
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s, act = _gate(g, ACTIVATION)
    act = act.to(DU.dtype.element_ty).to(tl.float32)
    if ACTIVATION == 0:
        d_act = s * (1.0 + g * (1.0 - s))  # d silu(g)/dg
    else:  # d/dg of g * sigmoid(v), v = 2k (g + c g^3)
        d_act = s + g * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 3.0 * 0.044715 * g * g)
    dg = dy * u * d_act
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (dy * act).to(DU.dtype.element_ty), mask=mask)


def _backward_triton(dy: Tensor, g: Tensor, u: Tensor, dg: Tensor, du: Tensor, activation: str) -> None:
    rows, n_cols = g.shape
    if rows and n_cols:
        config = launch_config(n_cols)
        grid = (rows, cdiv(n_cols, config["BLOCK"]))
        with device_guard(g):
            _swiglu_bwd_kernel[grid](
                dy, g, u, dg, du, g.stride(0), u.stride(0), dg.stride(0), du.stride(0), n_cols,
                ACTIVATION=ACTIVATION_IDS[activation], **config,
            )  # fmt: skip


# ------------------------------------------------------------- reference path (no Triton available)
def _backward_reference(dy: Tensor, g: Tensor, u: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    gf, dyf = g.float(), dy.float()
    act = reference.activation(gf, activation).to(g.dtype).float()
    if activation == "silu":
        sig = torch.sigmoid(gf)
        d_act = sig * (1.0 + gf * (1.0 - sig))
    else:
        s = torch.sigmoid(GELU_TANH_2K * (gf + GELU_TANH_C * gf**3))
        d_act = s + gf * s * (1.0 - s) * GELU_TANH_2K * (1.0 + 3.0 * GELU_TANH_C * gf**2)
    dg = dyf * u.float() * d_act
    return dg.to(g.dtype), (dyf * act).to(u.dtype)


# ------------------------------------------------------- implementations (Triton or the reference)
def _rows(x: Tensor) -> Tensor:
    """A [M, I] view whose rows may be strided but whose elements are contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    gate, up = _rows(gate), _rows(up)
    if use_triton(_swiglu_fwd_kernel, gate):
        return _forward_triton(gate, up, activation)
    return reference.swiglu(gate, up, activation)


def _backward(dy: Tensor, gate: Tensor, up: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    dy, gate, up = dy.contiguous(), _rows(gate), _rows(up)
    if use_triton(_swiglu_bwd_kernel, gate):
        dg = gate.new_empty(gate.shape)
        du = up.new_empty(up.shape)
        _backward_triton(dy, gate, up, dg, du, activation)
        return dg, du
    return _backward_reference(dy, gate, up, activation)


def _forward_packed(gate_up: Tensor, activation: str) -> Tensor:
    gate_up = gate_up.contiguous()
    half = gate_up.shape[1] // 2
    gate, up = gate_up[:, :half], gate_up[:, half:]
    if use_triton(_swiglu_fwd_kernel, gate_up):
        return _forward_triton(gate, up, activation)
    return reference.swiglu(gate, up, activation)


def _backward_packed(dy: Tensor, gate_up: Tensor, activation: str) -> Tensor:
    dy, gate_up = dy.contiguous(), gate_up.contiguous()
    half = gate_up.shape[1] // 2
    gate, up = gate_up[:, :half], gate_up[:, half:]
    if use_triton(_swiglu_bwd_kernel, gate_up):
        d_gate_up = torch.empty_like(gate_up)
        _backward_triton(dy, gate, up, d_gate_up[:, :half], d_gate_up[:, half:], activation)
        return d_gate_up
    return torch.cat(_backward_reference(dy, gate, up, activation), dim=1)


# --------------------------------------------------------- custom ops (what torch.compile sees)
@torch.library.custom_op("tli::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor, activation: str = "silu") -> Tensor:
    return _forward(gate, up, activation)


@_swiglu_op.register_fake
def _(gate, up, activation="silu"):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("tli::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: Tensor, gate: Tensor, up: Tensor, activation: str = "silu") -> tuple[Tensor, Tensor]:
    return _backward(dy, gate, up, activation)


@_swiglu_backward_op.register_fake
def _(dy, gate, up, activation="silu"):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    d_gate, d_up = _swiglu_backward_op(dy, gate, up, ctx.activation)
    return d_gate, d_up, None


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("tli::swiglu_packed", mutates_args=())
def _swiglu_packed_op(gate_up: Tensor, activation: str = "silu") -> Tensor:
    return _forward_packed(gate_up, activation)


@_swiglu_packed_op.register_fake
def _(gate_up, activation="silu"):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("tli::swiglu_packed_backward", mutates_args=())
def _swiglu_packed_backward_op(dy: Tensor, gate_up: Tensor, activation: str = "silu") -> Tensor:
    return _backward_packed(dy, gate_up, activation)


@_swiglu_packed_backward_op.register_fake
def _(dy, gate_up, activation="silu"):
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


def _swiglu_packed_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.activation = inputs[1]


def _swiglu_packed_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return _swiglu_packed_backward_op(dy, gate_up, ctx.activation), None


_swiglu_packed_op.register_autograd(_swiglu_packed_backward, setup_context=_swiglu_packed_setup)


# --------------------------------------------------------------- eager autograd (no dispatcher)
class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return _forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dy):
        return (*_backward(dy, *ctx.saved_tensors, ctx.activation), None)


class _SwiGLUPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, activation):
        ctx.save_for_backward(gate_up)
        ctx.activation = activation
        return _forward_packed(gate_up, activation)

    @staticmethod
    def backward(ctx, dy):
        return _backward_packed(dy, *ctx.saved_tensors, ctx.activation), None


# ------------------------------------------------------------------------------------ public API
def _check_activation(activation: str) -> None:
    if activation not in ACTIVATION_IDS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_IDS)}, got {activation!r}")


def swiglu(gate: Tensor, up: Tensor, *, activation: str = "silu") -> Tensor:
    """act(gate) * up for two tensors of the same shape [..., I]; act is silu (SwiGLU, the default) or
    "gelu_tanh" (GeGLU with the tanh GELU, `gelu_pytorch_tanh`). Differentiable."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match"
        )
    if activation != "silu":
        _check_activation(activation)
    how = route(_swiglu_fwd_kernel, gate, up)
    if how == REFERENCE:
        return reference.swiglu(gate, up, activation)  # any shape: no reshaping needed
    n = gate.shape[-1]
    g, u = gate.reshape(-1, n), up.reshape(-1, n)
    if how == CUSTOM_OP:
        y = _swiglu_op(g, u, activation)
    elif how == AUTOGRAD:
        y = _SwiGLU.apply(g, u, activation)
    else:
        y = _forward(g, u, activation)
    return y.view(gate.shape)


def swiglu_packed(gate_up: Tensor, *, activation: str = "silu") -> Tensor:
    """act(gate) * up where gate_up = [gate | up] along the last dimension ([..., 2I] -> [..., I]),
    the output of one fused gate/up projection (Phi-3's gate_up_proj). `activation` as in `swiglu`.
    Differentiable; its gradient is one [..., 2I] tensor."""
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"swiglu_packed: last dimension must be even ([gate | up]), got {width}")
    if activation != "silu":
        _check_activation(activation)
    rows = gate_up.reshape(-1, width)
    how = route(_swiglu_fwd_kernel, rows)
    if how == CUSTOM_OP:
        out = _swiglu_packed_op(rows, activation)
    elif how == AUTOGRAD:
        out = _SwiGLUPacked.apply(rows, activation)
    else:
        out = _forward_packed(rows, activation)
    return out.view(*gate_up.shape[:-1], width // 2)
