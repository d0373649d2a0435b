"""TliRMSNorm: a Llama-style RMSNorm (attributes `weight`, `variance_epsilon`) running the tli kernel."""

from __future__ import annotations

from torch import Tensor, nn

from tli_kernels.ops import rms_norm


class TliRMSNorm(nn.Module):
    """Mixin put in front of a transformers RMSNorm class (see `_swap`); keeps its parameters."""

    weight: nn.Parameter
    variance_epsilon: float

    def forward(self, hidden_states: Tensor) -> Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def check_rms_norm(module: nn.Module, where: str) -> None:
    if not isinstance(getattr(module, "weight", None), nn.Parameter) or not hasattr(module, "variance_epsilon"):
        raise ValueError(
            f"{where}: expected a Llama-style RMSNorm with `weight` and `variance_epsilon`, got {type(module).__name__}"
        )
