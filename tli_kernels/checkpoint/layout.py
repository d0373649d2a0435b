"""A Hugging Face checkpoint folder seen through its headers: config, files, tensors, decoder layers.

`CheckpointLayout.open(path)` reads config.json, the index (if sharded) and every safetensors
header, checks them against each other and against the decoder-layer structure the upscaling
methods need, and never reads tensor data.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.safetensors_format import FileHeader, TensorEntry, read_header
from tli_kernels.checkpoint.validate import check_index, check_regular, load_json_object

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PROVENANCE_NAME = "tli_provenance.json"
INCOMPLETE_MARKER = ".tli-incomplete.json"

# Decoder blocks with the Llama residual structure: x + Attn(norm(x)), then + MLP(norm(.)).
# Scaling o_proj/down_proj scales exactly one residual branch only in such pre-norm blocks.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
REQUIRED_LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
# The last linear map of each residual branch: zeroing these makes the block an identity map,
# scaling them by α scales the branch by α.
BRANCH_OUTPUT_TENSORS = (
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
    "mlp.down_proj.weight",
    "mlp.down_proj.bias",
)
# Files that travel with a model folder and are copied unchanged to the output.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class CheckpointLayout:
    path: str
    config: dict
    files: dict[str, FileHeader]  # file name (relative) -> header
    tensors: dict[str, TensorEntry]  # every tensor of the model, in file order
    index_metadata: dict | None = None
    side_files: list[str] = field(default_factory=list)

    # ---- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str) -> CheckpointLayout:
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise CheckpointError("no such directory", path)
        if not os.path.isdir(path):
            raise CheckpointError("not a directory (give the model folder, not a file)", path)
        if os.path.exists(os.path.join(path, INCOMPLETE_MARKER)):
            raise CheckpointError(
                f"this folder is an unfinished tli output ({INCOMPLETE_MARKER} present); "
                "finish it with --resume or delete it",
                path,
            )
        config = _read_json(os.path.join(path, CONFIG_NAME), what="config")
        index_path = os.path.join(path, INDEX_NAME)
        if os.path.exists(index_path):
            files, tensors, meta = _open_sharded(path, index_path)
        else:
            files, meta = _open_single(path), None
            tensors = {n: t for h in files.values() for n, t in h.tensors.items()}
        side = [f for f in SIDE_FILES if os.path.lexists(os.path.join(path, f))]
        for f in side:  # copied at the end of a run: a FIFO or device would hang or never end there
            check_regular(os.path.join(path, f), f)
        return cls(path=path, config=config, files=files, tensors=tensors, index_metadata=meta, side_files=side)

    # ---- decoder structure ----------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def num_layers(self) -> int:
        n = self.config.get("num_hidden_layers")
        if not isinstance(n, int) or n < 1:
            raise CheckpointError(f"num_hidden_layers is {n!r}, not a positive integer", self.config_path)
        return n

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, CONFIG_NAME)

    def layer_tensors(self, layer: int) -> dict[str, TensorEntry]:
        """suffix -> tensor for decoder layer `layer` (suffix e.g. 'self_attn.q_proj.weight')."""
        return self._layers()[layer]

    def non_layer_tensors(self) -> list[TensorEntry]:
        return [t for n, t in self.tensors.items() if not LAYER_PATTERN.match(n)]

    def _layers(self) -> list[dict[str, TensorEntry]]:
        cached = getattr(self, "_layer_cache", None)
        if cached is None:
            cached = [dict() for _ in range(self.num_layers)]
            for name, t in self.tensors.items():
                m = LAYER_PATTERN.match(name)
                if m:
                    i = int(m.group(1))
                    if i >= len(cached):
                        raise CheckpointError(
                            f"layer index {i} but config.json says num_hidden_layers={len(cached)}",
                            t.file,
                            name,
                        )
                    cached[i][m.group(2)] = t
            self._layer_cache = cached
        return cached

    def check_decoder(self) -> None:
        """Raise unless this is a Llama-family decoder whose layers all have the same tensors."""
        if self.config.get("quantization_config"):
            method = self.config["quantization_config"].get("quant_method", "?")
            raise CheckpointError(
                f"quantized checkpoints ({method}) are not supported: upscale the unquantized model",
                self.config_path,
            )
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"unsupported architecture model_type={self.model_type!r} "
                f"({', '.join(self.config.get('architectures') or [])}): tli needs a pre-norm "
                f"Llama-family decoder, one of {', '.join(SUPPORTED_MODEL_TYPES)}",
                self.config_path,
            )
        layers = self._layers()
        first = layers[0]
        missing = [s for s in REQUIRED_LAYER_TENSORS if s not in first]
        if missing:
            raise CheckpointError(
                f"decoder layer 0 lacks {', '.join('model.layers.0.' + s for s in missing)}; not a Llama-style block",
                self.path,
            )
        for i, layer in enumerate(layers[1:], start=1):
            if layer.keys() != first.keys():
                diff = sorted(set(first) ^ set(layer))
                raise CheckpointError(
                    f"layer {i} has different tensors than layer 0 (e.g. {diff[0]!r})",
                    self.path,
                    f"model.layers.{i}.{diff[0]}",
                )
            for suffix, t in layer.items():
                t0 = first[suffix]
                if (t.dtype, t.shape) != (t0.dtype, t0.shape):
                    raise CheckpointError(
                        f"{t.dtype}{list(t.shape)} differs from layer 0's {t0.dtype}{list(t0.shape)}",
                        t.file,
                        t.name,
                    )

    # ---- identity, for provenance and resume -----------------------------------------------
    def identity(self) -> dict:
        """The source's identity record (sources.py): config, side files, and per weight file its
        size, header hash and a sampled content hash. Goes into the plan and its digest."""
        from tli_kernels.checkpoint.sources import source_identity

        return source_identity(self)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())


def _read_json(path: str, what: str) -> dict:
    """A JSON object from path, through the one validation layer (validate.py): regular files only,
    strict UTF-8, nesting and number limits, every failure naming the file."""
    try:
        return load_json_object(path, what)
    except FileNotFoundError:
        raise CheckpointError(
            f"missing {os.path.basename(path)} (is this a Hugging Face model folder?)", path
        ) from None


def _open_single(path: str) -> dict[str, FileHeader]:
    single = os.path.join(path, SINGLE_NAME)
    candidates = [single] if os.path.exists(single) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if len(candidates) == 1:
        return {os.path.basename(candidates[0]): read_header(candidates[0])}
    if len(candidates) > 1:
        raise CheckpointError(
            f"{len(candidates)} safetensors files but no {INDEX_NAME} to say which tensor is where", path
        )
    pickles = [
        os.path.basename(p) for p in glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
    ]
    if pickles:
        raise CheckpointError(
            f"only pickle weights ({pickles[0]}): not supported, convert the model to safetensors first "
            "(transformers: model.save_pretrained(dir, safe_serialization=True))",
            path,
        )
    raise CheckpointError("no model.safetensors or *.safetensors weights found", path)


def _open_sharded(path: str, index_path: str):
    index = _read_json(index_path, what="index")
    weight_map = check_index(index, index_path)
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    files: dict[str, FileHeader] = {}
    for fname in sorted(by_file):
        fpath = os.path.join(path, fname)
        if not os.path.lexists(fpath):
            first = by_file[fname][0]
            raise CheckpointError(
                f"index names file {fname!r} (for {len(by_file[fname])} tensors, e.g. {first!r}) but it does not exist",
                index_path,
            )
        files[fname] = read_header(fpath)
    tensors: dict[str, TensorEntry] = {}
    for fname, header in files.items():
        listed = set(by_file[fname])
        for name in by_file[fname]:
            if name not in header.tensors:
                raise CheckpointError(f"index says it is in {fname} but that file does not hold it", index_path, name)
        for name, t in header.tensors.items():
            if name not in listed:
                raise CheckpointError("file holds this tensor but the index does not list it there", header.path, name)
            tensors[name] = t
    return files, tensors, index.get("metadata")
