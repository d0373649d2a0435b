"""tli_kernels/ops/swiglu.py: silu(gate) * up, separate and packed [gate | up], forward and backward,
against `F.silu(gate) * up` (what transformers' LlamaMLP computes)."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from tests.ops.tolerance import DEVICE, assert_close
from tli_kernels.ops import swiglu, swiglu_packed
from tli_kernels.ops.swiglu import _swiglu_bwd_kernel

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 64), (5, 1500)])  # 1500: two column blocks, the last masked
def test_swiglu_matches_torch(shape, dtype, require_triton):
    torch.manual_seed(0)
    gate = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_(True)
    up = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(True)
    require_triton(_swiglu_bwd_kernel, gate)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    gate_ref, up_ref = gate.detach().clone().requires_grad_(True), up.detach().clone().requires_grad_(True)

    y = swiglu(gate, up)
    y.backward(dy)
    y_ref = F.silu(gate_ref) * up_ref
    y_ref.backward(dy)

    assert_close(y, y_ref, dtype, "y")
    assert_close(gate.grad, gate_ref.grad, dtype, "d gate")
    assert_close(up.grad, up_ref.grad, dtype, "d up")


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_packed_matches_torch(dtype, require_triton):
    torch.manual_seed(1)
    gate_up = (torch.randn(3, 4, 96, device=DEVICE) * 2).to(dtype).requires_grad_(True)
    require_triton(_swiglu_bwd_kernel, gate_up)
    dy = torch.randn(3, 4, 48, device=DEVICE).to(dtype)
    ref = gate_up.detach().clone().requires_grad_(True)

    y = swiglu_packed(gate_up)
    y.backward(dy)
    gate, up = ref.chunk(2, dim=-1)
    y_ref = F.silu(gate) * up
    y_ref.backward(dy)

    assert_close(y, y_ref, dtype, "y")
    assert_close(gate_up.grad, ref.grad, dtype, "d gate_up")


def test_swiglu_takes_strided_halves_without_copy(require_triton):
    gate_up = torch.randn(6, 2 * 40, device=DEVICE)
    require_triton(_swiglu_bwd_kernel, gate_up)
    gate, up = gate_up[:, :40], gate_up[:, 40:]  # rows at stride 80
    assert_close(swiglu(gate, up), F.silu(gate) * up, torch.float32, "y")


def test_swiglu_errors():
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="must be even"):
        swiglu_packed(torch.randn(2, 5))


def test_opcheck_swiglu():
    gate = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    up = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    opcheck(torch.ops.tli.swiglu.default, (gate, up))
    opcheck(torch.ops.tli.swiglu_packed.default, (torch.randn(6, 20, device=DEVICE, requires_grad=True),))


# ------------------------------------------------------------------- GeGLU (Gemma's tanh GELU)
def _geglu_ref(gate, up):
    return F.gelu(gate, approximate="tanh") * up  # what GemmaMLP computes with gelu_pytorch_tanh


# sigmoid(v) of a large negative v: exp(-v) overflows to inf in numpy (the interpreter warns), 1/inf = 0.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_gelu_tanh_gate_matches_torch(dtype, packed, require_triton):
    torch.manual_seed(2)
    gate_up = (torch.randn(5, 2 * 1100, device=DEVICE) * 4).to(dtype).requires_grad_(True)  # two blocks, one masked
    require_triton(_swiglu_bwd_kernel, gate_up)
    ref = gate_up.detach().clone().requires_grad_(True)
    dy = torch.randn(5, 1100, device=DEVICE).to(dtype)

    if packed:
        y = swiglu_packed(gate_up, activation="gelu_tanh")
    else:
        y = swiglu(gate_up[:, :1100], gate_up[:, 1100:], activation="gelu_tanh")
    y.backward(dy)
    y_ref = _geglu_ref(*ref.chunk(2, dim=-1))
    y_ref.backward(dy)

    assert_close(y, y_ref, dtype, "y")
    assert_close(gate_up.grad, ref.grad, dtype, "d gate_up")


def test_gelu_tanh_reference_path_matches_torch():
    from tli_kernels.ops import ops_backend

    gate = (torch.randn(3, 40, device=DEVICE) * 4).requires_grad_(True)
    up = torch.randn(3, 40, device=DEVICE).requires_grad_(True)
    ref = [t.detach().clone().requires_grad_(True) for t in (gate, up)]
    with ops_backend("reference"):
        swiglu_packed(torch.cat([gate, up], -1), activation="gelu_tanh").sum().backward()
    _geglu_ref(*ref).sum().backward()
    assert_close(gate.grad, ref[0].grad, torch.float32, "d gate")
    assert_close(up.grad, ref[1].grad, torch.float32, "d up")


def test_opcheck_gelu_tanh_gate():
    gate = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    up = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    opcheck(torch.ops.tli.swiglu.default, (gate, up, "gelu_tanh"))
    opcheck(torch.ops.tli.swiglu_packed.default, (torch.randn(6, 20, device=DEVICE, requires_grad=True), "gelu_tanh"))
    with pytest.raises(ValueError, match="activation must be one of"):
        swiglu(gate, up, activation="relu")
