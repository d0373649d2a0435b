"""TliMLP: the gated MLP down_proj(silu(gate_proj(x)) * up_proj(x)) with the SwiGLU kernel."""

from __future__ import annotations

from torch import Tensor, nn

from tli_kernels.ops import swiglu


class TliMLP(nn.Module):
    """Mixin put in front of a transformers Llama-family MLP class; keeps gate_proj/up_proj/down_proj."""

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def is_swiglu_mlp(module: nn.Module) -> bool:
    """True for an MLP this module computes exactly: the three projections and a SiLU activation."""
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
