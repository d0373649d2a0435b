"""Gated MLP activations, act(gate) * up, as plain PyTorch (rounding as transformers' gated MLPs: the
activation rounded to the dtype first). `silu` is SwiGLU (Llama and most families), `gelu_tanh`
GeGLU with the tanh approximation (Gemma's `gelu_pytorch_tanh`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")


def activation(gate: torch.Tensor, name: str = "silu") -> torch.Tensor:
    if name == "silu":
        return F.silu(gate)
    if name == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def swiglu(gate: torch.Tensor, up: torch.Tensor, activation_name: str = "silu") -> torch.Tensor:
    if activation_name == "silu":  # the common case, without another call (it runs on every decode step)
        return F.silu(gate) * up
    return activation(gate, activation_name) * up
