"""The residual add with a scale, r + alpha * b, as plain PyTorch: in float32, rounded once."""

from __future__ import annotations

import torch


def scaled_add(residual: torch.Tensor, branch: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """residual + alpha * branch computed in float32 and rounded once to the promoted dtype of the two (as
    `residual + branch`: under bf16 autocast a float32 residual plus a bf16 branch is float32). alpha is a
    float32 value whatever the activations' dtype: a Python float times a float32 tensor is rounded to
    float32 by PyTorch, a tensor alpha is taken as float32. (`torch.add(r, b, alpha=a)` on bf16 CPU
    tensors rounds a to bf16 instead.)"""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.float()
    elif alpha == 1.0:
        return residual + branch  # PyTorch adds in float32 and rounds once: the same result, one op
    return (residual.float() + alpha * branch.float()).to(torch.promote_types(residual.dtype, branch.dtype))
