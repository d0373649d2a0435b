"""tli_kernels/ops/gate_up_proj.py: the packed gate/up projection against two nn.Linear + cat, forward
and backward, with and without bias, and feeding the packed SwiGLU."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from tests.ops.tolerance import DEVICE, assert_close
from tli_kernels.ops import gate_up_proj, swiglu_packed

F32 = torch.float32


@pytest.mark.parametrize("bias", [False, True])
def test_gate_up_proj_matches_two_linears(bias):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    gate, up = torch.nn.Linear(24, 40, bias=bias).to(DEVICE), torch.nn.Linear(24, 40, bias=bias).to(DEVICE)
    x_ref = x.detach().clone().requires_grad_(True)
    gate_ref, up_ref = (torch.nn.Linear(24, 40, bias=bias).to(DEVICE) for _ in range(2))
    gate_ref.load_state_dict(gate.state_dict())
    up_ref.load_state_dict(up.state_dict())

    out = swiglu_packed(gate_up_proj(x, gate.weight, up.weight, gate.bias, up.bias))
    out.square().sum().backward()
    want = F.silu(gate_ref(x_ref)) * up_ref(x_ref)
    want.square().sum().backward()

    assert_close(out, want, F32, "y")
    assert_close(x.grad, x_ref.grad, F32, "dx")
    for name in ("weight", "bias") if bias else ("weight",):
        assert_close(getattr(gate, name).grad, getattr(gate_ref, name).grad, F32, f"gate {name}")
        assert_close(getattr(up, name).grad, getattr(up_ref, name).grad, F32, f"up {name}")


def test_gate_up_proj_layout_and_errors():
    x = torch.randn(3, 8)
    g, u = torch.randn(5, 8), torch.randn(5, 8)
    out = gate_up_proj(x, g, u)
    assert_close(out, torch.cat([x @ g.t(), x @ u.t()], dim=-1), F32, "packed [gate | up]")
    with pytest.raises(ValueError, match="inputs of width 8"):
        gate_up_proj(x, torch.randn(5, 7), u)
    with pytest.raises(ValueError, match="both biases"):
        gate_up_proj(x, g, u, torch.zeros(5), None)


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_gate_up_proj(bias):
    x = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    g = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    u = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    biases = (torch.randn(5, device=DEVICE, requires_grad=True), torch.randn(5, device=DEVICE, requires_grad=True))
    opcheck(torch.ops.tli.gate_up_proj.default, (x, g, u, *(biases if bias else (None, None))))
