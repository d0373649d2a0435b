"""RMSNorm and the residual-scaled add fused with it, as plain PyTorch (Hugging Face Llama numerics)."""

from __future__ import annotations

import torch

from tli_kernels.reference.scaled_add import scaled_add


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)), statistics in float32, the normalised value rounded to x's dtype before
    the weight multiplies it (as `LlamaRMSNorm` does)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype)


def add_rms_norm(
    residual: torch.Tensor,
    branch: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    alpha: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r' = residual + alpha * branch (in float32, rounded to residual's dtype); returns (r', rms_norm(r'))."""
    new_residual = scaled_add(residual, branch, alpha)
    return new_residual, rms_norm(new_residual, weight, eps)


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `rms_norm` written out (the ops' fallback cannot use autograd inside a custom op).
    Returns (dx in float32, dweight in float32)."""
    xf, dyf = x.float(), dy.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = xf * rstd
    w_dy = weight.float() * dyf
    dx = (w_dy - x_hat * (x_hat * w_dy).mean(-1, keepdim=True)) * rstd
    dw = (dyf * x_hat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
    return dx, dw
