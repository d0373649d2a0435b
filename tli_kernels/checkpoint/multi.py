"""Several checkpoints of one architecture seen as one layout: `MultiSourceLayout`.

A recipe may take layers from several models (a Goliath-style interleave). Rather than teach the
plan and both engines about several sources, this presents them as one layout with the interface
they already use: `tensors` (name -> TensorEntry, absolute file paths), `files`, `identity()`,
`config`, `side_files`, `path`. Tensor names are qualified by the source's position,
`"1::model.layers.0.mlp.down_proj.weight"`, because every source holds the same names; decoder
layers are numbered globally (source 0's layers first, then source 1's, ...), so a layer map
and `rewrite_config` work on it unchanged.

`check_compatible` runs before anything is planned: same architecture, the same config entries that
fix shapes or what a layer computes, the same tensors with the same shapes, and (unless the output
dtype is set) the same dtypes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from tli_kernels.architectures.structure import DecoderStructure
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.safetensors_format import ARITHMETIC_DTYPES, TensorEntry

SEP = "::"
# Entries that may differ (the output takes the config donor's): said in a warning when they do.
# Anything else that differs is bookkeeping (names, token ids, dtype) and passes silently.
WARN_IF_DIFFERENT = (
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "max_position_embeddings",
    "sliding_window",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)


@dataclass
class NamedSource:
    name: str  # the model as the recipe names it (a folder or a Hub id)
    layout: object  # a CheckpointLayout (or SourceLayout)


def qualify(k: int, name: str) -> str:
    return f"{k}{SEP}{name}"


def check_compatible(sources: list[NamedSource], dtype_set: bool) -> list[str]:
    """Raise CheckpointError naming the models and the entry at fault; return warnings for soft differences."""
    first = sources[0]
    ref_arch = first.layout.architecture
    ref_layer = _layer_shapes(first.layout)
    ref_other = {t.name: tuple(t.shape) for t in first.layout.non_layer_tensors()}
    ref_dtypes = _float_dtypes(first.layout)
    warnings: list[str] = []
    for s in sources[1:]:
        a, b = first.layout.config, s.layout.config
        where = f"models {first.name} and {s.name}"
        arch = s.layout.architecture
        if arch.name != ref_arch.name or arch.describe() != ref_arch.describe():
            raise CheckpointError(
                f"{where} have different architectures ({ref_arch.name} vs {arch.name}): a recipe takes layers "
                f"from models of one architecture",
                s.layout.config_path,
            )
        for key in ref_arch.must_match:
            if a.get(key) != b.get(key):
                raise CheckpointError(
                    f"{where} differ in {key} ({_short(a.get(key))} vs {_short(b.get(key))}): their layers do not fit "
                    f"one model",
                    s.layout.config_path,
                )
        for key in WARN_IF_DIFFERENT:
            if a.get(key) != b.get(key):
                warnings.append(
                    f"{where} differ in {key} ({_short(a.get(key))} vs {_short(b.get(key))}); the output takes "
                    f"the config of the base model"
                )
        layer = _layer_shapes(s.layout)
        if layer != ref_layer:
            suffix = sorted(set(layer.items()) ^ set(ref_layer.items()))[0][0]
            raise CheckpointError(
                f"{where} have different decoder-layer tensors (e.g. {suffix!r}: "
                f"{_short(ref_layer.get(suffix))} vs {_short(layer.get(suffix))})",
                s.layout.path,
            )
        other = {t.name: tuple(t.shape) for t in s.layout.non_layer_tensors()}
        if other != ref_other:
            name = sorted(set(other.items()) ^ set(ref_other.items()))[0][0]
            raise CheckpointError(
                f"{where} differ outside the layers (e.g. {name!r}: {_short(ref_other.get(name))} vs "
                f"{_short(other.get(name))})",
                s.layout.path,
            )
        dtypes = _float_dtypes(s.layout)
        if not dtype_set and dtypes != ref_dtypes:
            raise CheckpointError(
                f"{where} store different dtypes ({', '.join(sorted(ref_dtypes))} vs {', '.join(sorted(dtypes))}): "
                f"set the output dtype (dtype: bfloat16 in the recipe, or --dtype)",
                s.layout.path,
            )
    return warnings


def _layer_shapes(layout) -> dict[str, tuple]:
    """suffix -> shape over all layers (an MoE model may mix dense and expert layers)."""
    out: dict[str, tuple] = {}
    for i in range(layout.num_layers):
        for suffix, t in layout.layer_tensors(i).items():
            out.setdefault(suffix, tuple(t.shape))
    return out


def _float_dtypes(layout) -> set[str]:
    return {t.dtype for t in layout.tensors.values() if t.dtype in ARITHMETIC_DTYPES}


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


class MultiSourceLayout:
    """Several source checkpoints as one layout (see the module docstring)."""

    def __init__(self, sources: list[NamedSource], config: dict, *, config_source: int = 0, side_source: int = 0):
        assert len(sources) > 1, "one source needs no composite"
        self.sources = sources
        self.config = config  # the config donor's, with layer counts and per-layer entries over all layers
        self.config_source = config_source
        donor = sources[side_source].layout
        self.path = donor.path  # where side files (tokenizer, generation config) are copied from
        self.side_files = list(donor.side_files)
        self.index_metadata = None
        self.tensors: dict[str, TensorEntry] = {}
        self.files = {}
        self.layer_offsets: list[int] = []
        layers: list[dict] = []
        for k, s in enumerate(sources):
            for name, header in s.layout.files.items():
                self.files[qualify(k, name)] = header
            for name, t in s.layout.tensors.items():
                self.tensors[qualify(k, name)] = replace(t, name=qualify(k, name))
            self.layer_offsets.append(len(layers))
            for i in range(s.layout.num_layers):
                layers.append(
                    {suffix: self.tensors[qualify(k, t.name)] for suffix, t in s.layout.layer_tensors(i).items()}
                )
        base = sources[config_source].layout._structure()
        names = frozenset(t.name for layer in layers for t in layer.values())
        self._decoder = DecoderStructure(base.architecture, base.prefix, base.count_key, layers, names)

    # ---- the CheckpointLayout interface ------------------------------------------------------
    @property
    def model_type(self) -> str:
        return self.sources[self.config_source].layout.model_type

    @property
    def config_path(self) -> str:
        return self.sources[self.config_source].layout.config_path

    @property
    def architecture(self):
        return self._decoder.architecture

    @property
    def layer_prefix(self) -> str:
        return self._decoder.prefix

    @property
    def num_layers(self) -> int:
        return len(self._decoder.layers)

    def layer_tensors(self, layer: int) -> dict[str, TensorEntry]:
        return self._decoder.layers[layer]

    def global_layer(self, source: int, layer: int) -> int:
        return self.layer_offsets[source] + layer

    def local_layer(self, layer: int) -> tuple[int, int]:
        """(source, layer within it) of a global layer index."""
        k = max(i for i, off in enumerate(self.layer_offsets) if off <= layer)
        return k, layer - self.layer_offsets[k]

    def non_layer_tensors(self) -> list[TensorEntry]:
        k = self.config_source
        return [self.tensors[qualify(k, t.name)] for t in self.sources[k].layout.non_layer_tensors()]

    def _structure(self) -> DecoderStructure:
        return self._decoder

    def check_decoder(self) -> None:
        for s in self.sources:
            s.layout.check_decoder()

    def identity(self) -> dict:
        """Every source's identity, in order, plus their files under qualified names."""
        subs = [{"model": s.name, **s.layout.identity()} for s in self.sources]
        files = {qualify(k, n): rec for k, sub in enumerate(subs) for n, rec in sub.get("files", {}).items()}
        return {
            "path": self.path,
            "config_sha256": subs[self.config_source].get("config_sha256"),
            "files": files,
            "sources": subs,
        }

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())
