"""Learnable residual scales (alpha) for injected layers on a stock transformers model.

An upscaled checkpoint has its alpha folded into each branch's last linear map (or the post norm
that follows the branch, for Gemma2/3 and OLMo2; tli_kernels/architectures), so training starts
from a multiplier m = 1 per injected layer on both residual branches: x + m * Attn(...), then
+ m * MLP(...). Without the tli kernels, m is applied by forward hooks on the module whose output is
the branch as it joins the residual stream (`branch_module`). The multipliers live in
`Trainee.residual_scales`, next to the model and not inside it, so the model's state dict keeps the
stock keys; on save they are folded into a copy of the weights with the plan's arithmetic and the
provenance records the effective alpha (the old alpha times m).

With the kernels (`apply_tli_kernels(..., learnable_alpha=True)`) alpha is a parameter
`model.layers.{i}.residual_scale` instead; `alpha_parameters` finds either kind.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from tli_kernels.architectures import BY_MODEL_TYPE, Architecture, resolve_architecture
from tli_kernels.architectures.fold import fold_factors, fold_into_state_dict  # noqa: F401 (re-exported)
from tli_kernels.architectures.spec import branch_module

_HOOK_NAME = re.compile(r"^residual_scales\.(\d+)$")
_KERNEL_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.residual_scale$")


def model_architecture(model: nn.Module) -> Architecture:
    """The architecture entry of an in-memory transformers model (a generic rule is proven first)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = BY_MODEL_TYPE.get(model_type)
    if arch is None:
        names = [n for n, _ in model.named_parameters()]
        arch = resolve_architecture(config.to_dict(), names, f"<{type(model).__name__} in memory>")
    return arch


def layer_prefix(model: nn.Module, arch: Architecture | None = None) -> str:
    arch = arch or model_architecture(model)
    for prefix in arch.layer_prefixes:
        try:
            if isinstance(model.get_submodule(prefix), nn.ModuleList):
                return prefix
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__}: found no decoder layer list at {' or '.join(arch.layer_prefixes)}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(layer_prefix(model))


class Trainee(nn.Module):
    """The model being trained plus its hook-applied residual scales; forward(ids) -> logits.

    One root module, so FSDP2 shards and checkpoints the scales with everything else.
    """

    def __init__(self, lm: nn.Module, hooked_layers: list[int] = ()):
        super().__init__()
        self.lm = lm
        self.residual_scales = nn.ParameterDict(
            {str(i): nn.Parameter(torch.ones(1, dtype=torch.float32)) for i in hooked_layers}
        )
        arch = model_architecture(lm)
        layers = decoder_layers(lm)
        for i in hooked_layers:
            for branch in ("attn", "mlp"):
                layers[i].get_submodule(branch_module(arch, branch)).register_forward_hook(self._scale_hook(str(i)))

    def _scale_hook(self, key: str):
        # Look the parameter up at call time: FSDP2 swaps sharded and unsharded tensors in place.
        # alpha stays float32: the product is taken in float32 and rounded once (as the kernels and
        # the fold do), not alpha first rounded to a bf16 output's dtype.
        def scale(x: torch.Tensor) -> torch.Tensor:
            return (x.float() * self.residual_scales[key]).to(x.dtype)

        def hook(module, inputs, output):
            if isinstance(output, tuple):  # attention blocks return (output, weights, ...)
                return (scale(output[0]),) + tuple(output[1:])
            return scale(output)

        return hook

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def alpha_parameters(trainee: nn.Module) -> dict[int, nn.Parameter]:
    """{layer index: learnable alpha} from hooks (`residual_scales.i`) or kernels (`layers.i.residual_scale`)."""
    found = {}
    for name, p in trainee.named_parameters():
        m = _HOOK_NAME.match(name) or _KERNEL_NAME.search(name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def scalar(p: torch.Tensor) -> float:
    """A one-element (possibly sharded) tensor as a float; collective for a DTensor, so call on every rank."""
    full = p.full_tensor() if hasattr(p, "full_tensor") else p
    return float(full.detach().float().reshape(-1)[0].item())
