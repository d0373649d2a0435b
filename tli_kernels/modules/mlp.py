"""TliMLP: the gated MLP down_proj(silu(gate_proj(x)) * up_proj(x)) with the SwiGLU kernel.

With `fuse_gate_up` the two projections write one packed [.., 2I] output (`gate_up_proj`) that the
packed SwiGLU reads in place; the weights stay `gate_proj.weight` / `up_proj.weight`. That path calls
the projections' weights directly, so forward hooks on gate_proj/up_proj do not fire there.
"""

from __future__ import annotations

from torch import Tensor, nn

from tli_kernels.ops import gate_up_proj, swiglu, swiglu_packed


class TliMLP(nn.Module):
    """Mixin put in front of a transformers Llama-family MLP class; keeps gate_proj/up_proj/down_proj."""

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    _tli_fuse_gate_up = False  # set per instance by `patch_decoder_layer(..., fuse_gate_up=True)`

    def forward(self, x: Tensor) -> Tensor:
        if self._tli_fuse_gate_up:
            gate, up = self.gate_proj, self.up_proj
            return self.down_proj(swiglu_packed(gate_up_proj(x, gate.weight, up.weight, gate.bias, up.bias)))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def is_swiglu_mlp(module: nn.Module) -> bool:
    """True for an MLP this module computes exactly: the three projections and a SiLU activation."""
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def can_fuse_gate_up(module: nn.Module) -> bool:
    """Plain nn.Linear projections only: a subclass (quantized, LoRA-wrapped...) computes something else."""
    return type(module.gate_proj) is nn.Linear and type(module.up_proj) is nn.Linear
