"""The fused gate/up projection: x -> [x W_g^T | x W_u^T] in one [.., 2I] tensor, for `swiglu_packed`.

Design trade-off. No Triton here: the work is GEMMs and cuBLAS does them. What fusing buys is in the
buffers around them. Forward: both GEMMs write straight into the two halves of one output (no
concatenation), which `swiglu_packed` reads in place. Backward: the packed gradient [T, 2I] from
`swiglu_packed` gives the weight gradient as one [2I, T] x [T, H] GEMM (returned to gate_proj and
up_proj as the two halves), and dx = dg W_g + du W_u as one GEMM plus one accumulating GEMM (addmm), so
the separate `dx_gate + dx_up` add of the unfused graph disappears. The weights stay two parameters
(gate_proj.weight, up_proj.weight), so state dicts, FSDP sharding and optimizers see the stock layout.
A custom op for torch.compile, an autograd.Function in eager (see `_triton.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tli_kernels.ops._triton import needs_grad, use_custom_op  # no Triton kernel: only the dispatch


def _project(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Tensor | None, up_bias: Tensor | None):
    inter = gate_weight.shape[0]
    out = x.new_empty((x.shape[0], inter + up_weight.shape[0]))
    for weight, bias, half in ((gate_weight, gate_bias, out[:, :inter]), (up_weight, up_bias, out[:, inter:])):
        if bias is None:
            torch.mm(x, weight.t(), out=half)
        else:
            torch.addmm(bias, x, weight.t(), out=half)
    return out


@torch.library.custom_op("tli::gate_up_proj", mutates_args=())
def _gate_up_proj_op(
    x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Tensor | None, up_bias: Tensor | None
) -> Tensor:
    return _project(x, gate_weight, up_weight, gate_bias, up_bias)


@_gate_up_proj_op.register_fake
def _(x, gate_weight, up_weight, gate_bias, up_bias):
    return x.new_empty((x.shape[0], gate_weight.shape[0] + up_weight.shape[0]))


def _project_backward(
    d_gate_up: Tensor, x: Tensor, gate_weight: Tensor, up_weight: Tensor, need_dx: bool, need_dw: bool, need_db: bool
) -> tuple[Tensor, Tensor, Tensor]:
    inter = gate_weight.shape[0]
    d_gate_up = d_gate_up.contiguous()
    if need_dx:
        dx = torch.mm(d_gate_up[:, :inter], gate_weight)
        dx.addmm_(d_gate_up[:, inter:], up_weight)
    else:
        dx = x.new_empty(0)
    dw = torch.mm(d_gate_up.t(), x) if need_dw else x.new_empty(0)  # [2I, H]: both weights, one GEMM
    db = d_gate_up.sum(0) if need_db else x.new_empty(0)
    return dx, dw, db


@torch.library.custom_op("tli::gate_up_proj_backward", mutates_args=())
def _gate_up_proj_backward_op(
    d_gate_up: Tensor, x: Tensor, gate_weight: Tensor, up_weight: Tensor, need_dx: bool, need_dw: bool, need_db: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _project_backward(d_gate_up, x, gate_weight, up_weight, need_dx, need_dw, need_db)


@_gate_up_proj_backward_op.register_fake
def _(d_gate_up, x, gate_weight, up_weight, need_dx, need_dw, need_db):
    width = gate_weight.shape[0] + up_weight.shape[0]
    return (
        torch.empty_like(x) if need_dx else x.new_empty(0),
        x.new_empty((width, x.shape[1])) if need_dw else x.new_empty(0),
        x.new_empty(width) if need_db else x.new_empty(0),
    )


def _setup(ctx, inputs, output):
    x, gate_weight, up_weight, gate_bias, up_bias = inputs
    ctx.save_for_backward(x, gate_weight, up_weight)
    ctx.has_bias = gate_bias is not None


def _backward(ctx, d_gate_up, backward_fn=_gate_up_proj_backward_op):
    x, gate_weight, up_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dw = need[1] or need[2]
    need_db = ctx.has_bias and (need[3] or need[4])
    dx, dw, db = backward_fn(d_gate_up, x, gate_weight, up_weight, need[0], need_dw, need_db)
    inter = gate_weight.shape[0]
    return (
        dx if need[0] else None,
        dw[:inter] if need[1] else None,
        dw[inter:] if need[2] else None,
        db[:inter] if need_db and need[3] else None,
        db[inter:] if need_db and need[4] else None,
    )


_gate_up_proj_op.register_autograd(_backward, setup_context=_setup)


class _GateUpProj(torch.autograd.Function):
    """The eager path: the same setup and backward, without the dispatcher round trips."""

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, gate_bias, up_bias):
        out = _project(x, gate_weight, up_weight, gate_bias, up_bias)
        _setup(ctx, (x, gate_weight, up_weight, gate_bias, up_bias), out)
        return out

    @staticmethod
    def backward(ctx, d_gate_up):
        return _backward(ctx, d_gate_up, backward_fn=_project_backward)


def gate_up_proj(
    x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Tensor | None = None, up_bias: Tensor | None = None
) -> Tensor:
    """[x @ gate_weight^T + gate_bias | x @ up_weight^T + up_bias] as one [..., I_gate + I_up] tensor.
    Differentiable (see the module docstring for what the fused backward saves). Under autocast the
    inputs are cast to the autocast dtype first, as nn.Linear would."""
    if gate_weight.shape[1] != x.shape[-1] or up_weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"gate_up_proj: weights {tuple(gate_weight.shape)} and {tuple(up_weight.shape)} do not take "
            f"inputs of width {x.shape[-1]}"
        )
    if (gate_bias is None) != (up_bias is None):
        raise ValueError("gate_up_proj: give both biases or neither")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, gate_weight, up_weight = x.to(dtype), gate_weight.to(dtype), up_weight.to(dtype)
        if gate_bias is not None:
            gate_bias, up_bias = gate_bias.to(dtype), up_bias.to(dtype)
    args = (x.reshape(-1, x.shape[-1]), gate_weight, up_weight, gate_bias, up_bias)
    if use_custom_op():
        out = _gate_up_proj_op(*args)
    elif needs_grad(*args):
        out = _GateUpProj.apply(*args)
    else:
        out = _project(*args)
    return out.view(*x.shape[:-1], out.shape[-1])
