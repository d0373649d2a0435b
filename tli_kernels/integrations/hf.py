"""apply_tli_kernels(model) -> handle: patch one loaded transformers decoder model in place.

Families (`KERNEL_FAMILIES`): Llama, Mistral, Qwen2, Qwen3, SmolLM3, Granite, Phi-3, Gemma, Gemma 2,
Gemma 3 (text), OLMo2, and the attention, norms and residual adds of Mixtral, Qwen3-MoE and Qwen2-MoE
(their MoE blocks stay stock). Only that instance changes: each module the kernels compute exactly (a
decoder block's norms and residual adds, its attention, a gated MLP, the final norm) gets a tli mixin in
front of its own class; transformers' classes are untouched, state-dict keys are the stock ones, and
`handle.undo()` gives every module its class back. Whatever the kernels cannot compute exactly stays
stock (another model type, a soft-capped attention on sdpa/eager, an MoE block, a norm or activation of
another kind): `handle.report` says, per kind of module, what was patched and why the rest was not.
The list is of families whose forward code was read and is tested against stock transformers
(tests/integrations/test_families.py): module names alone cannot tell two forwards apart.

Residual scales (alpha), per layer index, defined on the block as in docs/architectures.md (for Gemma 2/3
and OLMo2, alpha multiplies the post norm's output):
  * `residual_scales={i: a, ...}` given: those layers start at those values (learnable when
    `learnable_alpha=True`); every other layer has alpha = 1.
  * None: read `tli_provenance.json` from the model's folder (written by `tli upscale`). A saved
    checkpoint has alpha folded into its weights (`alpha_folded: true`), so its injected layers
    start at 1.0 (a learnable scalar each when `learnable_alpha=True`); with `alpha_folded: false` they
    start at the provenance's `residual_scales`.
  * No provenance file: alpha = 1 everywhere, nothing learnable (a plain accelerated model).
A layer whose block stays stock cannot carry alpha: asking for one there is a ValueError.
Fold alpha into the weights with `fold_residual_scales(model)` (the architecture registry's rule, as
`tli upscale` folds it) before `save_pretrained`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from tli_kernels.architectures import BY_MODEL_TYPE
from tli_kernels.architectures.registry import KERNEL_FAMILIES
from tli_kernels.modules.attention import attention_support, patch_attention, unpatch_attention
from tli_kernels.modules.decoder_layer import (
    ALPHA_NAME,
    fold_residual_scale,
    layer_support,
    patch_block,
    residual_scale_of,
    unpatch_block,
)
from tli_kernels.modules.mlp import mlp_support, patch_mlp, unpatch_mlp
from tli_kernels.modules.norm import norm_numerics, patch_rms_norm, unpatch_rms_norm

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = tuple(KERNEL_FAMILIES)
PROVENANCE_FILE = "tli_provenance.json"
KINDS = ("block", "attention", "mlp", "final norm")


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


# ---------------------------------------------------------------------------------------- report
@dataclass
class KernelReport:
    """What `apply_tli_kernels` patched, per kind of module: `kinds[kind]` maps "patched" or the reason a
    module stayed stock to the layer indices (the final norm: [0]). `str(report)` is a short table,
    `report.brief()` one line."""

    model: str
    model_type: str
    num_layers: int
    kinds: dict[str, dict[str, list[int]]] = field(default_factory=lambda: {k: {} for k in KINDS})
    note: str = ""  # why nothing was patched, when nothing was

    def add(self, kind: str, status: str, index: int) -> None:
        self.kinds[kind].setdefault(status, []).append(index)

    def patched(self, kind: str) -> list[int]:
        return self.kinds[kind].get("patched", [])

    def stock(self, kind: str) -> dict[str, list[int]]:
        return {why: where for why, where in self.kinds[kind].items() if why != "patched"}

    @property
    def anything_patched(self) -> bool:
        return any(self.patched(k) for k in KINDS)

    def __str__(self) -> str:
        lines = [f"tli kernels on {self.model} ({self.model_type}, {self.num_layers} layers):"]
        if self.note:
            lines.append(f"  everything stock: {self.note}")
            return "\n".join(lines)
        for kind in KINDS:
            total = 1 if kind == "final norm" else self.num_layers
            parts = []
            if self.patched(kind):
                parts.append(f"patched {len(self.patched(kind))}/{total}")
            for why, where in self.stock(kind).items():
                parts.append(f"stock {len(where)}/{total}: {why}")
            lines.append(f"  {kind:<11} {'; '.join(parts) or 'absent'}")
        return "\n".join(lines)

    def brief(self) -> str:
        """One line: "patched", "patched; <kind> stock (<reason>)", or "stock (<reason>)"."""
        if self.note:
            return (
                "stock (no kernels for this model type)"
                if self.note.startswith("no tli kernels")
                else (f"stock ({_short(self.note)})")
            )
        stock = []
        for kind in KINDS:
            total = 1 if kind == "final norm" else self.num_layers
            for why, where in self.stock(kind).items():
                share = "" if len(where) == total else f" {len(where)}/{total}"
                stock.append(f"{kind}{share} stock ({_short(why)})")
        if not self.anything_patched:
            return "stock: " + "; ".join(stock)
        return "; ".join(["patched", *stock])


def _short(reason: str) -> str:
    """The head of a reason, for a table cell: up to its first ':' or '('."""
    head = reason.split(":")[0].split("(")[0].strip()
    return head or reason


# -------------------------------------------------------------------------------------- patching
def _decoder(model: nn.Module) -> nn.Module | None:
    for candidate in (getattr(model, "model", None), model):
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    return None


@dataclass
class TliKernelsHandle:
    """What `apply_tli_kernels` changed (`report`), and how to take it back (`undo`)."""

    model: nn.Module
    residual_scales: dict[int, float]
    learnable_layers: list[int]
    report: KernelReport | None = None
    _blocks: dict[int, list] = field(default_factory=dict, repr=False)  # layer index -> hook handles
    _modules: list[tuple[nn.Module, object]] = field(default_factory=list, repr=False)  # (module, unpatch)
    active: bool = True

    def current_scales(self) -> dict[int, float]:
        """alpha of every layer whose alpha is learnable or not 1, as floats."""
        layers = _decoder(self.model).layers if self._blocks else []
        scales = {i: residual_scale_of(layers[i]) for i in self._blocks}
        return {i: a for i, a in scales.items() if a != 1.0 or i in self.learnable_layers}

    def undo(self, *, fold: bool = True) -> dict[int, float]:
        """Give every patched module its original class. With `fold` (default) any alpha != 1 is first
        folded into the weights (the registry's rule), so the model keeps computing the same function;
        without it alpha is dropped. Returns the alphas folded."""
        if not self.active:
            return {}
        folded = fold_residual_scales(self.model) if fold else {}
        for module, unpatch in reversed(self._modules):
            unpatch(module)
        if self._blocks:
            layers = _decoder(self.model).layers
            for index, hooks in self._blocks.items():
                unpatch_block(layers[index], hooks)
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
    """Patch `model` (a causal LM or base model of a family in `KERNEL_FAMILIES`) in place with the tli
    kernels and residual scales; see the module docstring. Modules the kernels cannot compute exactly stay
    stock and are listed in `handle.report` (a model type without kernels: everything stock, unless alpha
    was asked for, which is a ValueError). `fuse_gate_up` runs each two-projection MLP's gate and up as
    one packed projection feeding the packed kernel. Returns a handle whose `undo()` restores the stock
    modules."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    decoder = _decoder(model)
    name = type(model).__name__
    num_layers = len(decoder.layers) if decoder is not None else int(getattr(config, "num_hidden_layers", 0) or 0)
    if any(getattr(type(m), "_tli_original_class", None) is not None for m in model.modules()):
        raise RuntimeError(f"{name} is already patched by tli_kernels; call handle.undo() first")

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

    if model_type not in KERNEL_FAMILIES or decoder is None:
        report = KernelReport(name, str(model_type), num_layers)
        report.note = (
            f"no tli kernels for model type {model_type!r} (they cover {', '.join(SUPPORTED_MODEL_TYPES)})"
            if model_type not in KERNEL_FAMILIES
            else f"{name} has no `layers` ModuleList of decoder layers"
        )
        wanted = {i: a for i, a in scales.items() if a != 1.0}
        if learnable or wanted:  # running stock would drop them: never silently another function
            raise ValueError(
                f"apply_tli_kernels: residual scales {wanted or scales} ({origin}) need patched layers, but "
                f"{report.note}"
            )
        logger.warning("%s", report)
        return TliKernelsHandle(model=model, residual_scales={}, learnable_layers=[], report=report)
    if learnable_alpha and not learnable:
        logger.warning("learnable_alpha=True but no injected layers are known (%s): no alpha will learn", origin)
    arch = BY_MODEL_TYPE[model_type]
    layers = decoder.layers

    # Decide everything first, patch after: an error leaves the model untouched.
    report = KernelReport(name, model_type, num_layers)
    plan = []
    for index, layer in enumerate(layers):
        block, why = layer_support(layer, arch)
        report.add("block", "patched" if block else why, index)
        if block is None and (scales.get(index, 1.0) != 1.0 or index in learnable):
            raise ValueError(f"layer {index}: cannot carry a residual scale, its block stays stock ({why})")
        attn, why_attn = attention_support(layer.self_attn) if hasattr(layer, "self_attn") else (None, "no self_attn")
        report.add("attention", "patched" if attn else why_attn, index)
        mlp, why_mlp = mlp_support(layer.mlp) if hasattr(layer, "mlp") else (None, "no mlp")
        report.add("mlp", "patched" if mlp else why_mlp, index)
        plan.append((layer, block, attn, mlp))
    norm = getattr(decoder, "norm", None)
    norm_spec, why_norm = norm_numerics(norm) if norm is not None else (None, "no final norm")
    report.add("final norm", "patched" if norm_spec else why_norm, 0)

    handle = TliKernelsHandle(model=model, residual_scales=scales, learnable_layers=learnable, report=report)
    for index, (layer, block, attn, mlp) in enumerate(plan):
        if block is not None:
            handle._blocks[index] = patch_block(
                layer, block, arch, residual_scale=scales.get(index, 1.0), learnable=index in learnable
            )
        if attn is not None:
            patch_attention(layer.self_attn, attn)
            handle._modules.append((layer.self_attn, unpatch_attention))
        if mlp is not None:
            patch_mlp(layer.mlp, mlp, fuse_gate_up)
            handle._modules.append((layer.mlp, unpatch_mlp))
    if norm_spec is not None:
        patch_rms_norm(norm, norm_spec)
        handle._modules.append((norm, unpatch_rms_norm))
    log = logger.info if all(set(report.kinds[k]) <= {"patched"} for k in KINDS) else logger.warning
    log("%s\n  residual scales %s (%s), learnable on %s", report, scales or "none", origin, learnable or "no layer")
    return handle


def fold_residual_scales(model: nn.Module) -> dict[int, float]:
    """Fold every patched layer's alpha != 1 into its weights with the architecture registry's rule (the
    branch outputs' weights and biases, or the post norm that follows a branch; the plan's float32
    arithmetic) and reset alpha to 1, so `save_pretrained` writes a plain checkpoint computing the same
    function. Returns {layer index: alpha folded}."""
    decoder = _decoder(model)
    arch = BY_MODEL_TYPE.get(getattr(getattr(model, "config", None), "model_type", None))
    folded = {}
    for index, layer in enumerate(decoder.layers if decoder is not None else []):
        if not hasattr(layer, ALPHA_NAME):
            continue
        alpha = fold_residual_scale(layer, getattr(layer, "_tli_arch", None) or arch)
        if alpha != 1.0:
            folded[index] = alpha
    if folded:
        logger.info("folded residual scales into the weights: %s", folded)
    return folded
