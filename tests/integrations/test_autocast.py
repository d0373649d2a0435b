"""Mixed precision as the trainer runs it on a GPU: bf16 autocast over float32 weights, so the residual
stream stays float32 while every projection returns bf16. The kernels with a learnable alpha must run
there (the residual-scaled adds take a float32 residual and a bf16 branch) and compute what the stock
model with forward hooks scaling the injected layer's branches computes under the same autocast: the
loss, alpha's gradient and the weights' gradients; then an AdamW step moves alpha and the weights. On a
CPU autocast runs the same code with CPU bf16 matmuls; on CUDA, the compiled kernels."""

from __future__ import annotations

import copy

import torch

from tests.integrations.models import DEVICE, batch, tiny_model
from tests.ops.tolerance import rel_error
from tli_kernels.integrations import apply_tli_kernels

LAYER = 1  # the "injected" layer: alpha on it, learnable
ALPHA = 0.3


def _autocast():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16)


def _hooked(stock, alpha: torch.Tensor):
    model = copy.deepcopy(stock)

    def scale(module, args, output):
        if isinstance(output, tuple):
            return (output[0] * alpha,) + tuple(output[1:])
        return output * alpha

    layer = model.model.layers[LAYER]
    layer.self_attn.register_forward_hook(scale)
    layer.mlp.register_forward_hook(scale)
    return model


def _step(model, ids, params):
    model.zero_grad(set_to_none=True)
    with _autocast():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32 or out.logits.dtype == torch.bfloat16
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.detach().clone() for n, p in params}


def test_bf16_autocast_training_step_with_kernels_and_a_learnable_alpha():
    stock = tiny_model("llama3")  # float32 weights
    ids, _ = batch(seed=3, length=16)
    alpha_ref = torch.nn.Parameter(torch.full((1,), ALPHA, device=DEVICE))
    hooked = _hooked(stock, alpha_ref)
    fast = copy.deepcopy(stock)
    apply_tli_kernels(fast, residual_scales={LAYER: ALPHA}, learnable_alpha=True)
    alpha_fast = fast.model.layers[LAYER].residual_scale
    assert isinstance(alpha_fast, torch.nn.Parameter) and alpha_fast.dtype == torch.float32

    want_loss, want = _step(hooked, ids, [*hooked.named_parameters(), ("alpha", alpha_ref)])
    fast_params = [(n, p) for n, p in fast.named_parameters() if not n.endswith("residual_scale")]
    loss, got = _step(fast, ids, [*fast_params, ("alpha", alpha_fast)])

    # Same bf16 matmuls on the same inputs; the adds and norms round in another order (float32), which
    # bf16 matmuls downstream can amplify to a few bf16 ulps.
    assert abs(loss.item() - want_loss.item()) < 2e-3 * abs(want_loss.item()), (loss.item(), want_loss.item())
    assert rel_error(got["alpha"], want["alpha"]) < 3e-2, (got["alpha"].item(), want["alpha"].item())
    for name, grad in want.items():
        assert got[name].dtype == grad.dtype == torch.float32, name
        assert rel_error(got[name], grad) < 3e-2, name

    # A whole step: AdamW over float32 master weights moves alpha and the weights, and the loss is finite.
    optimizer = torch.optim.AdamW([p for _, p in fast_params] + [alpha_fast], lr=1e-2)
    before = alpha_fast.detach().clone()
    optimizer.step()
    assert not torch.equal(alpha_fast.detach(), before)
    loss_after, _ = _step(fast, ids, [("alpha", alpha_fast)])
    assert torch.isfinite(loss_after) and loss_after < loss
