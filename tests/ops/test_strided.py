"""Every op on strided inputs and strided incoming gradients (slices and transposes of larger tensors),
forward and backward through autograd, against the plain PyTorch reference; in eager mode and through
the custom ops torch.compile uses. The kernels read rows at a fixed stride, so each op must read (and
save for its backward) the contiguous copy it computed with."""

import pytest
import torch
import torch.nn.functional as F

from tests.ops.tolerance import DEVICE, assert_close
from tli_kernels import reference
from tli_kernels.ops import (
    add_rms_norm,
    apply_rope,
    attention,
    custom_op_dispatch,
    gate_up_proj,
    rms_norm,
    scaled_add,
    swiglu,
    swiglu_packed,
)

F32 = torch.float32


def _bases(*shapes, seed=0):
    """Leaf tensors the strided inputs are cut from, and an independent copy of each for the reference."""
    torch.manual_seed(seed)
    leaves = [torch.randn(shape, device=DEVICE).requires_grad_(True) for shape in shapes]
    return leaves, [t.detach().clone().requires_grad_(True) for t in leaves]


def _rope_tables(seq, dim):
    torch.manual_seed(7)
    angles = torch.randn(1, seq, dim // 2, device=DEVICE)
    angles = torch.cat([angles, angles], dim=-1)
    wide = torch.zeros(1, seq, 2 * dim, device=DEVICE)
    wide[..., ::2] = angles.cos()
    cos = wide[..., ::2]  # last dim at stride 2
    sin = angles.sin()
    return cos, sin


def _case(name):
    """(leaves, reference leaves, tli fn, reference fn): fn(*leaves) returns outputs built from strided views."""
    if name == "rms_norm":
        (x, w), refs = _bases((8, 128), (128,))

        def run(op, x, w):
            return (op(x[:, :64], (w[::2] * 0.5 + 1.0), 1e-5),)

        return [x, w], refs, lambda *a: run(rms_norm, *a), lambda *a: run(reference.rms_norm, *a)
    if name == "add_rms_norm":
        (r, b, w, a), refs = _bases((6, 96), (96, 6), (80,), (1,))

        def run(op, r, b, w, a):
            return op(r[:, :40], b.t()[:, ::2][:, :40], w[:40] + 1.0, 1e-5, a * 0.3 + 0.7)

        return [r, b, w, a], refs, lambda *t: run(add_rms_norm, *t), lambda *t: run(reference.add_rms_norm, *t)
    if name == "scaled_add":
        (r, b, a), refs = _bases((6, 96), (96, 6), (1,))

        def run(op, r, b, a):
            return (op(r[:, ::2], b.t()[:, :48], a * 0.3 + 0.7),)

        return [r, b, a], refs, lambda *t: run(scaled_add, *t), lambda *t: run(reference.scaled_add, *t)
    if name == "rope":
        (q, k), refs = _bases((2, 5, 4, 32), (2, 5, 2, 32))
        cos, sin = _rope_tables(5, 16)

        def run(op, q, k):
            return op(q[..., :16], k[..., 16:], cos, sin)

        return [q, k], refs, lambda *t: run(apply_rope, *t), lambda *t: run(reference.apply_rope, *t)
    if name == "swiglu":
        (g, u), refs = _bases((7, 90), (90, 7))

        def run(op, g, u):
            return (op(g[:, ::2], u.t()[:, 1::2]),)

        return [g, u], refs, lambda *t: run(swiglu, *t), lambda *t: run(reference.swiglu, *t)
    if name == "swiglu_packed":
        (gu,), refs = _bases((7, 100))

        def run_tli(gu):
            return (swiglu_packed(gu[:, :80]),)

        def run_ref(gu):
            g, u = gu[:, :80].chunk(2, dim=-1)
            return (F.silu(g) * u,)

        return [gu], refs, run_tli, run_ref
    if name == "gate_up_proj":
        (x, wg, wu), refs = _bases((5, 48), (20, 48), (48, 20))

        def run(x, wg, wu, fused):
            x, wg, wu = x[:, ::2], wg[:, :24], wu.t()[:, 1::2]
            if fused:
                return (gate_up_proj(x, wg, wu),)
            return (torch.cat([x @ wg.t(), x @ wu.t()], dim=-1),)

        return [x, wg, wu], refs, lambda *t: run(*t, True), lambda *t: run(*t, False)
    if name == "attention":
        (q, k, v), refs = _bases((2, 5, 4, 16), (2, 2, 8, 32), (2, 8, 2, 16))

        def run(op, q, k, v):  # [B, H, S, D] views: transposed and sliced
            return (op(q.transpose(1, 2), k[:, :, 2:, ::2], v.transpose(1, 2)[:, :, 2:], causal=True, scale=0.3),)

        return [q, k, v], refs, lambda *t: run(attention, *t), lambda *t: run(reference.attention, *t)
    raise KeyError(name)


OPS = ["rms_norm", "add_rms_norm", "scaled_add", "rope", "swiglu", "swiglu_packed", "gate_up_proj", "attention"]


@pytest.mark.parametrize("dispatch", ["eager", "custom_op"])
@pytest.mark.parametrize("name", OPS)
def test_strided_inputs_and_gradients_match_the_reference(name, dispatch):
    leaves, refs, tli_fn, ref_fn = _case(name)
    context = custom_op_dispatch if dispatch == "custom_op" else torch.enable_grad
    with context():
        outs = tli_fn(*leaves)
    want = ref_fn(*refs)
    # Incoming gradients that are themselves strided: every other column of a wider tensor.
    grads = [torch.randn(*o.shape[:-1], 2 * o.shape[-1], device=DEVICE)[..., ::2] for o in want]
    with context():
        torch.autograd.backward(outs, grads)
    torch.autograd.backward(want, grads)
    for i, (got, exp) in enumerate(zip(outs, want, strict=True)):
        assert_close(got, exp, F32, f"{name} output {i}")
    for i, (leaf, ref) in enumerate(zip(leaves, refs, strict=True)):
        assert leaf.grad is not None, f"{name}: input {i} got no gradient"
        assert_close(leaf.grad, ref.grad, F32, f"{name} grad of input {i}")
