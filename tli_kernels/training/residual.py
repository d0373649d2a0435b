"""Learnable residual scales (alpha) for injected layers on a stock transformers model.

An upscaled checkpoint has its alpha folded into o_proj / down_proj, so training starts from a
multiplier m = 1 per injected layer on both residual branches: x + m * o_proj(...), then
+ m * down_proj(...). Without the tli kernels, m is applied by forward hooks on the two output
projections (the branch output is exactly the projection's output in a pre-norm Llama block).
The multipliers live in `Trainee.residual_scales`, next to the model and not inside it, so the
model's state dict keeps the stock keys; on save they are folded into a copy of the weights and
the provenance records the effective alpha (the old alpha times m).

With the kernels (`apply_tli_kernels(..., learnable_alpha=True)`) alpha is a parameter
`model.layers.{i}.residual_scale` instead; `alpha_parameters` finds either kind.
"""

from __future__ import annotations

import re

import torch
from torch import nn

BRANCH_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")
_HOOK_NAME = re.compile(r"^residual_scales\.(\d+)$")
_KERNEL_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.residual_scale$")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: found no `model.layers` list of decoder layers")
    return layers


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
        layers = decoder_layers(lm)
        for i in hooked_layers:
            for path in BRANCH_OUTPUTS:
                layers[i].get_submodule(path).register_forward_hook(self._scale_hook(str(i)))

    def _scale_hook(self, key: str):
        # Look the parameter up at call time: FSDP2 swaps sharded and unsharded tensors in place.
        def hook(module, inputs, output):
            return output * self.residual_scales[key].to(output.dtype)

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


def branch_tensor_names(layer: int, prefix: str = "model.layers") -> list[str]:
    """The checkpoint tensors that carry layer's residual-branch scale (weights, then biases).

    The one place that says which tensors alpha is folded into (Llama-family blocks); the
    exporter and fold_into_state_dict both ask here.
    """
    return [f"{prefix}.{layer}.{path}.{kind}" for kind in ("weight", "bias") for path in BRANCH_OUTPUTS]


def fold_into_state_dict(state: dict[str, torch.Tensor], scales: dict[int, float], prefix: str = "model.layers"):
    """Multiply each layer's o_proj / down_proj (weight and bias) by its scale, in a copy of the dict."""
    out = dict(state)
    for i, a in scales.items():
        if a == 1.0:
            continue
        for key in branch_tensor_names(i, prefix):
            if key in out:
                out[key] = out[key] * a
            elif key.endswith(".weight"):
                raise KeyError(f"cannot fold alpha of layer {i}: the state dict has no {key}")
    return out


def branch_weights(state: dict[str, torch.Tensor], layers: list[int], prefix: str = "model.layers") -> dict:
    """The unfolded o_proj / down_proj tensors of `layers` (what resume needs besides the folded checkpoint)."""
    keep = tuple(f"{prefix}.{i}.{path}." for i in layers for path in BRANCH_OUTPUTS)
    return {k: v for k, v in state.items() if k.startswith(keep)}
