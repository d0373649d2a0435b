"""A Hugging Face checkpoint folder seen through its headers: config, files, tensors, decoder layers.

`CheckpointLayout.open(path)` reads config.json, the index (if sharded) and every safetensors
header, checks them against each other and against the decoder-layer structure the upscaling
methods need, and never reads tensor data.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from tli_kernels.architectures.spec import Architecture
from tli_kernels.architectures.structure import DecoderStructure
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.safetensors_format import FileHeader, TensorEntry, read_header
from tli_kernels.checkpoint.validate import check_index, check_regular, load_json_object

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PROVENANCE_NAME = "tli_provenance.json"
INCOMPLETE_MARKER = ".tli-incomplete.json"

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
        value = self.config.get("model_type", "")
        return value if isinstance(value, str) else ""

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, CONFIG_NAME)

    @property
    def architecture(self) -> Architecture:
        """The architecture entry (or proven generic rule) this checkpoint's layers follow."""
        return self._structure().architecture

    @property
    def layer_prefix(self) -> str:
        """Tensor-name prefix of the decoder layers: layer i's tensors are `{prefix}.{i}.*`."""
        return self._structure().prefix

    @property
    def num_layers(self) -> int:
        return len(self._structure().layers)

    def layer_tensors(self, layer: int) -> dict[str, TensorEntry]:
        """suffix -> tensor for decoder layer `layer` (suffix e.g. 'self_attn.q_proj.weight')."""
        return self._structure().layers[layer]

    def layer_name(self, layer: int, suffix: str) -> str:
        return f"{self.layer_prefix}.{layer}.{suffix}"

    def non_layer_tensors(self) -> list[TensorEntry]:
        layered = self._structure().layer_names
        return [t for n, t in self.tensors.items() if n not in layered]

    def _structure(self) -> DecoderStructure:
        cached = self.__dict__.get("_decoder")
        if cached is None:
            cached = DecoderStructure.find(self)
            self.__dict__["_decoder"] = cached
        return cached

    def check_decoder(self) -> None:
        """Raise unless the layers follow a known (or proven) architecture, tensor for tensor."""
        self._structure().check(self)

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
    from tli_kernels.checkpoint.torch_bin import bin_files, open_bin_checkpoint

    if bin_files(path):  # zip-format torch.save files, read in place (torch_bin.py says why)
        return open_bin_checkpoint(path)[0]
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
