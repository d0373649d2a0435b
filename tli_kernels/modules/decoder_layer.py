"""Decoder blocks with a residual scale alpha and the tli kernels, in the three shapes the families have.

    pre-norm (Llama, Mistral, Qwen2/3, SmolLM3, Granite, Phi-3, Gemma, the MoE families):
        r   = x + alpha * m * attn(norm_in(x))                  m: Granite's residual_multiplier, else 1
        y   = norm_post_attn(r)           -- the add and this norm are one kernel (add_rms_norm)
        out = r + alpha * m * mlp(y)                            -- scaled_add
    sandwich (Gemma 2, Gemma 3): a norm before and after each branch
        r   = x + alpha * norm_post_attn(attn(norm_in(x)))
        y   = norm_pre_ff(r)              -- fused with the add above
        out = r + alpha * norm_post_ff(mlp(y))
    post-norm (OLMo2): the norms follow the branches only
        r   = x + alpha * norm_post_attn(attn(x))
        out = r + alpha * norm_post_ff(mlp(r))

alpha is defined on the block (docs/architectures.md): it multiplies what each branch adds to the
residual stream, which for sandwich and post-norm blocks is the post norm's output. The attention and
MLP are called as modules (patched or stock: an MoE block stays stock and is still scaled by alpha).
Phi-3's residual dropouts are applied where the stock block applies them.

The add that ends the block is not fused with the next block's input norm: transformers' decoder loop
passes one tensor between layers, and its output capturing, gradient checkpointing and hooks act at
that boundary, so crossing it would mean replacing the model's forward. It costs one extra read of the
residual per layer (see docs/kernels.md).

alpha lives on the layer as `residual_scale`: a float (fixed, stored as its float32 value; 1.0 costs
nothing) or a one-element float32 `nn.Parameter` (learnable). Both residual adds apply that same
float32 alpha (`add_rms_norm` and `scaled_add` compute in float32 and round once), and so does the fold,
whatever the dtype of the model. The parameter never reaches the state dict (a state-dict hook drops
it, a load hook forgives its absence), so checkpoints keep the stock layout; fold it into the weights
with `fold_residual_scale` (the architecture registry's rule: branch outputs, or the post norm) before
saving.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from tli_kernels.architectures import BY_MODEL_TYPE, Architecture
from tli_kernels.architectures.fold import apply_fold, fold_tensor_names
from tli_kernels.architectures.spec import NORM_LAYOUTS as LAYOUT_NORMS
from tli_kernels.modules import _swap
from tli_kernels.modules.attention import attention_support, patch_attention, unpatch_attention
from tli_kernels.modules.mlp import mlp_support, patch_mlp, unpatch_mlp
from tli_kernels.modules.norm import norm_numerics, patch_rms_norm, unpatch_rms_norm
from tli_kernels.ops import add_rms_norm, rms_norm, scaled_add

logger = logging.getLogger(__name__)

ALPHA_NAME = "residual_scale"
DROPOUTS = ("resid_attn_dropout", "resid_mlp_dropout")  # Phi-3


def _scaled_add(residual: Tensor, branch: Tensor, alpha: float | Tensor, scale: float = 1.0) -> Tensor:
    if not isinstance(alpha, Tensor) and alpha * scale == 1.0:
        return residual + branch  # computed in float32 and rounded once, as scaled_add would
    return scaled_add(residual, branch, alpha, scale=scale)


def float32_value(alpha: float) -> float:
    """alpha rounded to float32 (as a Python float): the value both branches and the fold apply."""
    return float(torch.tensor(float(alpha), dtype=torch.float32))


def _norm(x: Tensor, norm: nn.Module) -> Tensor:
    spec = norm._tli_norm  # the patched norm's numerics (see modules/norm.py)
    return rms_norm(x, norm.weight, spec.eps, offset=spec.offset, cast_before_weight=spec.cast_before_weight)


def _add_norm(residual: Tensor, branch: Tensor, norm: nn.Module, alpha, scale: float = 1.0):
    spec = norm._tli_norm
    return add_rms_norm(
        residual, branch, norm.weight, spec.eps, alpha, scale=scale, offset=spec.offset,
        cast_before_weight=spec.cast_before_weight,
    )  # fmt: skip


class _TliBlock(nn.Module):
    """What the three block mixins share: the attention call and the per-call constants."""

    self_attn: nn.Module
    mlp: nn.Module
    _tli_cache_kwarg: str  # set on the per-class subclass by `_swap.swap_in`
    _tli_takes_use_cache: bool
    _tli_scale = 1.0  # Granite's residual_multiplier, read at patch time (see TliAttention._tli_use_rope)

    def _tli_attend(self, normed: Tensor, cache, attention_mask, position_ids, position_embeddings, kwargs: dict):
        # The attention gets what the stock block passes it: the same keywords, the cache under the
        # attention's own name for it (same transformers), use_cache where the stock block names it.
        kwargs[self._tli_cache_kwarg] = cache
        if self._tli_takes_use_cache:
            kwargs.setdefault("use_cache", False)
        out, _ = self.self_attn(
            hidden_states=normed,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        return out


class TliDecoderLayer(_TliBlock):
    """Mixin for a pre-norm block (see the module docstring and `patch_decoder_layer`)."""

    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values=None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        cache=None,
        **kwargs,
    ) -> Tensor:
        # The most common block and a decode step's hot path: written out (no helper calls), see
        # benchmarks/bench_dispatch.py.
        cache = cache if cache is not None else past_key_values
        alpha = getattr(self, ALPHA_NAME, 1.0)
        scale = self._tli_scale  # Granite: both branches times m
        norm = self.input_layernorm
        spec = norm._tli_norm
        normed = rms_norm(
            hidden_states, norm.weight, spec.eps, offset=spec.offset, cast_before_weight=spec.cast_before_weight
        )
        kwargs[self._tli_cache_kwarg] = cache
        if self._tli_takes_use_cache:
            kwargs.setdefault("use_cache", False)
        attn, _ = self.self_attn(
            hidden_states=normed,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.training and hasattr(self, "resid_attn_dropout"):
            attn = self.resid_attn_dropout(attn)
        norm = self.post_attention_layernorm
        spec = norm._tli_norm
        residual, normed = add_rms_norm(
            hidden_states, attn, norm.weight, spec.eps, alpha, scale=scale, offset=spec.offset,
            cast_before_weight=spec.cast_before_weight,
        )  # fmt: skip
        mlp = self.mlp(normed)
        if self.training and hasattr(self, "resid_mlp_dropout"):
            mlp = self.resid_mlp_dropout(mlp)
        return _scaled_add(residual, mlp, alpha, scale)


class TliSandwichDecoderLayer(_TliBlock):
    """Mixin for a block with norms before and after each branch (Gemma 2, Gemma 3)."""

    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module
    pre_feedforward_layernorm: nn.Module
    post_feedforward_layernorm: nn.Module

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> Tensor:
        cache = cache if cache is not None else past_key_values
        alpha = getattr(self, ALPHA_NAME, 1.0)
        normed = _norm(hidden_states, self.input_layernorm)
        attn = self._tli_attend(normed, cache, attention_mask, position_ids, position_embeddings, kwargs)
        attn = _norm(attn, self.post_attention_layernorm)
        residual, normed = _add_norm(hidden_states, attn, self.pre_feedforward_layernorm, alpha)
        mlp = _norm(self.mlp(normed), self.post_feedforward_layernorm)
        return _scaled_add(residual, mlp, alpha)


class TliPostNormDecoderLayer(_TliBlock):
    """Mixin for a block whose norms follow the branches only (OLMo2)."""

    post_attention_layernorm: nn.Module
    post_feedforward_layernorm: nn.Module

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values=None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        cache=None,
        **kwargs,
    ) -> Tensor:
        cache = cache if cache is not None else past_key_values
        alpha = getattr(self, ALPHA_NAME, 1.0)
        attn = self._tli_attend(hidden_states, cache, attention_mask, position_ids, position_embeddings, kwargs)
        residual = _scaled_add(hidden_states, _norm(attn, self.post_attention_layernorm), alpha)
        return _scaled_add(residual, _norm(self.mlp(residual), self.post_feedforward_layernorm), alpha)


MIXINS = {"pre-norm": TliDecoderLayer, "sandwich": TliSandwichDecoderLayer, "post-norm": TliPostNormDecoderLayer}


# ---------------------------------------------------------------------------- what it can compute
def layer_architecture(layer: nn.Module) -> Architecture | None:
    """The registry entry of a decoder layer, from its attention's config (None when unknown)."""
    config = getattr(getattr(layer, "self_attn", None), "config", None)
    return BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def layer_support(layer: nn.Module, arch: Architecture | None = None) -> tuple[dict | None, str]:
    """({"layout", "norms"}, "") when a tli block mixin computes exactly what `layer` does (its attention and
    MLP aside, which are called as modules), else (None, why)."""
    name = type(layer).__name__
    arch = arch or layer_architecture(layer)
    if arch is None:
        return None, f"{name}: no architecture entry for its model type"
    children = dict(layer.named_children())
    for attr in DROPOUTS:
        if attr in children and not isinstance(children[attr], nn.Dropout):
            return None, f"{name}.{attr} is a {type(children[attr]).__name__}, not a Dropout"
    parts = set(children) - set(DROPOUTS)
    post_normed = arch.attn.post_norm is not None
    layout = next(
        (lay for lay, norms in LAYOUT_NORMS.items() if parts == {"self_attn", "mlp", *norms} and
         (lay == "pre-norm") != post_normed),
        None,
    )  # fmt: skip
    if layout is None:
        return None, f"{name} has parts {sorted(parts)}: not a pre-norm, sandwich or post-norm block tli computes"
    if any(True for _ in layer.named_parameters(recurse=False)):
        return None, f"{name} has parameters outside its modules"
    norms = {}
    for norm_name in LAYOUT_NORMS[layout]:
        numerics, why = norm_numerics(children[norm_name])
        if numerics is None:
            return None, f"{name}.{norm_name}: {why}"
        norms[norm_name] = numerics
    return {"layout": layout, "norms": norms}, ""


def check_decoder_layer(layer: nn.Module, where: str = "layer") -> None:
    """Raise ValueError naming what does not fit when the tli block, attention or MLP cannot compute `layer`
    exactly (an MoE MLP is fine: it stays stock)."""
    support, why = layer_support(layer)
    if support is None:
        raise ValueError(f"{where}: {why}")
    attn, why = attention_support(layer.self_attn)
    if attn is None:
        raise ValueError(f"{where}.self_attn: {why}")


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


def patch_block(layer: nn.Module, support: dict, arch: Architecture, *, residual_scale: float = 1.0,
                learnable: bool = False) -> list:  # fmt: skip
    """Give `layer` its block mixin, its norms the norm kernel, and alpha (see `patch_decoder_layer`).
    Returns the hook handles to remove on undo."""
    _swap.swap_in(layer, MIXINS[support["layout"]])
    layer._tli_arch = arch
    multiplier = getattr(layer, "residual_multiplier", None)
    if multiplier is not None and support["layout"] == "pre-norm":
        layer._tli_scale = float(multiplier)
    for norm_name, numerics in support["norms"].items():
        patch_rms_norm(getattr(layer, norm_name), numerics)
    if learnable:
        device = next(iter(layer.parameters())).device
        layer.register_parameter(
            ALPHA_NAME, nn.Parameter(torch.full((1,), float(residual_scale), dtype=torch.float32, device=device))
        )
    else:
        setattr(layer, ALPHA_NAME, float32_value(residual_scale))
    return [
        layer.register_state_dict_post_hook(_drop_alpha_from_state_dict),
        layer.register_load_state_dict_post_hook(_forgive_missing_alpha),
    ]


def patch_decoder_layer(
    layer: nn.Module, *, residual_scale: float = 1.0, learnable: bool = False, fuse_gate_up: bool = False,
    arch: Architecture | None = None,
) -> list:  # fmt: skip
    """Patch one transformers decoder layer in place: the block, its attention and (for a gated MLP) its
    MLP; returns the hook handles to remove on undo. Raises ValueError when the block or its attention is
    one tli cannot compute exactly. `learnable` makes alpha an nn.Parameter; `fuse_gate_up` runs gate/up
    as one packed projection (see `TliMLP`) where the MLP allows it."""
    arch = arch or layer_architecture(layer)
    support, why = layer_support(layer, arch)
    if support is None:
        raise ValueError(f"layer: {why}")
    attn, why = attention_support(layer.self_attn)
    if attn is None:
        raise ValueError(f"layer.self_attn: {why}")
    hooks = patch_block(layer, support, arch, residual_scale=residual_scale, learnable=learnable)
    patch_attention(layer.self_attn, attn)
    mlp, _ = mlp_support(layer.mlp)
    if mlp is not None:
        patch_mlp(layer.mlp, mlp, fuse_gate_up)
    return hooks


def residual_scale_of(layer: nn.Module) -> float:
    """alpha of a patched layer as a float holding its float32 value (1.0 for an unpatched one)."""
    alpha = getattr(layer, ALPHA_NAME, 1.0)
    return float(alpha.detach().float().item()) if isinstance(alpha, Tensor) else float(alpha)


@torch.no_grad()
def fold_residual_scale(layer: nn.Module, arch: Architecture | None = None) -> float:
    """Fold alpha into the layer's weights with the architecture registry's rule (the branch outputs'
    weights and biases times alpha, or a post norm's (w + offset) * alpha - offset; float32 arithmetic,
    rounded to the weights' dtype) and reset alpha to 1. Returns the alpha folded. The layer computes the
    same function before and after."""
    alpha = float32_value(residual_scale_of(layer))
    if alpha == 1.0:
        return alpha
    arch = arch or getattr(layer, "_tli_arch", None) or layer_architecture(layer)
    if arch is None:
        raise ValueError(f"{type(layer).__name__}: no architecture rule to fold alpha with")
    params = dict(layer.named_parameters())
    roles = fold_tensor_names(arch, [n for n in params if n != ALPHA_NAME])
    if not roles:
        raise ValueError(f"{type(layer).__name__}: no tensor of the {arch.name} rule ({arch.describe()}) to fold into")
    for name, role in roles.items():
        p = params[name]
        p.copy_(apply_fold(p.detach(), alpha, arch.norm_offset if role == "norm" else 0.0).to(p.dtype))
    current = getattr(layer, ALPHA_NAME)
    if isinstance(current, Tensor):
        current.fill_(1.0)
    else:
        setattr(layer, ALPHA_NAME, 1.0)
    return alpha


def unpatch_block(layer: nn.Module, hooks: list) -> None:
    """Undo `patch_block` (alpha is dropped: fold it first to keep it)."""
    for hook in hooks:
        hook.remove()
    if ALPHA_NAME in layer._parameters:
        del layer._parameters[ALPHA_NAME]
    layer.__dict__.pop(ALPHA_NAME, None)
    layer.__dict__.pop("_tli_arch", None)
    layer.__dict__.pop("_tli_scale", None)
    for norm_name in {n for norms in LAYOUT_NORMS.values() for n in norms}:
        norm = getattr(layer, norm_name, None)
        if norm is not None:
            unpatch_rms_norm(norm)
    _swap.swap_out(layer)


def unpatch_decoder_layer(layer: nn.Module, hooks: list) -> None:
    """Undo `patch_decoder_layer` (alpha is dropped: fold it first to keep it)."""
    unpatch_mlp(layer.mlp)
    unpatch_attention(layer.self_attn)
    unpatch_block(layer, hooks)
