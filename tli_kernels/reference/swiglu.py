"""SwiGLU, silu(gate) * up, as plain PyTorch (rounding as `LlamaMLP`: silu rounded to the dtype first)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
