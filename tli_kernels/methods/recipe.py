"""mergekit passthrough recipes: read one, check it, compile it to a SurgeryPlan, and write one back.

A recipe is the YAML `mergekit-yaml` takes. tli runs `merge_method: passthrough` (layers copied,
optionally scaled; never combined) with mergekit 0.1.5's semantics, read from its source and checked
side by side (tests/methods/test_recipe_mergekit.py, benchmarks/bench_recipe.py):

- `slices` in order, one source each: `model` + `layer_range: [first, last + 1)` (half-open);
  `models:` with one model means every layer of it (a dtype conversion, say).
- The embeddings come from the first slice's model, the tensors after the layers (final norm,
  lm_head) from the last slice's; config.json from `base_model`, else the first slice's model.
- `parameters: scale` is a number, a gradient (numbers interpolated over a slice's layers at
  t = i / (n - 1), t = 1 for a one-layer slice) or a list of `{filter, value}` where the first entry
  whose filter is a substring of the *source* tensor name (or that has no filter, or `*`) wins.
  Precedence: the source's parameters, then the slice's, then the recipe's. The first slice's
  settings (at t = 0) apply to the embeddings, the last slice's (t = 0) to the final norm and head.
- `dtype`: what tensors are cast to; `out_dtype`: what is written (default: `dtype`).
- `tokenizer_source`: base / union / a model. tli copies one model's tokenizer files unchanged, so it
  refuses where mergekit would build a new vocabulary: the models supplying the embeddings and the
  head must have the tokenizer's vocabulary.

Known differences from mergekit (docs/recipes.md): a scale of 0 writes +0.0 (a hole) where mergekit
writes -0.0 for negative weights (a tensor both cast to a narrower dtype and scaled is rounded as
mergekit rounds it, cast then product: the scale op's pre_round); without `base_model`
mergekit takes config and tokenizer from an arbitrary one of the models (a set's order), tli from the
first slice's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import reprlib
import sys
from dataclasses import dataclass, field, replace

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.hub import ModelRef, open_source
from tli_kernels.checkpoint.multi import MultiSourceLayout, NamedSource, check_compatible, qualify
from tli_kernels.checkpoint.plan import OutTensor, SurgeryPlan, TensorOp
from tli_kernels.checkpoint.validate import check_regular, read_regular
from tli_kernels.methods.common import (
    DTYPE_CONFIG_NAMES,
    DTYPE_OPTIONS,
    PER_LAYER_CONFIG_KEYS,
    CommonOptions,
    OutLayer,
    _refuse_unknown_layer_entries,
    build_plan,
    out_dtype,
    per_layer_values,
)

METHOD = "recipe"
RECIPE_SUFFIXES = (".yml", ".yaml")
# mergekit dtype names (a "torch." prefix is accepted too) -> safetensors dtype
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_OPTION_OF = {v: k for k, v in DTYPE_OPTIONS.items() if v}  # "BF16" -> "bf16"
TOP_KEYS = (
    "slices",
    "models",
    "merge_method",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
)
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


# ---- the recipe as data -------------------------------------------------------------------------
@dataclass
class Source:
    model: str
    start: int
    end: int | None  # None: every layer (the `models:` form)
    parameters: dict | None = None


@dataclass
class Slice:
    source: Source
    parameters: dict | None = None


@dataclass
class Recipe:
    slices: list[Slice]
    base_model: str | None = None
    parameters: dict | None = None
    dtype: str | None = None  # safetensors dtype name
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "base", "union", or a model
    whole_model: bool = False  # written with `models:`
    warnings: list[str] = field(default_factory=list)

    def models(self) -> list[str]:
        """Every model the recipe names, slices first, in order of first mention."""
        names = [s.source.model for s in self.slices]
        names += [m for m in (self.base_model, self.tokenizer_source) if m and m not in ("base", "union")]
        return list(dict.fromkeys(names))

    def to_dict(self) -> dict:
        """The recipe in mergekit's own shape (what `mergekit-yaml` reads), normalised."""
        out: dict = {}
        if self.whole_model:
            src = self.slices[0].source
            out["models"] = [_drop_none({"model": src.model, "parameters": src.parameters})]
        else:
            out["slices"] = [
                _drop_none(
                    {
                        "sources": [
                            _drop_none(
                                {
                                    "model": s.source.model,
                                    "layer_range": [s.source.start, s.source.end],
                                    "parameters": s.source.parameters,
                                }
                            )
                        ],
                        "parameters": s.parameters,
                    }
                )
                for s in self.slices
            ]
        out["merge_method"] = "passthrough"
        for key, value in (
            ("base_model", self.base_model),
            ("parameters", self.parameters),
            ("dtype", DTYPE_CONFIG_NAMES.get(self.dtype or "")),
            ("out_dtype", DTYPE_CONFIG_NAMES.get(self.out_dtype or "")),
            ("tokenizer_source", self.tokenizer_source),
        ):
            if value is not None:
                out[key] = value
        return out


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


# ---- reading --------------------------------------------------------------------------------------
def is_recipe_path(src: str) -> bool:
    """src names a recipe file (.yml/.yaml). A special file of that name (a FIFO, a device) is refused
    here, before anything reads it, rather than taken for a model folder."""
    if not (isinstance(src, str) and src.lower().endswith(RECIPE_SUFFIXES) and os.path.lexists(src)):
        return False
    if os.path.isdir(src):
        return False
    check_regular(src, "recipe")
    return True


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few KB; mergekit's largest published ones are ~20 KB
MAX_ALIAS_NODES = 10_000  # YAML nodes that aliases (*name) may add in all: a 500-byte alias bomb adds 10^9
MAX_NESTING = 64  # lists and mappings inside each other; deeper overflows Python's recursion when built


def load_recipe(path: str) -> Recipe:
    import yaml

    raw = read_regular(path, "recipe", limit=MAX_RECIPE_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the recipe is not UTF-8 text (byte {e.start})") from None
    try:
        obj = yaml.load(text, Loader=_bounded_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or e}{where})") from e
    try:
        return parse_recipe(obj)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _bounded_loader():
    """yaml.SafeLoader that refuses a document whose aliases would add more than MAX_ALIAS_NODES nodes
    (a recipe may reuse a model name with &m / *m; an alias bomb is refused before it is expanded)."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self._alias_nodes = 0
            self._sizes: dict[int, int] = {}

        def _size(self, node) -> int:
            key = id(node)
            if key not in self._sizes:
                self._sizes[key] = 1  # a recursive alias counts once
                if isinstance(node, yaml.SequenceNode):
                    self._sizes[key] = 1 + sum(self._size(n) for n in node.value)
                elif isinstance(node, yaml.MappingNode):
                    self._sizes[key] = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
            return self._sizes[key]

        def compose_node(self, parent, index):
            self._depth = getattr(self, "_depth", 0) + 1
            try:
                if self._depth > MAX_NESTING:
                    raise yaml.composer.ComposerError(
                        None, None, f"nested more than {MAX_NESTING} levels deep; a recipe needs a handful",
                        self.peek_event().start_mark,
                    )  # fmt: skip
                return self._compose_bounded(parent, index)
            finally:
                self._depth -= 1

        def _compose_bounded(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                node = self.anchors.get(event.anchor)
                if node is not None:
                    self._alias_nodes += self._size(node)
                    if self._alias_nodes > MAX_ALIAS_NODES:
                        raise yaml.composer.ComposerError(
                            None, None,
                            f"its aliases (*{event.anchor} and others) expand to more than {MAX_ALIAS_NODES} "
                            "values (a YAML alias bomb?); refused before expanding them",
                            event.start_mark,
                        )  # fmt: skip
            return super().compose_node(parent, index)

    return BoundedLoader


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 2, 60, 60, 4, 4


def _short(value) -> str:
    """A recipe value as a message shows it: bounded (reprlib), never the whole of a huge value."""
    return _SHORT.repr(value)


def parse_recipe(obj) -> Recipe:
    """Check a recipe (the parsed YAML) and normalise it; raise ValueError naming the key at fault."""
    if not isinstance(obj, dict):
        raise ValueError("a recipe is a YAML mapping (slices:, merge_method: passthrough, ...)")
    method = obj.get("merge_method")
    if method is None:
        raise ValueError("no merge_method: tli runs passthrough recipes (merge_method: passthrough)")
    if method != "passthrough":
        raise ValueError(
            f"merge_method {_short(method)}: tli runs passthrough recipes only (layers copied or scaled, never "
            f"combined); run {method} with mergekit"
        )
    warnings = [
        f"recipe key {_short(k)} is not one tli reads; ignored (as mergekit does)" for k in obj if k not in TOP_KEYS
    ]
    if "modules" in obj:
        raise ValueError("modules: (per-module recipes of multimodal models) is not supported; use slices:")
    for key in ("chat_template",):
        if obj.get(key) is not None:
            raise ValueError(
                f"{key}: tli copies one model's tokenizer files unchanged; remove the key and set the "
                "template in tokenizer_config.json afterwards"
            )
    given = [k for k in ("slices", "models") if obj.get(k)]
    if len(given) != 1:
        raise ValueError("a recipe needs exactly one of slices: or models:")
    base = _model_name(obj.get("base_model"), "base_model") if obj.get("base_model") is not None else None
    recipe = Recipe(slices=[], base_model=base, warnings=warnings)
    recipe.parameters = _parameters(obj.get("parameters"), "parameters", warnings)
    if given[0] == "slices":
        recipe.slices = _slices(obj["slices"], warnings)
    else:
        models = obj["models"]
        if not isinstance(models, list) or len(models) != 1:
            n = len(models) if isinstance(models, list) else "?"
            raise ValueError(
                f"models: has {n} entries: passthrough copies one model this way (use slices: to take layers "
                "from several)"
            )
        entry = models[0] if isinstance(models[0], dict) else {"model": models[0]}
        name = _model_name(entry.get("model"), "models[0].model")
        if base is not None and base != name:
            raise ValueError(f"models: copies {name} but base_model is {base}: passthrough takes one model")
        params = _parameters(entry.get("parameters"), "models[0].parameters", warnings)
        recipe.slices = [Slice(Source(name, 0, None, params))]
        recipe.whole_model = True
    recipe.dtype = _dtype(obj.get("dtype"), "dtype")
    recipe.out_dtype = _dtype(obj.get("out_dtype"), "out_dtype")
    recipe.tokenizer_source = _tokenizer_source(obj)
    if recipe.tokenizer_source == "base" and base is None:
        raise ValueError("tokenizer_source: base needs a base_model")
    return recipe


def _model_name(value, where: str) -> str:
    if isinstance(value, dict):  # mergekit's long form: {model: {path, revision}, lora: ...}
        if value.get("lora"):
            raise ValueError(f"{where}: LoRA adapters are not supported; merge the adapter first")
        inner = value.get("model", value)
        if isinstance(inner, dict):
            path, rev = inner.get("path"), inner.get("revision")
            value = f"{path}@{rev}" if rev else path
        else:
            value = inner
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a model folder or Hub id, got {_short(value)}")
    ModelRef.parse(value, where)  # refuse LoRA (+) and bad @ early
    return value.strip()


def _slices(value, warnings: list[str]) -> list[Slice]:
    if not isinstance(value, list) or not value:
        raise ValueError("slices: must be a non-empty list")
    out = []
    for n, sl in enumerate(value, 1):
        where = f"slice {n}"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list):
            raise ValueError(f"{where}: expected a mapping with sources:")
        for key in sl:
            if key not in ("sources", "parameters", "base_model", "residual_weight"):
                warnings.append(f"{where}: key {_short(key)} is not one tli reads; ignored")
        if sl.get("residual_weight") is not None:
            warnings.append(f"{where}: residual_weight has no effect on passthrough (mergekit ignores it too)")
        sources = sl["sources"]
        if len(sources) != 1:
            raise ValueError(
                f"{where} has {len(sources)} sources: passthrough takes exactly one per slice (several sources "
                "would be merged tensor by tensor, which tli does not do)"
            )
        src = sources[0]
        if not isinstance(src, dict):
            raise ValueError(f"{where}: a source is a mapping with model: and layer_range:")
        name = _model_name(src.get("model"), f"{where}: model")
        rng = src.get("layer_range")
        if (
            not isinstance(rng, list | tuple)
            or len(rng) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
        ):
            raise ValueError(f"{where}: layer_range {_short(rng)}: expected [first, last + 1] (half-open, as mergekit)")
        a, b = rng
        if a < 0 or b <= a:
            raise ValueError(
                f"{where}: layer_range [{a}, {b}] is empty or negative (it is half-open: [first, last + 1])"
            )
        params = _parameters(src.get("parameters"), f"{where}: source parameters", warnings)
        out.append(
            Slice(Source(name, a, b, params), _parameters(sl.get("parameters"), f"{where}: parameters", warnings))
        )
    return out


def _dtype(value, key: str) -> str | None:
    if value is None:
        return None
    name = str(value)
    name = name[len("torch.") :] if name.startswith("torch.") else name
    if name not in DTYPE_NAMES:
        raise ValueError(f"{key} {_short(value)}: tli writes {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def _tokenizer_source(obj: dict) -> str | None:
    src, tok = obj.get("tokenizer_source"), obj.get("tokenizer")
    if src is not None and tok is not None:
        raise ValueError("give tokenizer_source: or tokenizer:, not both")
    if tok is not None:
        if not isinstance(tok, dict):
            raise ValueError("tokenizer: expected a mapping with source:")
        for key in ("tokens", "pad_to_multiple_of"):
            if tok.get(key):
                raise ValueError(
                    f"tokenizer: {key} adds or resizes embedding rows; tli copies one model's tokenizer and "
                    "embeddings unchanged"
                )
        src = tok.get("source", "union")
    if src is None or src in ("base", "union"):
        return src
    return _model_name(src, "tokenizer_source")


# ---- parameters (mergekit's evaluate_setting, for numbers) ---------------------------------------
def _number(value, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: {_short(value)} is not a number")
    if isinstance(value, int | float):
        x = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; mergekit's validator takes it
        try:
            x = float(value)
        except ValueError:
            raise ValueError(f"{where}: {_short(value)} is not a number") from None
    else:
        raise ValueError(f"{where}: {_short(value)} is not a number")
    if not math.isfinite(x):
        raise ValueError(f"{where}: {_short(value)} is not a finite number")
    return x


def _setting(value, where: str):
    """Normalise one parameter setting: a number, a gradient [numbers], or [{filter, value}]."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value:
            return []
        if all(not isinstance(e, dict) for e in value):
            return [_number(e, where) for e in value]
        conds = []
        for e in value:
            if not isinstance(e, dict) or "value" not in e:
                raise ValueError(f"{where}: expected a list of {{filter, value}} entries, got {_short(e)}")
            stray = [k for k in e if k not in ("filter", "value")]
            if stray:
                raise ValueError(f"{where}: unknown key {_short(stray[0])} in a {{filter, value}} entry")
            flt = e.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ValueError(f"{where}: filter {_short(flt)} must be a string")
            inner = _setting(e["value"], where)
            if isinstance(inner, list) and inner and isinstance(inner[0], dict):
                raise ValueError(f"{where}: a filter's value must be a number or a gradient")
            conds.append({"filter": flt, "value": inner} if flt is not None else {"value": inner})
        return conds
    return _number(value, where)


def _parameters(value, where: str, warnings: list[str]) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping such as {{scale: 0.5}}")
    out = {}
    for name, setting in value.items():
        if name != "scale":
            warnings.append(f"{where}: parameter {_short(name)} has no effect on passthrough (only scale does)")
            continue
        out[name] = _setting(setting, f"{where}: scale")
    return out or None


def evaluate_setting(setting, tensor_name: str, t: float) -> float | None:
    """mergekit's evaluate_setting for numeric values (config.py there): same order, same arithmetic."""
    if isinstance(setting, float | int):
        return float(setting)
    if not setting:
        return None
    if not isinstance(setting[0], dict):  # a gradient
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return float((1 - frac) * setting[i0] + frac * setting[i1])
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t)
    return None


def resolve_scale(scopes: list[dict | None], tensor_name: str, t: float) -> float | None:
    """The first scope (source, slice, recipe) whose scale gives a value for this source tensor."""
    for scope in scopes:
        if scope and "scale" in scope:
            value = evaluate_setting(scope["scale"], tensor_name, t)
            if value is not None:
                return value
    return None


def _op(src: str, factor: float | None, src_dtype: str, merge_dtype: str | None) -> TensorOp:
    if factor is None or factor == 1.0:
        return TensorOp("copy", src=[src])
    if factor == 0.0:
        return TensorOp("zeros")  # mergekit's x * 0 is -0.0 for negative x; a hole reads +0.0
    # mergekit casts to `dtype` and then scales: two roundings where the cast narrows the source.
    narrowing = merge_dtype in ("BF16", "F16") and src_dtype != merge_dtype
    return TensorOp("scale", src=[src], factor=factor, pre_round=merge_dtype if narrowing else "")


# ---- compiling ------------------------------------------------------------------------------------
def compile_recipe(recipe: Recipe, common: CommonOptions | None = None, *, opener=None):
    """(layout, plan, warnings): the recipe's SurgeryPlan over its source(s), checked before anything
    is written. `opener(ModelRef)` opens a model (default: a folder or a Hub id)."""
    common = common or CommonOptions()
    opener = opener or (lambda ref: open_source(ref, "model"))
    warnings = list(recipe.warnings)
    names = recipe.models()
    sources: list[NamedSource] = []
    index_of: dict[str, int] = {}
    by_folder: dict[str, int] = {}
    for name in names:
        layout = opener(ModelRef.parse(name, "model"))
        folder = os.path.realpath(layout.path)
        if folder not in by_folder:  # one model written two ways is read once
            by_folder[folder] = len(sources)
            sources.append(NamedSource(name, layout))
        index_of[name] = by_folder[folder]
    for s in sources:
        s.layout.check_decoder()

    slices = _resolve_ranges(recipe, sources, index_of)
    common = _effective_dtype(recipe, common, sources)
    if len(sources) > 1:
        warnings += check_compatible(sources, dtype_set=common.dtype != "keep")
        prefixes = {s.layout.layer_prefix for s in sources}
        if len(prefixes) > 1:
            raise CheckpointError(f"the models keep their layers under different names ({', '.join(sorted(prefixes))})")
    first, last = index_of[slices[0].source.model], index_of[slices[-1].source.model]
    donor = index_of[recipe.base_model] if recipe.base_model else first
    tok = _tokenizer_donor(recipe, sources, index_of, donor, (first, last))

    if len(sources) == 1:
        layout = sources[0].layout
        qual = lambda k, name: name  # noqa: E731
        glob_layer = lambda k, i: i  # noqa: E731
    else:
        layout = MultiSourceLayout(sources, _composite_config(sources, donor), config_source=donor, side_source=tok)
        qual, glob_layer = qualify, layout.global_layer
        if layout.architecture.proven_by == "instance check":
            for s in sources:  # a generic rule cannot carry unknown per-layer entries across models
                _refuse_unknown_layer_entries(s.layout, [-1])
    arch, prefix = layout.architecture, layout.layer_prefix

    layers: list[OutLayer] = []
    tensors_of: list[list[OutTensor]] = []
    seen: set[tuple[int, int]] = set()
    for sl in slices:
        k = index_of[sl.source.model]
        scopes = [sl.source.parameters, sl.parameters, recipe.parameters]
        n = sl.source.end - sl.source.start
        for idx in range(n):
            i = sl.source.start + idx
            t = idx / (n - 1) if n > 1 else 1.0
            j = len(layers)
            out, scales = [], {}
            for suffix, entry in sources[k].layout.layer_tensors(i).items():
                factor = resolve_scale(scopes, entry.name, t)
                if factor is not None and factor != 1.0:
                    scales[suffix] = factor
                op = _op(qual(k, entry.name), factor, entry.dtype, recipe.dtype)
                out.append(OutTensor(f"{prefix}.{j}.{suffix}", out_dtype(entry.dtype, common), entry.shape, op))
            role = _classify(arch, scales, sources[k].layout.layer_tensors(i))
            if role is None:
                layer = OutLayer("duplicate" if (k, i) in seen else "original", [glob_layer(k, i)])
            else:
                layer = OutLayer("injected", [glob_layer(k, i)], init=role[0], alpha=role[1])
            layer.extra = {"model": k, "layer": i, "scales": scales, "after": glob_layer(k, i)}
            seen.add((k, i))
            layers.append(layer)
            tensors_of.append(out)

    def carry(entry, common_):
        name = entry.name.split("::", 1)[1] if len(sources) > 1 else entry.name
        which = 0 if arch.is_embedding(name) else -1  # embeddings: first slice; final norm, head: last slice
        sl = slices[which]
        k = index_of[sl.source.model]
        src = sources[k].layout.tensors[name]
        factor = resolve_scale([sl.source.parameters, sl.parameters, recipe.parameters], name, 0.0)
        op = _op(qual(k, name), factor, src.dtype, recipe.dtype)
        return OutTensor(name, out_dtype(src.dtype, common_), src.shape, op)

    update = _window_update(sources, donor, layers) if len(sources) > 1 else None
    plan = build_plan(
        layout,
        layers,
        method=METHOD,
        options={"recipe": recipe.to_dict()},
        common=common,
        config_update=update,
        expand_layer=lambda j, layer, c: tensors_of[j],
        carry=carry,
    )
    name_of = {k: s.name for k, s in enumerate(sources)}
    for entry, layer in zip(plan.layers, layers):
        entry["source"] = [layer.extra["layer"]]
        entry["model"] = name_of[layer.extra["model"]]
        if layer.role != "injected" and layer.extra["scales"]:
            entry["scale"] = dict(layer.extra["scales"])
    return layout, plan, warnings


def _resolve_ranges(recipe: Recipe, sources: list[NamedSource], index_of: dict[str, int]) -> list[Slice]:
    out = []
    for n, sl in enumerate(recipe.slices, 1):
        layout = sources[index_of[sl.source.model]].layout
        count = layout.num_layers
        end = count if sl.source.end is None else sl.source.end
        if end > count:
            raise ValueError(
                f"slice {n}: layer_range [{sl.source.start}, {end}] of {sl.source.model}: the model has {count} "
                f"layers (0-{count - 1}); layer_range is half-open, [first, last + 1]"
            )
        out.append(replace(sl, source=replace(sl.source, end=end)))
    return out


def _effective_dtype(recipe: Recipe, common: CommonOptions, sources: list[NamedSource]) -> CommonOptions:
    """The output dtype: out_dtype, else dtype, else --dtype; refuse what a single rounding cannot match."""
    wanted = recipe.out_dtype or recipe.dtype
    flag = DTYPE_OPTIONS[common.dtype]
    if flag and wanted and flag != wanted:
        raise ValueError(
            f"--dtype {common.dtype} contradicts the recipe's {DTYPE_CONFIG_NAMES[wanted]}: drop one of them"
        )
    if recipe.dtype and recipe.out_dtype and recipe.dtype != recipe.out_dtype and recipe.dtype != "F32":
        stored = {t.dtype for s in sources for t in s.layout.tensors.values()}
        if stored - {recipe.dtype}:
            raise ValueError(
                f"dtype {DTYPE_CONFIG_NAMES[recipe.dtype]} with out_dtype {DTYPE_CONFIG_NAMES[recipe.out_dtype]}: "
                f"rounding through {DTYPE_CONFIG_NAMES[recipe.dtype]} and writing another dtype is not supported; "
                "set one of them"
            )
    wanted = wanted or flag
    return replace(common, dtype=_OPTION_OF[wanted]) if wanted else common


def _composite_config(sources: list[NamedSource], donor: int) -> dict:
    """The donor's config with the layer count and per-layer entries running over every source's layers."""
    base = sources[donor].layout
    config = copy.deepcopy(base.config)
    arch = base.architecture
    for key in arch.count_keys:
        if key in config:
            config[key] = sum(s.layout.num_layers for s in sources)
    for key in dict.fromkeys(PER_LAYER_CONFIG_KEYS + arch.per_layer_keys):
        values = [per_layer_values(s.layout, key) for s in sources]
        if all(v is None for v in values):
            continue
        if any(v is None for v in values):
            has = sources[next(i for i, v in enumerate(values) if v is not None)].name
            lacks = sources[next(i for i, v in enumerate(values) if v is None)].name
            raise CheckpointError(f"{key}: model {has} has one entry per layer, model {lacks} has none")
        config[key] = [x for v in values for x in v]
    return config


def _window_update(sources: list[NamedSource], donor: int, layers: list[OutLayer]) -> dict | None:
    """Qwen2's max_window_layers (layers below it use full attention), counted per source model."""
    if not isinstance(sources[donor].layout.config.get("max_window_layers"), int):
        return None
    prefix = 0
    for layer in layers:
        mwl = sources[layer.extra["model"]].layout.config.get("max_window_layers")
        if not (isinstance(mwl, int) and layer.extra["layer"] < mwl):
            break
        prefix += 1
    return {"max_window_layers": prefix}


def _classify(arch, scales: dict[str, float], tensors: dict) -> tuple[str, float] | None:
    """(init, alpha) when a layer's scales are tli's injected-layer rule (zeroed branch outputs, or
    one alpha on the tensors that scale each branch), so training sees it as an injected layer."""
    if not scales:
        return None
    outputs = {s for s in tensors if arch.branch_of(s)}
    if set(scales) == outputs and all(f == 0.0 for f in scales.values()):
        return ("zero", 1.0)
    post = arch.post_norms()
    alpha_tensors = set(arch.alpha_targets(tensors))
    values = set(scales.values())
    if set(scales) == alpha_tensors and len(values) == 1 and not (post and arch.norm_offset):
        return ("copy", values.pop())
    return None


# ---- tokenizers ---------------------------------------------------------------------------------
def vocab_signature(folder: str) -> dict[str, str]:
    """What fixes a tokenizer's vocabulary (ids of tokens), file by file, as hashes; {} without one."""
    sig = {}
    for name in VOCAB_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            raw = f.read()
        if name == "tokenizer.json":  # normaliser, template and padding settings do not change ids
            try:
                obj = json.loads(raw)
                raw = json.dumps([obj.get("model"), obj.get("added_tokens")], sort_keys=True).encode()
            except ValueError:
                pass
        sig[name] = hashlib.sha256(raw).hexdigest()
    return sig


def _tokenizer_donor(recipe: Recipe, sources, index_of, donor: int, vocab_users: tuple[int, int]) -> int:
    """The source whose tokenizer (and generation config) is copied; refuse a vocabulary mismatch."""
    src = recipe.tokenizer_source
    if src is None or src == "base":
        tok = donor
    elif src == "union":
        tok = donor
        vocab_users = tuple(range(len(sources)))
    else:
        tok = index_of[src]
    sig_tok = vocab_signature(sources[tok].layout.path)
    for k in dict.fromkeys(vocab_users):
        sig = vocab_signature(sources[k].layout.path)
        if not sig or not sig_tok or sig == sig_tok:
            continue
        diff = sorted(n for n in set(sig) | set(sig_tok) if sig.get(n) != sig_tok.get(n))
        why = "takes the tokenizer of every model (union)" if src == "union" else "copies the tokenizer of"
        target = "" if src == "union" else f" {sources[tok].name}"
        raise CheckpointError(
            f"the recipe {why}{target}, but {sources[k].name}, whose embeddings or head the output takes, has a "
            f"different vocabulary ({diff[0]} differs): tli copies one tokenizer and the embeddings unchanged; "
            "set tokenizer_source to a model with the same vocabulary"
        )
    return tok


# ---- the entry point for `tli upscale RECIPE.yml` / `tli plan RECIPE.yml` -------------------------
def plan_recipe_file(path: str, common: CommonOptions | None = None, *, quiet: bool = False):
    """(layout, plan) of a recipe file; warnings go to stderr."""
    recipe = load_recipe(path)
    layout, plan, warnings = compile_recipe(recipe, common)
    if not quiet:
        for w in dict.fromkeys(warnings):
            print(f"tli: warning: {w}", file=sys.stderr)
    return layout, plan


# ---- writing a plan back as a recipe --------------------------------------------------------------
def plan_to_recipe(plan: SurgeryPlan, layout, model: str | None = None) -> dict:
    """The mergekit passthrough recipe that makes the same tensors as `plan` (sign of zero aside), or a
    ValueError naming the output layer passthrough cannot express. Checked by compiling it back."""
    if plan.method == METHOD:
        return copy.deepcopy(plan.options["recipe"])
    if isinstance(layout, MultiSourceLayout):
        raise ValueError("only a recipe's own plan can be written back when it reads several models")
    if plan.method == "moe-upcycle":
        raise ValueError(
            "moe-upcycle cannot be written as a passthrough recipe: it turns each MLP into experts and adds routers"
        )
    model = model or _model_name_for(layout)
    prefix = layout.layer_prefix
    rows = _layer_rows(plan, layout, prefix)
    slices: list[dict] = []
    prev = None
    for i, factors in rows:
        if prev and prev[1] == factors and prev[0] + 1 == i and not factors:
            slices[-1]["sources"][0]["layer_range"][1] = i + 1
        else:
            source = {"model": model, "layer_range": [i, i + 1]}
            if factors:
                source["parameters"] = {"scale": _filters(factors, layout, i, prefix)}
            slices.append({"sources": [source]})
        prev = (i, factors)
    recipe = {"slices": slices, "merge_method": "passthrough"}
    dtype = DTYPE_OPTIONS.get(plan.options.get("dtype", "keep"))
    if dtype:
        recipe["dtype"] = DTYPE_CONFIG_NAMES[dtype]
    _check_round_trip(plan, layout, recipe)
    return recipe


def _model_name_for(layout) -> str:
    origin = getattr(layout, "origin", None) or {}
    if origin.get("hub_id"):
        return f"{origin['hub_id']}@{origin['commit']}" if origin.get("commit") else origin["hub_id"]
    return layout.path


def _layer_rows(plan: SurgeryPlan, layout, prefix: str) -> list[tuple[int, dict[str, float]]]:
    """Per output layer: (source layer, {suffix: factor != 1}); raise where passthrough cannot say it."""
    from tli_kernels.architectures.spec import layer_name_regex

    rx = layer_name_regex(prefix)
    per_layer: dict[int, dict[str, OutTensor]] = {}
    for t in plan.tensors():
        m = rx.match(t.name)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t
        elif t.op.kind != "copy" or t.op.src != [t.name]:
            raise ValueError(f"output tensor {t.name!r} is not a copy of the source's: passthrough cannot say it")
    rows = []
    for j, entry in enumerate(plan.layers):
        what = f"output layer {j}"
        if entry.get("init") == "random":
            raise ValueError(f"{what} is initialised at random (--init random): a passthrough recipe copies layers")
        if len(entry.get("source", [])) != 1:
            raise ValueError(
                f"{what} averages layers {entry.get('source')} (--init average): a passthrough recipe copies one "
                "layer (scaled or not)"
            )
        i = entry["source"][0]
        factors = {}
        for suffix, t in per_layer.get(j, {}).items():
            op = t.op
            if op.kind == "zeros":
                factors[suffix] = 0.0
                continue
            if op.kind not in ("copy", "scale") or op.src != [layout.layer_name(i, suffix)]:
                raise ValueError(f"{what}: tensor {suffix!r} is not a copy or scale of layer {i}'s")
            if op.kind == "scale":
                if op.offset:
                    raise ValueError(
                        f"{what}: alpha goes into a norm stored as (1 + w) ({suffix}); mergekit's scale multiplies "
                        "the stored weight, so a recipe cannot say this"
                    )
                if op.factor != 1.0:
                    factors[suffix] = op.factor
        rows.append((i, factors))
    return rows


def _filters(factors: dict[str, float], layout, i: int, prefix: str) -> list[dict]:
    """{filter, value} entries matching exactly the scaled tensors of source layer i (mergekit matches a
    filter as a substring of the source tensor name); the short name (o_proj) where it is unambiguous."""
    names = {s: f"{prefix}.{i}.{s}" for s in layout.layer_tensors(i)}
    conds, used = [], set()
    for suffix in sorted(factors):
        f = factors[suffix]
        parts = suffix.split(".")
        short = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]
        for token in (short, "." + suffix):
            if all(factors.get(u, 1.0) == f for u, full in names.items() if token in full):
                break
        if token not in used:
            used.add(token)
            conds.append({"filter": token, "value": f})
    return conds


def _check_round_trip(plan: SurgeryPlan, layout, recipe: dict) -> None:
    common = CommonOptions(
        shard_size=plan.options.get("shard_size", CommonOptions.shard_size),
        dtype=plan.options.get("dtype", "keep"),
        seed=plan.options.get("seed", 0),
    )
    _, again, _ = compile_recipe(parse_recipe(recipe), replace(common, dtype="keep"), opener=lambda ref: layout)

    def ops(p: SurgeryPlan) -> dict:  # pre_round aside: see below
        return {t.name: (t.dtype, tuple(t.shape), {k: v for k, v in t.op.to_json().items() if k != "pre_round"})
                for t in p.tensors()}  # fmt: skip

    want, got = ops(plan), ops(again)
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            raise ValueError(
                f"cannot write this plan as a passthrough recipe: tensor {name!r} would be {got.get(name)} instead "
                f"of {want.get(name)}"
            )
    twice = sum(1 for t in again.tensors() if t.op.pre_round)
    if twice:  # the flags round alpha * w once; mergekit casts first, then scales
        print(
            f"tli: warning: {twice} scaled tensor(s) are also cast to {DTYPE_CONFIG_NAMES.get(recipe_dtype(recipe))}: "
            "mergekit rounds the cast, then the product, where this plan rounds once, so its output may differ "
            "by one unit in the last place there",
            file=sys.stderr,
        )
    if {k: v for k, v in again.config.items()} != plan.config:
        key = sorted(k for k in set(again.config) | set(plan.config) if again.config.get(k) != plan.config.get(k))[0]
        raise ValueError(f"cannot write this plan as a passthrough recipe: config {key!r} would differ")


def recipe_dtype(recipe: dict) -> str | None:
    """The safetensors dtype of a recipe's `dtype` entry (None when it has none)."""
    return _dtype(recipe.get("dtype"), "dtype")


def recipe_yaml(recipe: dict) -> str:
    """YAML in mergekit's style: block lists, [a, b] ranges in flow style, keys in recipe order."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper, data):
        flow = all(isinstance(e, int | float) and not isinstance(e, bool) for e in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    return yaml.dump(recipe, Dumper=Dumper, sort_keys=False, default_flow_style=False)
