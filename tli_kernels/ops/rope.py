"""Rotary position embedding on q and k (Hugging Face rotate-half convention), in place when it can be.

Design trade-off. RoPE is memory-bound: read q and k, write them back. One program rotates one
token's heads of q or of k (grid: tokens x {q, k}), loading that token's cos/sin once for all its
heads, so cos/sin traffic is 1/heads of the q/k traffic. The kernel takes cos/sin exactly as the
model's rotary embedding returns them ([B or 1, S, D], attention scaling already applied), both halves
loaded, so every rope_type transformers computes (default, linear, dynamic, yarn, llama3, longrope...)
goes through unchanged. In place saves an allocation, not bandwidth; autograd cannot record a custom op
that mutates its inputs, so with grad enabled the functional op writes fresh tensors (the same bytes
moved) and its backward is the same kernel rotating by -theta. Grads are written to fresh tensors too:
the incoming gradient may be shared, so it is never overwritten. As for every op here, the custom ops
are what torch.compile sees; eager calls go through an autograd.Function, or straight to the kernel when
nothing needs a gradient (the decode step of `generate`), see `_triton.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tli_kernels import reference
from tli_kernels.ops._triton import AUTOGRAD, CUSTOM_OP, REFERENCE, block_size, device_guard, jit, route, tl, use_triton


# -------------------------------------------------------------------------------- forward/backward
@jit
def _rotate_token_heads(
    X,  # one token's [heads, 2 * HALF] block, row-major
    OUT,  # where the rotated block goes (may be X)
    cos1,
    cos2,
    sin1,
    sin2,
    heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    for h0 in range(0, heads, BLOCK_H):
        mask = (h0 + h < heads) & (d < HALF)
        offsets = (h0 + h) * (2 * HALF) + d
        x1 = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + offsets + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offsets, (x1 * cos1 - x2 * sin1).to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + offsets + HALF, (x2 * cos2 + x1 * sin2).to(OUT.dtype.element_ty), mask=mask)


@jit
def _rope_kernel(
    Q,  # [B, S, Hq, D], last two dims contiguous
    K,  # [B, S, Hk, D], last two dims contiguous
    COS,  # [B or 1, S, D], last dim contiguous (batch stride 0 when broadcast)
    SIN,  # same strides as COS
    Q_OUT,  # same strides as Q (Q itself when in place)
    K_OUT,  # same strides as K
    seq_len,
    q_heads,
    k_heads,
    stride_qb,
    stride_qs,
    stride_kb,
    stride_ks,
    stride_cb,
    stride_cs,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = d < HALF
    cs_base = b * stride_cb + s * stride_cs
    cos1 = tl.load(COS + cs_base + d, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + cs_base + HALF + d, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + cs_base + d, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + cs_base + HALF + d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # The transpose of [[c1, -s1], [s2, c2]] is [[c1, s2], [-s1, c2]]: swap and negate the sines.
        sin1, sin2 = -sin2, -sin1
    if tl.program_id(1) == 0:
        base = b * stride_qb + s * stride_qs
        _rotate_token_heads(Q + base, Q_OUT + base, cos1, cos2, sin1, sin2, q_heads, HALF, BLOCK_H, BLOCK_HALF)
    else:
        base = b * stride_kb + s * stride_ks
        _rotate_token_heads(K + base, K_OUT + base, cos1, cos2, sin1, sin2, k_heads, HALF, BLOCK_H, BLOCK_HALF)


def _kernel_layout_ok(x: Tensor) -> bool:
    # Each token's heads must form one contiguous [heads, D] block.
    return x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]


def launch_config(q_heads: int, k_heads: int, head_dim: int) -> dict:
    """The kernel's constexprs and warps (shared with benchmarks/kernel_resources.py)."""
    half = head_dim // 2
    block_half = block_size(half)
    block_h = min(block_size(max(q_heads, k_heads)), max(1, 4096 // block_half))
    return {"HALF": half, "BLOCK_H": block_h, "BLOCK_HALF": block_half, "num_warps": 4}


def _launch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_out: Tensor, k_out: Tensor, backward: bool):
    batch, seq_len, q_heads, head_dim = q.shape
    k_heads = k.shape[2]
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()
    if q.numel() == 0 and k.numel() == 0:
        return
    cos = cos.expand(batch, seq_len, head_dim)
    sin = sin.expand(batch, seq_len, head_dim)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    with device_guard(q):
        _rope_kernel[(batch * seq_len, 2)](
            q, k, cos, sin, q_out, k_out, seq_len, q_heads, k_heads,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), cos.stride(1),
            BACKWARD=backward, **launch_config(q_heads, k_heads, head_dim),
        )  # fmt: skip


# ------------------------------------------------------------- reference path (no Triton available)
def _unrotate_reference(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    # The backward is the rotation by -theta in the transposed form (see BACKWARD in the kernel).
    half = cos.shape[-1] // 2
    sin_t = -torch.cat((sin[..., half:], sin[..., :half]), dim=-1)
    return reference.apply_rope(dq, dk, cos, sin_t)


# ------------------------------------------------------- implementations (Triton or the reference)
def _rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
    """Rotated copies of q and k (by -theta when `backward`: the gradient of the rotation)."""
    q, k = q.contiguous(), k.contiguous()
    if use_triton(_rope_kernel, q):
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        _launch(q, k, cos, sin, q_out, k_out, backward)
        return q_out, k_out
    if backward:
        return _unrotate_reference(q, k, cos, sin)
    return reference.apply_rope(q, k, cos, sin)


def _rotate_in_place(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    if use_triton(_rope_kernel, q) and _kernel_layout_ok(q) and _kernel_layout_ok(k):
        _launch(q, k, cos, sin, q, k, backward=False)
        return
    q_out, k_out = reference.apply_rope(q, k, cos, sin)
    q.copy_(q_out)
    k.copy_(k_out)


# --------------------------------------------------------- custom ops (what torch.compile sees)
@torch.library.custom_op("tli::rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _rotate(q, k, cos, sin, backward=False)


@_rope_op.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


@torch.library.custom_op("tli::rope_backward", mutates_args=())
def _rope_backward_op(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _rotate(dq, dk, cos, sin, backward=True)


@_rope_backward_op.register_fake
def _(dq, dk, cos, sin):
    return torch.empty_like(dq, memory_format=torch.contiguous_format), torch.empty_like(
        dk, memory_format=torch.contiguous_format
    )


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_backward_op(dq, dk, cos, sin)
    return dq, dk, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


@torch.library.custom_op("tli::rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    _rotate_in_place(q, k, cos, sin)


@_rope_inplace_op.register_fake
def _(q, k, cos, sin):
    return None


# --------------------------------------------------------------- eager autograd (no dispatcher)
class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


# ------------------------------------------------------------------------------------ public API
def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, inplace: bool | None = None) -> tuple[Tensor, Tensor]:
    """Rotate q [B, S, Hq, D] and k [B, S, Hk, D] by the model's cos/sin ([B or 1, S, D] or [S, D]).

    inplace=None rotates in place when autograd does not need to record the op (inference,
    `generate`) and the kernel runs, else into new tensors; inplace=True always rotates q and k
    themselves (an error with grad required), inplace=False never does. cos/sin are treated as
    constants (the rotary embedding's buffers carry no gradient). Returns the rotated (q, k): use
    them, they are q and k only when rotated in place."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be [B, S, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    batch, seq_len, _, head_dim = q.shape
    if (
        k.shape[0] != batch
        or k.shape[1] != seq_len
        or k.shape[3] != head_dim
        or head_dim % 2
        or cos.shape != sin.shape
        or cos.dim() != 3
        or cos.shape[0] not in (1, batch)
        or cos.shape[1:] != (seq_len, head_dim)
    ):
        raise ValueError(
            f"apply_rope: shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
            f"sin {tuple(sin.shape)} (expected cos/sin [1 or {batch}, {seq_len}, {head_dim}], even head_dim)"
        )
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope: cos/sin must not require grad (the kernel treats them as constants)")
    how = route(_rope_kernel, q, k)
    grad_needed = how == AUTOGRAD or (
        how == CUSTOM_OP and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    )
    if inplace and grad_needed:
        raise ValueError("apply_rope: inplace=True cannot be recorded by autograd; pass inplace=None")
    if how == CUSTOM_OP:
        if inplace or (inplace is None and not grad_needed):
            _rope_inplace_op(q, k, cos, sin)
            return q, k
        return _rope_op(q, k, cos, sin)
    if inplace:
        _rotate_in_place(q, k, cos, sin)
        return q, k
    if how == AUTOGRAD:
        return _Rope.apply(q, k, cos, sin)
    if how == REFERENCE:
        return reference.apply_rope(q, k, cos, sin)  # new tensors; copying them into q, k would only cost
    if inplace is None and _kernel_layout_ok(q) and _kernel_layout_ok(k):
        _launch(q, k, cos, sin, q, k, backward=False)  # in place: nothing records it
        return q, k
    return _rotate(q, k, cos, sin, backward=False)
