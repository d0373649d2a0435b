"""Load a model for training without ever holding it whole: meta build, FSDP2, per-shard reads.

The weights come from a SurgeryPlan. For a finished model folder the plan is the identity (every
tensor a `copy` of itself); for a source folder plus a method (`tli train SRC --method tli ...`) it
is the method's plan, so the upscaled model is trained without being written first ("upscale on
load"). Every output tensor is an op over source tensors with exactly specified float32
arithmetic (plan.py); `op_elements` applies one op to one element range with the Python
executor's own helpers and rounds to the plan's output dtype, so a rank's rows hold exactly what
`tli upscale` would have written there, read back as float32 (the upscale-then-load path).

    model = build_meta_model(plan.config)        # parameters on the meta device, buffers real
    ... fully_shard(...)                          # FSDP2 on the meta model (sharding is metadata)
    materialize(model)                            # to_empty: each rank allocates its own shards
    fill_from_plan(model, source)                 # each rank reads only its rows' bytes

FSDP2 shards every parameter along dim 0 (torch.chunk: ceil(d0 / world) rows per rank), and a row
range of a row-major tensor is one contiguous byte range of its safetensors file, so a rank reads
about 1/world of the bytes. Ops are applied in chunks of `CHUNK_ELEMENTS`, which bounds the
working memory whatever the model size.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from tli_kernels import __version__
from tli_kernels.architectures.registry import EXPERT_FILE_TENSOR, EXPERT_PART, FILE_RENAMES, MOVED_ROUTERS
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.executor_python import _compute_f32, _SourceFiles, bytes_to_f32, f32_to_bytes
from tli_kernels.checkpoint.layout import PROVENANCE_NAME, CheckpointLayout
from tli_kernels.checkpoint.plan import OutShard, OutTensor, SurgeryPlan, TensorOp
from tli_kernels.checkpoint.safetensors_format import ARITHMETIC_DTYPES
from tli_kernels.checkpoint.validate import read_provenance

# 1M elements per op application: ~40 MB of numpy temporaries (the executor's 40 B/element).
CHUNK_ELEMENTS = 1 << 20
STORAGE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


# ------------------------------------------------------------------------------------ the source
@dataclass
class ModelSource:
    """What a run trains: the plan that makes its weights, the layout it reads, its provenance."""

    path: str
    plan: SurgeryPlan
    layout: CheckpointLayout
    provenance: dict | None
    method: str | None = None
    options: dict = field(default_factory=dict)
    # (size, mtime_ns, inode) of every source file when planned: a change before or during the
    # load is refused instead of mixing old and new bytes.
    snapshot: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.plan.config

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model this source builds (the plan's map, or the folder's own)."""
        return len(self.plan.layers) or self.layout.num_layers

    def digest(self) -> str:
        return self.plan.digest()


def identity_plan(layout: CheckpointLayout) -> SurgeryPlan:
    """The plan that loads a finished folder as it is: every tensor a copy of itself."""
    shards = []
    for name, header in layout.files.items():
        tensors = [OutTensor(t.name, t.dtype, t.shape, TensorOp("copy", [t.name])) for t in header.tensors.values()]
        shards.append(OutShard(file=name, tensors=tensors))
    return SurgeryPlan(
        method="load",
        options={},
        source=layout.identity(),
        config=layout.config,
        layers=[],
        shards=shards,
        side_files=list(layout.side_files),
    )


def open_source(
    path: str, method: str | None = None, options: dict | None = None, *, dtype: str = "keep", seed: int = 0
) -> ModelSource:
    """Read the headers of `path` and plan: the identity for a finished folder, else `method`'s plan."""
    layout = CheckpointLayout.open(path)
    snapshot = file_snapshot(layout)
    if method is None:
        if options:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in options)} need --method")
        plan = identity_plan(layout)
        provenance = read_provenance(layout.path)
    else:
        from tli_kernels.methods import CommonOptions, make_plan
        from tli_kernels.upscale import check_numbers

        plan = make_plan(layout, method, CommonOptions(dtype=dtype, seed=seed), **(options or {}))
        check_numbers(plan)  # as tli upscale does: an --alpha float32 cannot hold is refused up front
        provenance = plan.provenance(__version__)
    check_provenance(provenance, len(plan.layers) or layout.num_layers, os.path.join(layout.path, PROVENANCE_NAME))
    return ModelSource(layout.path, plan, layout, provenance, method, dict(options or {}), snapshot)


def check_provenance(provenance: dict | None, num_layers: int, where: str) -> None:
    """Raise naming the file when its injected layers / residual scales do not fit the model."""
    if provenance is None:
        return
    injected = provenance.get("injected_layers")
    if injected is not None:
        if not isinstance(injected, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in injected):
            raise ValueError(f"{where}: injected_layers must be a list of layer indices, found {injected!r:.80}")
        bad = [i for i in injected if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"{where}: names injected layer {bad[0]}, but the model has {num_layers} layers")
    layers = provenance.get("layers")
    if layers is not None and not (isinstance(layers, list) and all(isinstance(e, dict) for e in layers)):
        raise ValueError(f"{where}: 'layers' must be a list of objects")
    scales = provenance.get("residual_scales")
    if scales is not None:
        if not isinstance(scales, dict):
            raise ValueError(f"{where}: residual_scales must be an object {{layer: alpha}}")
        for k, v in scales.items():
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)):
                raise ValueError(f"{where}: residual_scales[{k!r}] = {v!r} is not a finite number")


def file_snapshot(layout: CheckpointLayout) -> dict[str, tuple[int, int, int]]:
    out = {}
    for h in layout.files.values():
        try:
            st = os.stat(h.path)
        except OSError as e:
            raise CheckpointError(f"cannot read source: {e.strerror}", h.path) from e
        out[h.path] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def check_snapshot(source: ModelSource) -> None:
    """Raise if any source file is gone or changed since it was planned."""
    for path, then in source.snapshot.items():
        try:
            st = os.stat(path)
        except OSError as e:
            raise CheckpointError(
                f"source file disappeared during the load ({e.strerror}); nothing was trained", path
            ) from e
        now = (st.st_size, st.st_mtime_ns, st.st_ino)
        if now != then:
            raise CheckpointError(
                f"source file changed between planning and loading (size {then[0]} -> {now[0]}, "
                f"mtime {then[1]} -> {now[1]}); restart the run",
                path,
            )


# ---------------------------------------------------------------------------------- the model
@contextlib.contextmanager
def meta_parameters():
    """Create every nn.Parameter on the meta device while buffers (rotary tables) stay real.

    A parameter costs nothing until `materialize`; the rotary inverse frequencies, which are
    computed in __init__ and not stored in checkpoints, keep their real values.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def hf_config(config: dict):
    """A transformers config object from a config.json dict (as from_pretrained parses it)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config.json: model_type {model_type!r} is not known to this transformers")
    return CONFIG_MAPPING[model_type].from_dict(dict(config))


def build_meta_model(config: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of `config` with its parameters on the meta device (no memory, no init cost)."""
    from transformers import AutoModelForCausalLM

    with meta_parameters():
        model = AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype)
    return model


def materialize(module: nn.Module, device: torch.device | str = "cpu") -> None:
    """Allocate every (local shard of a) parameter on `device`, keeping buffers' values.

    Under FSDP2 `to_empty` allocates only the rank's shards. The contents are undefined until
    filled (fill_from_plan, or a DCP load).
    """
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    # to_empty gives every module attribute its own new tensor, which would untie tied weights
    # (lm_head = embed_tokens): remember the aliases and point them back at the one parameter.
    first: dict[int, str] = {}
    aliases: list[tuple[str, str]] = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    module.to_empty(device=device)
    for alias, name in aliases:
        owner, _, attr = alias.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        target.register_parameter(attr, module.get_parameter(name))
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])


# ---------------------------------------------------------------------------- plan <-> params
@dataclass(frozen=True)
class Piece:
    """One plan tensor inside one model parameter.

    index None: the tensor is the whole parameter. index e: it lies in param[e] (stacked experts),
    starting at row `offset` of that slab (a concatenation such as Mixtral's gate_up_proj).
    """

    tensor: OutTensor
    index: int | None = None
    offset: int = 0


# Checkpoint names -> transformers' fused parameters: MoE checkpoints keep one matrix per expert, which
# transformers 5 stacks into 3-D parameters on load (the registry's MoE entries say how, `MoeNames`).


def filled_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint fills: parameters and persistent buffers (GLM-4-MoE's and DeepSeek-V3's
    router score-correction bias is a buffer saved with the weights)."""
    out: dict[str, torch.Tensor] = dict(model.named_parameters())
    for module_name, module in model.named_modules():
        for name, b in module.named_buffers(recurse=False):
            if b is not None and name not in module._non_persistent_buffers_set:
                out[f"{module_name}.{name}" if module_name else name] = b
    return out


def bind(model: nn.Module, plan: SurgeryPlan) -> dict[str, list[Piece]]:
    """{parameter or persistent buffer name: the plan tensors that fill it}; raises naming any parameter
    left empty or tensor left over. Tied parameters appear once (named_parameters drops duplicates)."""
    params = dict(model.named_parameters())
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(params)
    shapes = {name: tuple(p.shape) for name, p in filled_tensors(model).items()}
    found: dict[str, list[Piece]] = {}
    leftover = []
    for t in plan.tensors():
        piece_name, piece = _place(t, shapes)
        if piece_name is None:
            if t.name not in aliases:  # a tied weight stored twice: the model keeps one (as transformers does)
                leftover.append(t.name)
            continue
        found.setdefault(piece_name, []).append(piece)
    for name, pieces in found.items():
        covered = sum(p.tensor.nbytes // _elem_size(p.tensor) for p in pieces)
        want = int(np.prod(shapes[name], dtype=np.int64))
        if covered != want:
            raise ValueError(f"parameter {name}: the checkpoint's tensors cover {covered} of its {want} elements")
    missing = [n for n in params if n not in found and not _is_alpha(n)]
    if missing:
        raise ValueError(
            f"the checkpoint has no tensor for parameter {missing[0]} ({len(missing)} missing; "
            f"the weights do not match config.json's {plan.config.get('model_type')} model)"
        )
    if leftover:
        raise ValueError(
            f"tensor {leftover[0]} of the checkpoint fits no parameter of the model ({len(leftover)} such)"
        )
    return found


def _place(t: OutTensor, shapes: dict[str, tuple]) -> tuple[str | None, Piece]:
    if t.name in shapes:
        if shapes[t.name] != tuple(t.shape):
            raise ValueError(
                f"tensor {t.name}: shape {list(t.shape)} in the checkpoint, {list(shapes[t.name])} in the model"
            )
        return t.name, Piece(t)
    for in_file, in_model in FILE_RENAMES:
        head = t.name.removesuffix("." + in_file)
        if head != t.name and f"{head}.{in_model}" in shapes:
            return _place(OutTensor(f"{head}.{in_model}", t.dtype, t.shape, t.op), shapes)[0], Piece(t)
    m = EXPERT_FILE_TENSOR.match(t.name)
    if m:
        prefix, expert, part = m.group(1), int(m.group(2)), EXPERT_PART[m.group(3)]
        name = f"{prefix}.mlp.experts.{'down_proj' if part == 'down' else 'gate_up_proj'}"
        if name in shapes:
            offset = t.shape[0] if part == "up" else 0
            return name, Piece(t, index=expert, offset=offset)
    for router in MOVED_ROUTERS:
        head = t.name.removesuffix("." + router)
        if head != t.name and f"{head}.mlp.gate.weight" in shapes:
            return f"{head}.mlp.gate.weight", Piece(t)
    return None, Piece(t)


def _is_alpha(name: str) -> bool:
    return name.endswith("residual_scale") or name.startswith("residual_scales.")


def _elem_size(t: OutTensor) -> int:
    from tli_kernels.checkpoint.safetensors_format import DTYPE_SIZES

    return DTYPE_SIZES[t.dtype]


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the local tensor, the first global row of dim 0 it holds) for a plain or FSDP2-sharded parameter."""
    if not hasattr(param, "to_local"):
        return param.data, 0
    local = param.to_local()
    mesh = param.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    dim0 = param.shape[0]
    chunk = -(-dim0 // world)
    start = min(rank * chunk, dim0)
    assert local.shape[0] == max(0, min(chunk, dim0 - start)), (tuple(local.shape), dim0, rank, world)
    return local, start


# --------------------------------------------------------------------------------- applying ops
def op_elements(t: OutTensor, start: int, count: int, sources) -> np.ndarray:
    """Elements [start, start + count) of output tensor t, as float32 after rounding to t.dtype.

    The one place where plan ops are applied for training: the arithmetic is the Python executor's
    (`_compute_f32`), then the same round-to-nearest-even into the output dtype, then the exact
    widening a float32 load does. `sources` reads source tensors (`read_f32(entry, start, k)`).
    """
    op = t.op
    if op.kind == "zeros" or count == 0:
        return np.zeros(count, dtype=np.float32)
    if t.dtype not in ARITHMETIC_DTYPES:
        raise ValueError(f"tensor {t.name}: dtype {t.dtype} cannot be trained (float tensors only)")
    srcs = [sources.entry(s) for s in op.src]
    if op.kind == "copy" and srcs[0].dtype == t.dtype:
        return sources.read_f32(srcs[0], start, count)  # bytes unchanged: widening is exact
    x = _compute_f32(t, srcs, start, count, sources)
    return bytes_to_f32(f32_to_bytes(x, t.dtype), t.dtype)


def fill_from_plan(model: nn.Module, source: ModelSource, *, progress=None) -> int:
    """Fill each parameter's local rows from the plan; returns the source bytes read (this rank)."""
    bindings = bind(model, source.plan)
    params = filled_tensors(model)
    check_snapshot(source)
    reader = _CountingReader(source.layout)
    with reader, torch.no_grad():
        for name, pieces in bindings.items():
            local, first = local_rows(params[name])
            if local.dtype not in STORAGE_DTYPES:
                raise ValueError(f"parameter {name}: dtype {local.dtype} cannot be filled from a checkpoint")
            _fill_param(local, first, pieces, reader)
            if progress is not None:
                progress(local.numel() * local.element_size())
        reader.check_unchanged()
    check_snapshot(source)
    return reader.bytes_read


def _fill_param(local: torch.Tensor, first: int, pieces: list[Piece], reader) -> None:
    rows = local.shape[0]
    if rows == 0:
        return
    flat = local.view(rows, -1)
    row_elems = flat.shape[1]
    for piece in pieces:
        if piece.index is None:  # the whole parameter: this rank's rows are one element range
            _copy_range(flat.view(-1), piece.tensor, first * row_elems, rows * row_elems, reader)
        elif first <= piece.index < first + rows:  # one slab of a stacked parameter
            slab = flat[piece.index - first].view(local.shape[1], -1)
            n = piece.tensor.shape[0]
            target = slab[piece.offset : piece.offset + n].reshape(-1)
            _copy_range(target, piece.tensor, 0, target.numel(), reader)


def _copy_range(target: torch.Tensor, t: OutTensor, start: int, count: int, reader) -> None:
    assert target.numel() == count and target.is_contiguous()
    for done in range(0, count, CHUNK_ELEMENTS):
        k = min(CHUNK_ELEMENTS, count - done)
        values = torch.from_numpy(op_elements(t, start + done, k, reader))
        target[done : done + k].copy_(values)


class _CountingReader(_SourceFiles):
    """The Python executor's source reader, counting the bytes it reads."""

    def __init__(self, layout: CheckpointLayout):
        super().__init__(layout)
        self.bytes_read = 0

    def read_f32(self, t, start, k):
        self.bytes_read += k * (t.nbytes // max(t.numel, 1))
        return super().read_f32(t, start, k)


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The whole model in one process (no FSDP): build on meta, allocate, fill from the plan."""
    model = build_meta_model(source.config, dtype)
    materialize(model)
    fill_from_plan(model, source)
    model.eval()
    return model


# ------------------------------------------------------------------------ sizes (for --dry-run)
def shard_rows(dim0: int, rank: int, world: int) -> tuple[int, int]:
    """(first row, rows) of rank's FSDP2 shard of a dim-0 of size dim0 (torch.chunk semantics)."""
    chunk = -(-dim0 // world)
    start = min(rank * chunk, dim0)
    return start, max(0, min(chunk, dim0 - start))


def bytes_read_for_rows(t: OutTensor, start: int, count: int, layout: CheckpointLayout) -> int:
    """Source bytes that op_elements reads for elements [start, start + count) of t."""
    if t.op.kind in ("zeros", "fill", "uniform") or count == 0:
        return 0
    return sum(count * (layout.tensors[s].nbytes // max(layout.tensors[s].numel, 1)) for s in t.op.src)
