"""tli_kernels/ops/rms_norm.py: RMSNorm and the residual-scaled add fused with it, forward and backward,
against the PyTorch reference and against transformers' own LlamaRMSNorm."""

import pytest
import torch
from torch.library import opcheck
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests.ops.tolerance import DEVICE, assert_close, rel_error
from tli_kernels import reference
from tli_kernels.ops import add_rms_norm, ops_backend, rms_norm
from tli_kernels.ops.rms_norm import _rms_norm_bwd_kernel, _rms_norm_fwd_kernel

DTYPES = [torch.float32, torch.float16]
SHAPES = [(2, 5, 64), (3, 37), (1, 1, 576)]  # power of two, odd width (masked lanes), one row
EPS = 1e-5


def _leaf(shape, dtype, scale=1.0, offset=0.0):
    return (torch.randn(shape, device=DEVICE) * scale + offset).to(dtype).requires_grad_(True)


def _clone(*tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype, require_triton):
    torch.manual_seed(0)
    x, w = _leaf(shape, dtype, 2.0), _leaf(shape[-1:], dtype, 0.5, 1.0)
    require_triton(_rms_norm_fwd_kernel, x)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    x_ref, w_ref = _clone(x, w)

    y = rms_norm(x, w, EPS)
    y.backward(dy)
    y_ref = reference.rms_norm(x_ref, w_ref, EPS)
    y_ref.backward(dy)

    assert_close(y, y_ref, dtype, "y")
    assert_close(x.grad, x_ref.grad, dtype, "dx")
    assert_close(w.grad, w_ref.grad, dtype, "dw")


def test_rms_norm_matches_transformers_llama_rms_norm(require_triton):
    torch.manual_seed(1)
    hf = LlamaRMSNorm(48, eps=EPS).to(DEVICE)
    with torch.no_grad():
        hf.weight.uniform_(0.5, 1.5)
    x = _leaf((4, 6, 48), torch.float32, 3.0)
    require_triton(_rms_norm_fwd_kernel, x)
    (x_ref,) = _clone(x)
    w = hf.weight.detach().clone().requires_grad_(True)

    y = rms_norm(x, w, EPS)
    y.square().sum().backward()
    y_ref = hf(x_ref)
    y_ref.square().sum().backward()

    assert_close(y, y_ref, torch.float32, "y")
    assert_close(x.grad, x_ref.grad, torch.float32, "dx")
    assert_close(w.grad, hf.weight.grad, torch.float32, "dw")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 0.5, "learnable"])
def test_add_rms_norm_matches_reference(dtype, alpha, require_triton):
    torch.manual_seed(2)
    shape = (2, 7, 40)
    r, b = _leaf(shape, dtype), _leaf(shape, dtype)
    w = _leaf(shape[-1:], dtype, 0.5, 1.0)
    require_triton(_rms_norm_bwd_kernel, r)
    a = torch.tensor([0.7], device=DEVICE, requires_grad=True) if alpha == "learnable" else alpha
    d_res, dy = torch.randn(shape, device=DEVICE).to(dtype), torch.randn(shape, device=DEVICE).to(dtype)
    r_ref, b_ref, w_ref = _clone(r, b, w)
    a_ref = a.detach().clone().requires_grad_(True) if alpha == "learnable" else alpha

    new_r, y = add_rms_norm(r, b, w, EPS, a)
    torch.autograd.backward([new_r, y], [d_res, dy])
    new_r_ref, y_ref = reference.add_rms_norm(r_ref, b_ref, w_ref, EPS, a_ref)
    torch.autograd.backward([new_r_ref, y_ref], [d_res, dy])

    assert_close(new_r, new_r_ref, dtype, "new residual")
    assert_close(y, y_ref, dtype, "y")
    assert_close(r.grad, r_ref.grad, dtype, "d residual")
    assert_close(b.grad, b_ref.grad, dtype, "d branch")
    assert_close(w.grad, w_ref.grad, dtype, "dw")
    if alpha == "learnable":
        # The reference's autograd rounds dr' to the dtype before reducing; the kernel reduces in fp32.
        assert_close(a.grad, a_ref.grad, torch.float32 if dtype == torch.float32 else dtype, "d alpha")


def test_add_rms_norm_is_the_unfused_add_then_norm(require_triton):
    torch.manual_seed(3)
    r, b = _leaf((3, 5, 32), torch.float32), _leaf((3, 5, 32), torch.float32)
    require_triton(_rms_norm_fwd_kernel, r)
    hf = LlamaRMSNorm(32, eps=EPS).to(DEVICE)
    new_r, y = add_rms_norm(r, b, hf.weight, EPS, 0.25)
    assert_close(new_r, r + 0.25 * b, torch.float32, "new residual")
    assert_close(y, hf(r + 0.25 * b), torch.float32, "y")


def test_frozen_weight_gets_no_gradient(require_triton):
    x = _leaf((4, 16), torch.float32)
    require_triton(_rms_norm_bwd_kernel, x)
    w = torch.ones(16, device=DEVICE)
    rms_norm(x, w).sum().backward()
    assert w.grad is None and x.grad is not None


def test_reference_backend_gives_the_same_numbers():
    torch.manual_seed(4)
    r, b = _leaf((2, 3, 24), torch.float32), _leaf((2, 3, 24), torch.float32)
    w = _leaf((24,), torch.float32, 0.5, 1.0)
    a = torch.tensor([0.3], device=DEVICE, requires_grad=True)
    outs = []
    for backend in ("auto", "reference"):
        for t in (r, b, w, a):
            t.grad = None
        with ops_backend(backend):
            new_r, y = add_rms_norm(r, b, w, EPS, a)
            (new_r.sum() + y.square().sum()).backward()
        outs.append([new_r, y, r.grad, b.grad, w.grad, a.grad])
    for got, want, what in zip(outs[0], outs[1], ["r'", "y", "dr", "db", "dw", "da"], strict=True):
        assert_close(got, want, torch.float32, what)


def test_opcheck_rms_norm():
    x = _leaf((4, 24), torch.float32)
    w = _leaf((24,), torch.float32)
    opcheck(torch.ops.tli.rms_norm.default, (x, w, EPS))


@pytest.mark.parametrize("learnable", [False, True])
def test_opcheck_add_rms_norm(learnable):
    r, b, w = _leaf((4, 24), torch.float32), _leaf((4, 24), torch.float32), _leaf((24,), torch.float32)
    if learnable:
        args = (r, b, w, torch.tensor([0.5], device=DEVICE, requires_grad=True), 1.0, EPS)
    else:
        args = (r, b, w, None, 0.5, EPS)
    opcheck(torch.ops.tli.add_rms_norm.default, args)


def test_errors_name_the_shapes():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight of shape \(7,\)"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="differ in shape"):
        add_rms_norm(x, torch.randn(2, 9), torch.ones(8))
    with pytest.raises(ValueError, match="one element"):
        add_rms_norm(x, x, torch.ones(8), alpha=torch.ones(2))


@pytest.mark.parametrize("residual", [False, True])
def test_rows_walked_in_chunks_match_the_reference(monkeypatch, residual, require_triton):
    # Rows wider than ONE_PASS_MAX are read twice in column chunks (and the backward accumulates dw in
    # its program's partial row). Small limits put a 72-column row on that path: 4.5 chunks of 16, 10
    # rows over 4 programs.
    import importlib

    rms = importlib.import_module("tli_kernels.ops.rms_norm")
    monkeypatch.setattr(rms, "ONE_PASS_MAX", 32)
    monkeypatch.setattr(rms, "ONE_PASS_MAX_BACKWARD", 32)
    monkeypatch.setattr(rms, "CHUNK", 16)
    assert not rms.launch_config(72)["ONE_PASS"] and not rms.launch_config(72, backward=True)["ONE_PASS"]
    _check_wide_rows(10, 72, residual, require_triton)


def test_llama_405b_hidden_size(require_triton):
    # 16400 columns: four full chunks of the real CHUNK and a masked fifth; three rows keep it fast.
    _check_wide_rows(3, 16400, True, require_triton)


def _check_wide_rows(rows, n, residual, require_triton):
    torch.manual_seed(5)
    r, b = _leaf((rows, n), torch.float32), _leaf((rows, n), torch.float32)
    w = _leaf((n,), torch.float32, 0.5, 1.0)
    a = torch.tensor([0.7], device=DEVICE, requires_grad=True)
    require_triton(_rms_norm_bwd_kernel, r)
    r_ref, b_ref, w_ref = _clone(r, b, w)
    a_ref = a.detach().clone().requires_grad_(True)
    d_res, dy = torch.randn(rows, n, device=DEVICE), torch.randn(rows, n, device=DEVICE)
    if residual:
        outs, grads = add_rms_norm(r, b, w, EPS, a), [d_res, dy]
        want = reference.add_rms_norm(r_ref, b_ref, w_ref, EPS, a_ref)
        pairs = [(r, r_ref), (b, b_ref), (w, w_ref), (a, a_ref)]
    else:
        outs, grads = (rms_norm(r, w, EPS),), [dy]
        want = (reference.rms_norm(r_ref, w_ref, EPS),)
        pairs = [(r, r_ref), (w, w_ref)]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(want, grads)
    for got, exp in zip(outs, want, strict=True):
        assert_close(got, exp, torch.float32, "output")
    for (got, exp), name in zip(pairs, ["residual", "branch", "weight", "alpha"], strict=False):
        assert_close(got.grad, exp.grad, torch.float32, f"d {name}")


# ----------------------------------------------------------- Gemma's (1 + w) and float32 numerics
GEMMA, OLMO2 = (1.0, False), (0.0, False)  # (offset, cast_before_weight)


def _hf_norm(kind: str, width: int):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    torch.manual_seed(6)
    hf = (GemmaRMSNorm(width, eps=EPS) if kind == "gemma" else Olmo2RMSNorm(width, eps=EPS)).to(DEVICE)
    with torch.no_grad():
        hf.weight.uniform_(-0.5, 0.5) if kind == "gemma" else hf.weight.uniform_(0.5, 1.5)
    return hf, (GEMMA if kind == "gemma" else OLMO2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gemma", "olmo2"])
def test_rms_norm_matches_transformers_gemma_and_olmo2_norms(kind, dtype, require_triton):
    # Gemma's norm is x_hat * (1 + w) and OLMo2's x_hat * w, both in float32 and rounded once; the
    # weight stays the stored parameter (the kernel adds the offset as it loads it).
    hf, (offset, cast) = _hf_norm(kind, 48)
    hf = hf.to(dtype)
    x = _leaf((4, 6, 48), dtype, 3.0)
    require_triton(_rms_norm_fwd_kernel, x)
    (x_ref,) = _clone(x)
    w = hf.weight.detach().clone().requires_grad_(True)
    dy = torch.randn(4, 6, 48, device=DEVICE).to(dtype)

    y = rms_norm(x, w, EPS, offset=offset, cast_before_weight=cast)
    y.backward(dy)
    y_ref = hf(x_ref)
    y_ref.backward(dy)

    assert_close(y, y_ref, dtype, "y")
    assert_close(x.grad, x_ref.grad, dtype, "dx")
    assert_close(w.grad, hf.weight.grad, dtype, "dw")


@pytest.mark.parametrize("kind", ["gemma", "olmo2"])
def test_add_rms_norm_with_offset_and_scale_is_the_unfused_add_then_norm(kind, require_triton):
    hf, (offset, cast) = _hf_norm(kind, 40)
    r, b = _leaf((3, 5, 40), torch.float32), _leaf((3, 5, 40), torch.float32)
    require_triton(_rms_norm_bwd_kernel, r)
    w = hf.weight.detach().clone().requires_grad_(True)
    a = torch.tensor([0.7], device=DEVICE, requires_grad=True)
    r_ref, b_ref = _clone(r, b)
    a_ref = a.detach().clone().requires_grad_(True)
    d_res, dy = torch.randn(3, 5, 40, device=DEVICE), torch.randn(3, 5, 40, device=DEVICE)

    new_r, y = add_rms_norm(r, b, w, EPS, a, scale=0.5, offset=offset, cast_before_weight=cast)
    torch.autograd.backward([new_r, y], [d_res, dy])
    new_r_ref = r_ref + (a_ref * 0.5) * b_ref  # Granite-style: alpha times a constant multiplier
    y_ref = hf(new_r_ref)
    torch.autograd.backward([new_r_ref, y_ref], [d_res, dy])

    for got, want, what in [(new_r, new_r_ref, "r'"), (y, y_ref, "y"), (r.grad, r_ref.grad, "dr"),
                            (b.grad, b_ref.grad, "db"), (w.grad, hf.weight.grad, "dw")]:  # fmt: skip
        assert_close(got, want, torch.float32, what)
    assert rel_error(a.grad, a_ref.grad) < 1e-4  # a sum over every element: its terms cancel


@pytest.mark.parametrize("residual", [False, True])
def test_chunked_rows_with_offset_match_the_reference(monkeypatch, residual, require_triton):
    import importlib

    rms = importlib.import_module("tli_kernels.ops.rms_norm")
    monkeypatch.setattr(rms, "ONE_PASS_MAX", 32)
    monkeypatch.setattr(rms, "ONE_PASS_MAX_BACKWARD", 32)
    monkeypatch.setattr(rms, "CHUNK", 16)
    torch.manual_seed(7)
    r, b, w = _leaf((10, 72), torch.float32), _leaf((10, 72), torch.float32), _leaf((72,), torch.float32, 0.3)
    require_triton(_rms_norm_bwd_kernel, r)
    r_ref, b_ref, w_ref = _clone(r, b, w)
    dy = torch.randn(10, 72, device=DEVICE)
    if residual:
        (_, y), (_, y_ref) = (
            add_rms_norm(r, b, w, EPS, 0.5, offset=1.0, cast_before_weight=False),
            reference.add_rms_norm(r_ref, b_ref, w_ref, EPS, 0.5, offset=1.0, cast_before_weight=False),
        )
    else:
        y = rms_norm(r, w, EPS, offset=1.0, cast_before_weight=False)
        y_ref = reference.rms_norm(r_ref, w_ref, EPS, 1.0, False)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(y, y_ref, torch.float32, "y")
    for got, want, what in [(r, r_ref, "dr"), (w, w_ref, "dw")] + ([(b, b_ref, "db")] if residual else []):
        assert_close(got.grad, want.grad, torch.float32, what)


def test_opcheck_rms_norm_numerics():
    x, w = _leaf((4, 24), torch.float32), _leaf((24,), torch.float32)
    opcheck(torch.ops.tli.rms_norm.default, (x, w, EPS, 1.0, False))
    r, b = _leaf((4, 24), torch.float32), _leaf((4, 24), torch.float32)
    alpha = torch.tensor([0.5], device=DEVICE, requires_grad=True)
    opcheck(torch.ops.tli.add_rms_norm.default, (r, b, w, alpha, 0.5, EPS, 1.0, False))
