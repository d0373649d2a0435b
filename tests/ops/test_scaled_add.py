"""tli_kernels/ops/scaled_add.py: r + alpha * b with alpha in float32, forward and backward, against a
float64 computation; the learnable alpha's gradient; opcheck."""

import pytest
import torch
from torch.library import opcheck

from tests.ops.tolerance import DEVICE, assert_close
from tli_kernels.ops import scaled_add
from tli_kernels.ops.scaled_add import _scaled_add_fwd_kernel

ALPHA = 0.3  # far from a bf16/fp16 value: rounding it would show


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("learnable", [False, True])
def test_scaled_add_applies_the_float32_alpha_and_rounds_once(dtype, learnable, require_triton):
    torch.manual_seed(0)
    r = torch.randn(3, 1000, device=DEVICE).to(dtype).requires_grad_(True)  # 1000: a masked last block
    b = torch.randn(3, 1000, device=DEVICE).to(dtype).requires_grad_(True)
    require_triton(_scaled_add_fwd_kernel, r)
    alpha = torch.tensor([ALPHA], device=DEVICE, requires_grad=True) if learnable else ALPHA
    alpha32 = torch.tensor(ALPHA, dtype=torch.float32).double().item()
    out = scaled_add(r, b, alpha)
    g = torch.randn_like(out)
    out.backward(g)
    want = (r.double() + alpha32 * b.double()).to(dtype)
    if dtype != torch.float32:
        # float64 with the float32 alpha, rounded once: the kernel's float32 arithmetic has 13 bits to
        # spare over fp16, so it agrees but for the rare element near a rounding boundary. With alpha
        # rounded to fp16 (0.30005) 15% of these elements differ.
        assert (out != want).float().mean().item() < 0.01
    assert_close(out, want, dtype, "out")
    assert torch.equal(r.grad, g)
    assert_close(b.grad, (alpha32 * g.double()).to(dtype), dtype, "d branch")
    if learnable:
        assert_close(alpha.grad, (g.double() * b.double()).sum().reshape(1).float(), torch.float32, "d alpha")


MIXED = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("residual_dtype,branch_dtype", MIXED)
@pytest.mark.parametrize("learnable", [False, True])
def test_scaled_add_mixed_dtypes_as_under_autocast(residual_dtype, branch_dtype, learnable, require_triton):
    # bf16 autocast keeps the residual stream float32 while a projection returns bf16: the sum is the
    # promoted dtype (as stock's `residual + branch`), each gradient comes back in its input's dtype.
    torch.manual_seed(2)
    r = torch.randn(2, 900, device=DEVICE).to(residual_dtype).requires_grad_(True)
    b = torch.randn(2, 900, device=DEVICE).to(branch_dtype).requires_grad_(True)
    require_triton(_scaled_add_fwd_kernel, r)
    alpha = torch.tensor([ALPHA], device=DEVICE, requires_grad=True) if learnable else ALPHA
    out = scaled_add(r, b, alpha)
    assert out.dtype == torch.float32
    g = torch.randn_like(out)
    out.backward(g)
    alpha32 = torch.tensor(ALPHA, dtype=torch.float32).double().item()
    assert_close(out, (r.double() + alpha32 * b.double()).float(), torch.float32, "out")
    assert r.grad.dtype == residual_dtype and b.grad.dtype == branch_dtype
    assert torch.equal(r.grad, g.to(residual_dtype))
    assert_close(b.grad, (alpha32 * g.double()).to(branch_dtype), branch_dtype, "d branch")
    if learnable:
        want = (g.double() * b.double()).sum().reshape(1).float()
        assert_close(alpha.grad, want, torch.float32, "d alpha")


def test_scaled_add_errors():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="one shape"):
        scaled_add(x, torch.randn(2, 5), 0.5)
    with pytest.raises(ValueError, match="floating"):
        scaled_add(x, torch.ones(2, 4, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="one element"):
        scaled_add(x, x, torch.ones(2))


@pytest.mark.parametrize("learnable", [False, True])
def test_opcheck_scaled_add(learnable):
    r = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    b = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    alpha = torch.tensor([0.5], device=DEVICE, requires_grad=True) if learnable else None
    opcheck(torch.ops.tli.scaled_add.default, (r, b, alpha, 1.0 if learnable else 0.5))
    b16 = b.detach().bfloat16().requires_grad_(True)  # autocast's mix: float32 residual, bf16 branch
    opcheck(torch.ops.tli.scaled_add.default, (r, b16, alpha, 1.0 if learnable else 0.5))


@pytest.mark.parametrize("learnable", [False, True])
def test_scaled_add_with_a_constant_scale(learnable, require_triton):
    # Granite's residual multiplier m on top of alpha: r + alpha * m * b, d alpha = m * sum(g * b).
    torch.manual_seed(1)
    r, b = torch.randn(2, 700, device=DEVICE), torch.randn(2, 700, device=DEVICE).requires_grad_(True)
    require_triton(_scaled_add_fwd_kernel, r)
    alpha = torch.tensor([ALPHA], device=DEVICE, requires_grad=True) if learnable else ALPHA
    out = scaled_add(r, b, alpha, scale=0.25)
    g = torch.randn_like(out)
    out.backward(g)
    alpha32 = torch.tensor(ALPHA, dtype=torch.float32).double().item()
    assert_close(out, (r.double() + alpha32 * 0.25 * b.double()).float(), torch.float32, "out")
    assert_close(b.grad, (alpha32 * 0.25 * g.double()).float(), torch.float32, "d branch")
    if learnable:
        want = (0.25 * g.double() * b.double()).sum().reshape(1).float()
        assert_close(alpha.grad, want, torch.float32, "d alpha")
