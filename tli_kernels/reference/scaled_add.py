"""The residual add with a scale, r + alpha * b, as plain PyTorch: in float32, rounded once."""

from __future__ import annotations

import torch


def scaled_add(residual: torch.Tensor, branch: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """residual + alpha * branch computed in float32 and rounded once to residual's dtype. alpha is a
    float32 value whatever the activations' dtype: a Python float times a float32 tensor is rounded to
    float32 by PyTorch, a tensor alpha is taken as float32. (`torch.add(r, b, alpha=a)` on bf16 CPU
    tensors rounds a to bf16 instead.)"""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.float()
    elif alpha == 1.0:
        return residual + branch  # PyTorch adds in float32 and rounds once: the same result, one op
    return (residual.float() + alpha * branch.float()).to(residual.dtype)
