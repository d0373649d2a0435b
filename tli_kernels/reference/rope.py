"""Rotary position embedding on q and k, Hugging Face rotate-half convention, as plain PyTorch."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, S, Hq, D], k: [B, S, Hk, D], cos/sin: [B or 1, S, D] as the model's rotary embedding
    returns them (any rope_type: the scaling is already in cos/sin). x*cos + rotate_half(x)*sin,
    computed in float32 and rounded once to x's dtype. Returns new tensors."""
    c = cos.float().unsqueeze(2)
    s = sin.float().unsqueeze(2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * c + rotate_half(xf) * s).to(x.dtype)

    return rotate(q), rotate(k)
