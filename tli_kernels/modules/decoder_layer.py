"""TliDecoderLayer: a Llama-family decoder block with a residual scale alpha and the tli kernels.

    r  = x + alpha * o_proj(attn(rope(qkv(rmsnorm(x)))))       alpha = 1 for original layers
    y  = rmsnorm(r)              -- the add and this norm are one kernel (add_rms_norm)
    out = r + alpha * down_proj(silu(gate_proj(y)) * up_proj(y))

The add that ends the block is not fused with the next block's input norm: transformers' decoder loop
passes one tensor between layers, and its output capturing, gradient checkpointing and hooks act at
that boundary, so crossing it would mean replacing the model's forward. It costs one extra read of the
residual per layer (see docs/kernels.md).

alpha lives on the layer as `residual_scale`: a float (fixed, stored as its float32 value; 1.0 costs
nothing) or a one-element float32 `nn.Parameter` (learnable). Both residual adds apply that same
float32 alpha (`add_rms_norm` and `scaled_add` compute in float32 and round once), and so does the fold,
whatever the dtype of the model. The parameter never reaches the state dict (a state-dict hook drops
it, a load hook forgives its absence), so checkpoints keep the stock layout; fold it into
o_proj/down_proj with `fold_residual_scale` before saving.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from tli_kernels.modules import _swap
from tli_kernels.modules.attention import TliAttention, check_attention
from tli_kernels.modules.mlp import TliMLP, can_fuse_gate_up, is_swiglu_mlp
from tli_kernels.modules.norm import check_rms_norm
from tli_kernels.ops import add_rms_norm, rms_norm, scaled_add

logger = logging.getLogger(__name__)

ALPHA_NAME = "residual_scale"


def _scaled_add(residual: Tensor, branch: Tensor, alpha: float | Tensor) -> Tensor:
    if not isinstance(alpha, Tensor) and alpha == 1.0:
        return residual + branch  # computed in float32 and rounded once, as scaled_add would
    return scaled_add(residual, branch, alpha)


def float32_value(alpha: float) -> float:
    """alpha rounded to float32 (as a Python float): the value both branches and the fold apply."""
    return float(torch.tensor(float(alpha), dtype=torch.float32))


class TliDecoderLayer(nn.Module):
    """Mixin put in front of a transformers Llama-family decoder layer class (see `patch_decoder_layer`)."""

    self_attn: nn.Module
    mlp: nn.Module
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module
    _tli_cache_kwarg: str  # set on the per-class subclass by `_swap.swap_in`

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        cache=None,
        **kwargs,
    ) -> Tensor:
        cache = cache if cache is not None else past_key_values
        alpha = getattr(self, ALPHA_NAME, 1.0)
        norm_in, norm_post = self.input_layernorm, self.post_attention_layernorm

        normed = rms_norm(hidden_states, norm_in.weight, norm_in.variance_epsilon)
        kwargs[self._tli_cache_kwarg] = cache  # the attention's own name for it (same transformers)
        attn_out, _ = self.self_attn(
            hidden_states=normed,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        residual, normed = add_rms_norm(hidden_states, attn_out, norm_post.weight, norm_post.variance_epsilon, alpha)
        return _scaled_add(residual, self.mlp(normed), alpha)


# ---------------------------------------------------------------------------- patching one layer
def _drop_alpha_from_state_dict(module, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(prefix + ALPHA_NAME, None)
    try:
        value = residual_scale_of(module)
    except RuntimeError:  # e.g. a sharded parameter that cannot be read locally: nothing to warn about
        return
    if value != 1.0:
        logger.warning(
            "layer %s: residual scale %.6g is not part of the state dict; call "
            "tli_kernels.integrations.fold_residual_scales(model) before saving",
            prefix.rstrip("."),
            value,
        )


def _forgive_missing_alpha(module, incompatible_keys):
    for key in [k for k in incompatible_keys.missing_keys if k.endswith(ALPHA_NAME)]:
        incompatible_keys.missing_keys.remove(key)


def check_decoder_layer(layer: nn.Module, where: str = "layer") -> None:
    """Raise ValueError naming what is missing when `layer` is not a Llama-family block."""
    for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        if not hasattr(layer, name):
            raise ValueError(f"{where}: {type(layer).__name__} has no `{name}`; not a Llama-family decoder layer")
    check_attention(layer.self_attn, f"{where}.self_attn")
    check_rms_norm(layer.input_layernorm, f"{where}.input_layernorm")
    check_rms_norm(layer.post_attention_layernorm, f"{where}.post_attention_layernorm")
    extra = sorted(
        set(dict(layer.named_children())) - {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
    )
    if extra:
        raise ValueError(f"{where}: {type(layer).__name__} has extra parts {extra} that tli does not compute")


def patch_decoder_layer(
    layer: nn.Module, *, residual_scale: float = 1.0, learnable: bool = False, fuse_gate_up: bool = False
) -> list:
    """Patch one transformers decoder layer in place (its class, its attention's and, for a SiLU MLP,
    its MLP's); returns the hook handles to remove on undo. `learnable` makes alpha an nn.Parameter;
    `fuse_gate_up` runs gate/up as one packed projection (see `TliMLP`) where the MLP allows it."""
    check_decoder_layer(layer)
    hooks = []
    _swap.swap_in(layer, TliDecoderLayer)
    _swap.swap_in(layer.self_attn, TliAttention)
    if is_swiglu_mlp(layer.mlp):
        _swap.swap_in(layer.mlp, TliMLP)
        if fuse_gate_up and can_fuse_gate_up(layer.mlp):
            layer.mlp._tli_fuse_gate_up = True
    if learnable:
        device = layer.input_layernorm.weight.device
        layer.register_parameter(
            ALPHA_NAME, nn.Parameter(torch.full((1,), float(residual_scale), dtype=torch.float32, device=device))
        )
    else:
        setattr(layer, ALPHA_NAME, float32_value(residual_scale))
    hooks.append(layer.register_state_dict_post_hook(_drop_alpha_from_state_dict))
    hooks.append(layer.register_load_state_dict_post_hook(_forgive_missing_alpha))
    return hooks


def residual_scale_of(layer: nn.Module) -> float:
    """alpha of a patched layer as a float holding its float32 value (1.0 for an unpatched one)."""
    alpha = getattr(layer, ALPHA_NAME, 1.0)
    return float(alpha.detach().float().item()) if isinstance(alpha, Tensor) else float(alpha)


@torch.no_grad()
def fold_residual_scale(layer: nn.Module) -> float:
    """Multiply alpha into o_proj and down_proj (weights and biases) and reset alpha to 1. Returns the
    alpha folded. The layer computes the same function before and after."""
    alpha = float32_value(residual_scale_of(layer))
    if alpha != 1.0:
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            proj.weight.mul_(alpha)  # a float32 alpha: PyTorch multiplies bf16/fp16 weights in float32
            if proj.bias is not None:
                proj.bias.mul_(alpha)
        current = getattr(layer, ALPHA_NAME)
        if isinstance(current, Tensor):
            current.fill_(1.0)
        else:
            setattr(layer, ALPHA_NAME, 1.0)
    return alpha


def unpatch_decoder_layer(layer: nn.Module, hooks: list) -> None:
    """Undo `patch_decoder_layer` (alpha is dropped: fold it first to keep it)."""
    for hook in hooks:
        hook.remove()
    if ALPHA_NAME in layer._parameters:
        del layer._parameters[ALPHA_NAME]
    layer.__dict__.pop(ALPHA_NAME, None)
    layer.mlp.__dict__.pop("_tli_fuse_gate_up", None)
    for module in (layer.mlp, layer.self_attn, layer):
        _swap.swap_out(module)
