"""RMSNorm and the residual-scaled add fused with it, as plain PyTorch.

Two numerics, as transformers writes them:
  * Llama's (`cast_before_weight=True`, most families): x_hat = x / rms(x) in float32, rounded to x's
    dtype, then times the weight (output dtype: the promotion of the two);
  * Gemma's and OLMo2's (`cast_before_weight=False`): x_hat * (weight + offset) in float32, rounded once
    to x's dtype. Gemma stores its scale as w with the norm computing x_hat * (1 + w): offset 1.
"""

from __future__ import annotations

import torch

from tli_kernels.reference.scaled_add import scaled_add


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, cast_before_weight: bool = True
) -> torch.Tensor:
    """(weight + offset) * (x / rms(x)), statistics in float32 (see the module docstring for the rounding)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return apply_weight(xf * rstd, x.dtype, weight, offset, cast_before_weight)


def apply_weight(
    x_hat: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor, offset: float, cast_before_weight: bool
) -> torch.Tensor:
    """The normalised float32 rows x_hat times the norm's scale, rounded as the family's norm rounds."""
    if cast_before_weight:
        scale = weight if offset == 0.0 else weight + offset
        return scale * x_hat.to(dtype)
    return (x_hat * (weight.float() + offset)).to(dtype)


def add_rms_norm(
    residual: torch.Tensor,
    branch: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    alpha: float | torch.Tensor = 1.0,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r' = residual + alpha * branch (in float32, rounded to residual's dtype); returns (r', rms_norm(r'))."""
    new_residual = scaled_add(residual, branch, alpha)
    return new_residual, rms_norm(new_residual, weight, eps, offset, cast_before_weight)


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `rms_norm` written out (the ops' fallback cannot use autograd inside a custom op).
    Returns (dx in float32, dweight in float32)."""
    xf, dyf = x.float(), dy.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = xf * rstd
    w_dy = (weight.float() + offset) * dyf
    dx = (w_dy - x_hat * (x_hat * w_dy).mean(-1, keepdim=True)) * rstd
    x_hat_w = x_hat.to(x.dtype).float() if cast_before_weight else x_hat
    dw = (dyf * x_hat_w).reshape(-1, x.shape[-1]).sum(0)
    return dx, dw
