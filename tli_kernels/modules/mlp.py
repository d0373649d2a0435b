"""TliMLP: the gated MLP down_proj(act(gate) * up) with the gated-activation kernel.

Two layouts: gate_proj and up_proj as two Linear maps (Llama and most families), or one fused
gate_up_proj whose output is [gate | up] (Phi-3), which the packed kernel reads in place. The activation
is SiLU (SwiGLU) or the tanh GELU (Gemma's GeGLU); which one a module's `act_fn` / `activation_fn`
computes is checked on a probe (`activation_of`), not read from its name.

With `fuse_gate_up` two separate projections write one packed [.., 2I] output (`gate_up_proj`) that the
packed kernel reads in place; the weights stay `gate_proj.weight` / `up_proj.weight`. That path calls the
projections' weights directly, so forward hooks on gate_proj/up_proj do not fire there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tli_kernels.ops import gate_up_proj, swiglu, swiglu_packed

ACTIVATION_ATTRIBUTES = ("act_fn", "activation_fn")


class TliMLP(nn.Module):
    """Mixin put in front of a transformers gated-MLP class; keeps its projections."""

    down_proj: nn.Linear
    _tli_fuse_gate_up = False  # set per instance by `patch_mlp(..., fuse_gate_up=True)`
    _tli_activation = "silu"  # set per instance by `patch_mlp`
    _tli_packed = False  # a fused gate_up_proj (Phi-3)

    def forward(self, x: Tensor) -> Tensor:
        act = self._tli_activation
        if self._tli_packed:
            return self.down_proj(swiglu_packed(self.gate_up_proj(x), activation=act))
        if self._tli_fuse_gate_up:
            gate, up = self.gate_proj, self.up_proj
            packed = gate_up_proj(x, gate.weight, up.weight, gate.bias, up.bias)
            return self.down_proj(swiglu_packed(packed, activation=act))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), activation=act))


_REFERENCE = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}
_PROBED: dict[tuple, str | None] = {}


def activation_of(module: nn.Module | None) -> str | None:
    """ "silu" or "gelu_tanh" when `module` computes that activation bit for bit (float32 and bfloat16
    probes), else None."""
    if module is None or any(True for _ in module.parameters()):
        return None
    key = (type(module), tuple(sorted((k, repr(v)) for k, v in module.__dict__.items() if not k.startswith("_"))))
    if key not in _PROBED:
        _PROBED[key] = _probe(module)
    return _PROBED[key]


def _probe(module: nn.Module) -> str | None:
    g = torch.linspace(-12.0, 12.0, 997, device="cpu")
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            outs = [(g.to(dtype), module(g.to(dtype))) for dtype in (torch.float32, torch.bfloat16)]
    except Exception:  # noqa: BLE001 - an activation that cannot run on a CPU probe is not matched
        return None
    for name, fn in _REFERENCE.items():
        if all(isinstance(o, Tensor) and o.dtype == x.dtype and torch.equal(fn(x), o) for x, o in outs):
            return name
    return None


def mlp_support(module: nn.Module) -> tuple[dict | None, str]:
    """({"activation", "packed"}, "") when TliMLP computes exactly what `module` does, else (None, why)."""
    name = type(module).__name__
    children = dict(module.named_children())
    act_attr = next((a for a in ACTIVATION_ATTRIBUTES if a in children or hasattr(module, a)), None)
    projections = set(children) - {act_attr}
    if projections == {"gate_proj", "up_proj", "down_proj"}:
        packed = False
    elif projections == {"gate_up_proj", "down_proj"}:
        packed = True
    elif "experts" in children or "gate" in children or "router" in children:
        return None, "MoE block (experts and router stay stock)"
    else:
        return None, f"{name} is not a gated MLP (has {', '.join(sorted(children))})"
    for attr in projections:
        if not isinstance(children[attr], nn.Linear):
            return None, f"{name}.{attr} is a {type(children[attr]).__name__}, not a Linear"
    if packed and children["gate_up_proj"].out_features != 2 * children["down_proj"].in_features:
        return None, f"{name}.gate_up_proj is not [gate | up] of down_proj's input width"
    if any(True for _ in module.named_parameters(recurse=False)):
        return None, f"{name} has parameters outside its projections"
    activation = activation_of(getattr(module, act_attr, None) if act_attr else None)
    if activation is None:
        act = getattr(module, act_attr, None) if act_attr else None
        return None, f"activation {type(act).__name__} is neither SiLU nor the tanh GELU"
    return {"activation": activation, "packed": packed}, ""


def patch_mlp(module: nn.Module, support: dict, fuse_gate_up: bool = False) -> None:
    from tli_kernels.modules import _swap

    _swap.swap_in(module, TliMLP)
    module._tli_activation = support["activation"]
    if support["packed"]:
        module._tli_packed = True
    elif fuse_gate_up and can_fuse_gate_up(module):
        module._tli_fuse_gate_up = True


def unpatch_mlp(module: nn.Module) -> None:
    from tli_kernels.modules import _swap

    for attr in ("_tli_fuse_gate_up", "_tli_activation", "_tli_packed"):
        module.__dict__.pop(attr, None)
    _swap.swap_out(module)


def is_swiglu_mlp(module: nn.Module) -> bool:
    """True for an MLP this module computes exactly (kept for callers of the Llama-only version)."""
    return mlp_support(module)[0] is not None


def can_fuse_gate_up(module: nn.Module) -> bool:
    """Plain nn.Linear projections only: a subclass (quantized, LoRA-wrapped...) computes something else."""
    return type(module.gate_proj) is nn.Linear and type(module.up_proj) is nn.Linear
