"""TliRMSNorm: a transformers RMSNorm running the tli kernel, with the numerics of the class it replaces.

RMSNorms differ across families in two ways the kernel takes as arguments (`ops.rms_norm`): Gemma's
scale is (1 + w) (`offset` 1), and Gemma's and OLMo2's multiply the weight in float32 and round once
where Llama's rounds x / rms(x) to the input dtype first (`cast_before_weight`). Which one a class
computes is not read from its name: `norm_numerics` runs the class's own forward on a small probe
(float32 and bfloat16, a row small enough that eps matters) and keeps the variant whose output matches
bit for bit. A class matching none (a bias, another eps, a LayerNorm) stays stock.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tli_kernels import reference
from tli_kernels.ops import rms_norm

EPS_ATTRIBUTES = ("variance_epsilon", "eps")
# (offset, cast_before_weight): Llama's first, then Gemma's (1 + w) in float32, OLMo2's w in float32.
VARIANTS = ((0.0, True), (1.0, False), (0.0, False), (1.0, True))


@dataclass(frozen=True)
class NormNumerics:
    """What `ops.rms_norm` needs to compute a given RMSNorm module's output."""

    eps: float
    offset: float = 0.0
    cast_before_weight: bool = True

    def describe(self) -> str:
        scale = "(1 + w)" if self.offset == 1.0 else "w"
        rounding = "x_hat rounded before the weight" if self.cast_before_weight else "float32, rounded once"
        return f"{scale}, {rounding}"


class TliRMSNorm(nn.Module):
    """Mixin put in front of a transformers RMSNorm class (see `_swap`); keeps its parameters."""

    weight: nn.Parameter
    _tli_norm: NormNumerics  # set per instance by `patch_rms_norm`

    def forward(self, hidden_states: Tensor) -> Tensor:
        spec = self._tli_norm
        return rms_norm(
            hidden_states, self.weight, spec.eps, offset=spec.offset, cast_before_weight=spec.cast_before_weight
        )


def _eps_of(module: nn.Module) -> float | None:
    for name in EPS_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


_PROBED: dict[tuple, NormNumerics | None] = {}


def norm_numerics(module: nn.Module) -> tuple[NormNumerics | None, str]:
    """(numerics, "") when the tli kernel computes exactly what `module` computes, else (None, why)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None, f"{type(module).__name__} has no 1-D weight"
    extra = [n for n, _ in module.named_parameters() if n != "weight"] + [n for n, _ in module.named_buffers()]
    if extra or any(True for _ in module.children()):
        return None, f"{type(module).__name__} has parts besides its weight ({', '.join(extra) or 'submodules'})"
    eps = _eps_of(module)
    if eps is None:
        return None, f"{type(module).__name__} has no eps attribute ({' / '.join(EPS_ATTRIBUTES)})"
    cls = type(module)
    attributes = tuple(sorted((k, repr(v)) for k, v in module.__dict__.items() if not k.startswith("_")))
    key = (cls, attributes)
    if key not in _PROBED:
        _PROBED[key] = _probe(module, eps)
    found = _PROBED[key]
    if found is None:
        return None, f"{cls.__name__} computes none of the RMSNorm variants the kernel does"
    return found, ""


def _probe(module: nn.Module, eps: float) -> NormNumerics | None:
    """Run the module's class forward on CPU probes (a fresh instance with the module's plain attributes
    and a random weight: the module itself may live on a GPU or the meta device) and compare."""
    cls = type(module)
    width = 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, width, generator=g, device="cpu") * 3
    x[0] *= 1e-3  # a row whose mean square is near eps: a wrong eps shows
    w = torch.empty(width, device="cpu").uniform_(-0.5, 1.5, generator=g)
    try:
        probe = cls.__new__(cls)
        nn.Module.__init__(probe)
        probe.__dict__.update({k: v for k, v in module.__dict__.items() if not k.startswith("_")})
        cases = []
        for x_dtype, w_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                 (torch.bfloat16, torch.float32)):  # fmt: skip
            probe.weight = nn.Parameter(w.to(w_dtype), requires_grad=False)
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                cases.append((x.to(x_dtype), probe.weight, probe(x.to(x_dtype))))
    except Exception:  # noqa: BLE001 - a class whose forward cannot run on the probe is simply not matched
        return None
    for offset, cast in VARIANTS:
        if all(_same(reference.rms_norm(xx, ww, eps, offset, cast), out) for xx, ww, out in cases):
            return NormNumerics(eps, offset, cast)
    return None


def _same(a: Tensor, b) -> bool:
    return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def patch_rms_norm(module: nn.Module, numerics: NormNumerics) -> None:
    from tli_kernels.modules import _swap

    _swap.swap_in(module, TliRMSNorm)
    module._tli_norm = numerics


def unpatch_rms_norm(module: nn.Module) -> None:
    from tli_kernels.modules import _swap

    module.__dict__.pop("_tli_norm", None)
    _swap.swap_out(module)


def check_rms_norm(module: nn.Module, where: str) -> NormNumerics:
    """The numerics of `module`, or a ValueError naming `where` and why the kernel cannot compute it."""
    numerics, why = norm_numerics(module)
    if numerics is None:
        raise ValueError(f"{where}: {why}")
    return numerics
