"""`upscale_model(model, method, **options)`: the upscaling methods on a model already in memory.

For notebook users who load, upscale and train in one process. The model's state dict is seen as a
checkpoint layout (names, dtypes, shapes, and config.json from model.config), the method makes the
same SurgeryPlan it makes for a folder, and a new model of the rewritten config is built on the
meta device and filled tensor by tensor through the same op function as training's loader
(`sharded_load.op_elements`: the plan's exact float32 arithmetic and round-to-nearest-even into
each tensor's dtype). So the result equals writing the model with save_pretrained, running
`tli upscale` and loading the output in the same dtype.

    from tli_kernels import upscale_model
    big = upscale_model(model, "tli", k=2, init="zero")       # model is left unchanged
    big.tli_provenance["injected_layers"]                      # what was injected where
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import nn

from tli_kernels import __version__
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.safetensors_format import TensorEntry
from tli_kernels.training.sharded_load import (
    STORAGE_DTYPES,
    _fill_param,
    bind,
    build_meta_model,
    filled_tensors,
    materialize,
)

MEMORY = "<memory>"


class MemoryLayout(CheckpointLayout):
    """A CheckpointLayout over tensors in memory (no files); identity() hashes config and shapes."""

    def identity(self) -> dict:
        shapes = json.dumps([(n, t.dtype, list(t.shape)) for n, t in self.tensors.items()]).encode()
        config = json.dumps(self.config, sort_keys=True, default=str).encode()
        return {
            "path": MEMORY,
            "config_sha256": hashlib.sha256(config).hexdigest(),
            "tensors_sha256": hashlib.sha256(shapes).hexdigest(),
        }


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as a checkpoint would hold them: tied copies once, float dtypes only."""
    state = {}
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue  # a tied weight (lm_head = embed_tokens): checkpoints store it once
        seen[id(p)] = name
        if p.dtype not in STORAGE_DTYPES:
            raise ValueError(f"parameter {name}: dtype {p.dtype} is not a float dtype tli can upscale")
        state[name] = p.detach()
    for name, b in model.named_buffers():
        key = name.rsplit(".", 1)
        module = model.get_submodule(key[0]) if len(key) == 2 else model
        if key[-1] not in module._non_persistent_buffers_set:
            state[name] = b.detach()
    return state


def layout_of(model: nn.Module) -> tuple[MemoryLayout, dict[str, torch.Tensor]]:
    state = model_state(model)
    config = model.config.to_dict()
    tensors = {
        name: TensorEntry(name, STORAGE_DTYPES[t.dtype], tuple(t.shape), MEMORY, 0, t.numel() * t.element_size())
        for name, t in state.items()
    }
    return MemoryLayout(path=MEMORY, config=config, files={}, tensors=tensors), state


class _MemorySources:
    """The reader interface op_elements uses (entry, read_f32), over in-memory tensors."""

    def __init__(self, layout: MemoryLayout, state: dict[str, torch.Tensor]):
        self.layout, self.state = layout, state

    def entry(self, name: str) -> TensorEntry:
        return self.layout.tensors[name]

    def read_f32(self, t: TensorEntry, start: int, k: int) -> np.ndarray:
        flat = self.state[t.name].reshape(-1)[start : start + k]
        return flat.to(device="cpu", dtype=torch.float32).numpy()  # bf16/f16 -> f32 is exact


def upscale_model(model: nn.Module, method: str, *, dtype: str = "keep", seed: int = 0, **options) -> nn.Module:
    """A new, upscaled model (the input is not changed); options are the method's (k, init, alpha, ...).

    dtype: "keep" or bf16 / fp16 / fp32 for the new model's float tensors (as tli upscale --dtype).
    The plan's provenance is attached as `model.tli_provenance` (injected layers, residual scales).
    """
    from tli_kernels.methods import CommonOptions, make_plan

    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise ValueError(f"{type(model).__name__}: not a transformers model (it has no .config)")
    layout, state = layout_of(model)
    plan = make_plan(layout, method, CommonOptions(dtype=dtype, seed=seed), **options)
    sources = _MemorySources(layout, state)
    out_dtypes = {t.dtype for t in plan.tensors()}
    torch_dtype = next(d for d, name in STORAGE_DTYPES.items() if name == sorted(out_dtypes)[0])
    device = next(iter(state.values())).device
    new = build_meta_model(plan.config, dtype=torch_dtype)
    materialize(new, "cpu")
    with torch.no_grad():
        params = filled_tensors(new)
        for name, pieces in bind(new, plan).items():
            target = params[name]
            dtypes = {p.tensor.dtype for p in pieces}
            if len(dtypes) == 1 and STORAGE_DTYPES[target.dtype] != next(iter(dtypes)):
                target.data = torch.empty(target.shape, dtype=_torch_dtype(next(iter(dtypes))))
            _fill_param(target.data, 0, pieces, sources)
    new.to(device)
    new.train(model.training)
    new.tli_provenance = plan.provenance(__version__)
    return new


def _torch_dtype(name: str) -> torch.dtype:
    return next(d for d, n in STORAGE_DTYPES.items() if n == name)
