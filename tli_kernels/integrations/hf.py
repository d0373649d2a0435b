"""apply_tli_kernels(model) -> handle: patch one loaded transformers Llama-family model in place.

Only that instance changes (each decoder layer, its attention and MLP, and the final norm get a tli
mixin in front of their own class); transformers' classes are untouched, state-dict keys are the
stock ones, and `handle.undo()` gives every module its class back.

Residual scales (alpha), per layer index:
  * `residual_scales={i: a, ...}` given: those layers start at those values (learnable when
    `learnable_alpha=True`); every other layer has alpha = 1.
  * None: read `tli_provenance.json` from the model's folder (written by `tli upscale`). A saved
    checkpoint has alpha folded into o_proj/down_proj (`alpha_folded: true`), so its injected layers
    start at 1.0 (a learnable scalar each when `learnable_alpha=True`); with `alpha_folded: false` they
    start at the provenance's `residual_scales`.
  * No provenance file: alpha = 1 everywhere, nothing learnable (a plain accelerated model).
Fold alpha into the weights with `fold_residual_scales(model)` before `save_pretrained`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from tli_kernels.modules import _swap
from tli_kernels.modules.decoder_layer import (
    check_decoder_layer,
    fold_residual_scale,
    patch_decoder_layer,
    residual_scale_of,
    unpatch_decoder_layer,
)
from tli_kernels.modules.norm import TliRMSNorm, check_rms_norm

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
PROVENANCE_FILE = "tli_provenance.json"


# ------------------------------------------------------------------------------------ provenance
def read_provenance(folder: str | os.PathLike) -> dict | None:
    """The parsed `tli_provenance.json` in `folder`, or None when there is none."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        provenance = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the provenance file: {error}") from error
    if not isinstance(provenance, dict) or provenance.get("tool") != "tli_kernels":
        raise ValueError(f"{path}: not a tli_kernels provenance file (field 'tool' must be 'tli_kernels')")
    return provenance


def scales_from_provenance(provenance: dict, num_layers: int, source: str = PROVENANCE_FILE) -> dict[int, float]:
    """Initial alpha per injected layer from a provenance dict: 1.0 when `alpha_folded` is true,
    else its `residual_scales`. Raises ValueError when it does not describe a model of `num_layers`."""
    layers = provenance.get("layers")
    if layers is not None and len(layers) != num_layers:
        raise ValueError(f"{source}: lists {len(layers)} layers but the model has {num_layers}")
    raw_scales = provenance.get("residual_scales") or {}
    injected = provenance.get("injected_layers")
    if injected is None:
        injected = sorted(int(i) for i in raw_scales)
    if not injected:
        return {}
    if "alpha_folded" not in provenance:
        raise ValueError(f"{source}: has injected layers but no 'alpha_folded' field")
    if provenance["alpha_folded"]:
        scales = {int(i): 1.0 for i in injected}
    else:
        missing = [i for i in injected if str(i) not in raw_scales and i not in raw_scales]
        if missing:
            raise ValueError(f"{source}: alpha_folded is false but residual_scales lacks layers {missing}")
        scales = {int(i): float(raw_scales.get(str(i), raw_scales.get(i))) for i in injected}
    return _validated(scales, num_layers, source)


def _validated(scales: dict, num_layers: int, source: str) -> dict[int, float]:
    out = {}
    for index, alpha in scales.items():
        if not isinstance(index, int) or not 0 <= index < num_layers:
            raise ValueError(f"{source}: layer index {index!r} is not in [0, {num_layers})")
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"{source}: residual scale of layer {index} must be a finite number, got {alpha!r}")
        out[index] = float(alpha)
    return out


def _model_folder(model: nn.Module) -> str | None:
    for candidate in (getattr(model, "name_or_path", None), getattr(model.config, "_name_or_path", None)):
        if candidate and os.path.isdir(candidate):
            return candidate
    return None


# -------------------------------------------------------------------------------------- patching
def _decoder(model: nn.Module) -> nn.Module:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"apply_tli_kernels supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r} "
            f"({type(model).__name__})"
        )
    for candidate in (getattr(model, "model", None), model):
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    raise ValueError(f"{type(model).__name__}: found no `layers` ModuleList of decoder layers")


@dataclass
class TliKernelsHandle:
    """What `apply_tli_kernels` changed, and how to take it back."""

    model: nn.Module
    residual_scales: dict[int, float]
    learnable_layers: list[int]
    _layer_hooks: dict[int, list] = field(default_factory=dict, repr=False)
    _final_norm: nn.Module | None = field(default=None, repr=False)
    active: bool = True

    def current_scales(self) -> dict[int, float]:
        """alpha of every layer whose alpha is learnable or not 1, as floats."""
        layers = _decoder(self.model).layers
        scales = {i: residual_scale_of(layers[i]) for i in self._layer_hooks}
        return {i: a for i, a in scales.items() if a != 1.0 or i in self.learnable_layers}

    def undo(self, *, fold: bool = True) -> dict[int, float]:
        """Give every patched module its original class. With `fold` (default) any alpha != 1 is first
        folded into o_proj/down_proj, so the model keeps computing the same function; without it alpha
        is dropped. Returns the alphas folded."""
        if not self.active:
            return {}
        folded = fold_residual_scales(self.model) if fold else {}
        layers = _decoder(self.model).layers
        for index, hooks in self._layer_hooks.items():
            unpatch_decoder_layer(layers[index], hooks)
        if self._final_norm is not None:
            _swap.swap_out(self._final_norm)
        self.active = False
        logger.info("tli kernels removed from %s", type(self.model).__name__)
        return folded


def apply_tli_kernels(
    model: nn.Module,
    *,
    residual_scales: dict[int, float] | None = None,
    learnable_alpha: bool = False,
    fuse_gate_up: bool = False,
) -> TliKernelsHandle:
    """Patch `model` (LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM or their base models) in
    place with the tli kernels and residual scales; see the module docstring. `fuse_gate_up` runs each
    MLP's gate and up projections as one packed projection feeding the packed SwiGLU kernel. Returns a
    handle whose `undo()` restores the stock modules."""
    decoder = _decoder(model)
    layers = decoder.layers
    num_layers = len(layers)
    if any(_swap.is_patched(layer) for layer in layers):
        raise RuntimeError(f"{type(model).__name__} is already patched by tli_kernels; call handle.undo() first")
    for index, layer in enumerate(layers):
        check_decoder_layer(layer, f"layers.{index}")

    if residual_scales is not None:
        scales = _validated(dict(residual_scales), num_layers, "residual_scales")
        origin = "residual_scales argument"
    else:
        folder = _model_folder(model)
        provenance = read_provenance(folder) if folder else None
        if provenance is not None:
            source = str(Path(folder) / PROVENANCE_FILE)
            scales, origin = scales_from_provenance(provenance, num_layers, source), source
        else:
            scales, origin = {}, "no provenance file: alpha = 1 on every layer"
    learnable = sorted(scales) if learnable_alpha else []
    if learnable_alpha and not learnable:
        logger.warning("learnable_alpha=True but no injected layers are known (%s): no alpha will learn", origin)

    handle = TliKernelsHandle(model=model, residual_scales=scales, learnable_layers=learnable)
    for index, layer in enumerate(layers):
        handle._layer_hooks[index] = patch_decoder_layer(
            layer, residual_scale=scales.get(index, 1.0), learnable=index in learnable, fuse_gate_up=fuse_gate_up
        )
    norm = getattr(decoder, "norm", None)
    if norm is not None:
        check_rms_norm(norm, "norm")
        _swap.swap_in(norm, TliRMSNorm)
        handle._final_norm = norm
    logger.info(
        "tli kernels applied to %s: %d layers, residual scales %s (%s), learnable on %s",
        type(model).__name__,
        num_layers,
        scales or "none",
        origin,
        learnable or "no layer",
    )
    return handle


def fold_residual_scales(model: nn.Module) -> dict[int, float]:
    """Fold every layer's alpha != 1 into its o_proj/down_proj (weights and biases) and reset alpha to
    1, so `save_pretrained` writes a plain checkpoint computing the same function. Returns
    {layer index: alpha folded}."""
    folded = {}
    for index, layer in enumerate(_decoder(model).layers):
        alpha = fold_residual_scale(layer)
        if alpha != 1.0:
            folded[index] = alpha
    if folded:
        logger.info("folded residual scales into o_proj/down_proj: %s", folded)
    return folded
