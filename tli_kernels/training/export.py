"""Export the model being trained as a normal Hugging Face folder, shard by shard, from every rank.

No rank ever holds the model: the output files are laid out first (the same safetensors headers
and shard packing as `tli upscale`), then every rank writes the rows it owns of each tensor at
their byte offsets (a row range of a row-major tensor is one contiguous byte range), with alpha
folded into each injected layer's branch outputs and float32 rounded to the output dtype by the
project's own round-to-nearest-even (plan.py). The folder follows tli upscale's output protocol:
`.tli-incomplete.json` first, shards as NAME.partial renamed when complete, config.json last,
then the marker removed. It needs a file system every rank sees (as DCP does).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch
from torch import nn

from tli_kernels.checkpoint.executor_python import PARTIAL_SUFFIX, _pwrite_all, f32_to_bytes, fsync_dir
from tli_kernels.checkpoint.layout import CONFIG_NAME, INCOMPLETE_MARKER, INDEX_NAME, PROVENANCE_NAME
from tli_kernels.checkpoint.model_card import CARD_NAME
from tli_kernels.checkpoint.plan import OutShard, OutTensor, SurgeryPlan, pack_shards, write_json_atomic
from tli_kernels.training.distributed import Runtime, agree
from tli_kernels.training.residual import fold_factors
from tli_kernels.training.sharded_load import CHUNK_ELEMENTS, ModelSource, Piece, bind, filled_tensors, local_rows

SAVE_DTYPES = {"keep": None, "fp32": "F32", "bf16": "BF16", "fp16": "F16"}
_CONFIG_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def export_shards(plan: SurgeryPlan, bound: set[str], dtype: str) -> tuple[list[OutShard], bool]:
    """The output shards: the plan's own (same files as tli upscale) unless the dtype changes or a
    tensor has no parameter (a tied copy), in which case the tensors are packed again."""
    target = SAVE_DTYPES[dtype]
    tensors = [t for t in plan.tensors() if t.name in bound]
    same = len(tensors) == sum(1 for _ in plan.tensors()) and all(target in (None, t.dtype) for t in tensors)
    if same:
        return plan.shards, False
    shard_size = max(s.data_bytes for s in plan.shards) if plan.shards else 5_000_000_000
    converted = [OutTensor(t.name, target or t.dtype, t.shape, t.op) for t in tensors]
    return pack_shards(converted, max(shard_size, 1)), True


def export_model(
    lm: nn.Module,
    source: ModelSource,
    folder: str,
    runtime: Runtime,
    *,
    scales: dict[int, float],
    provenance: dict | None,
    extra_json: dict[str, dict],
    dtype: str = "keep",
    training: dict | None = None,
) -> None:
    """Write lm's weights (every rank its rows) into folder as a finished Hugging Face model folder.

    scales: alpha per layer to fold into its branch outputs; extra_json: file name -> object
    written beside (tli_training.json); training: the run's record, for the model card (README.md).
    Collective: every rank must call it.
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"--save-dtype {dtype!r}: choose one of {', '.join(SAVE_DTYPES)}")
    bindings = bind(lm, source.plan)
    where: dict[str, tuple[str, Piece]] = {
        p.tensor.name: (name, p) for name, pieces in bindings.items() for p in pieces
    }
    shards, repacked = export_shards(source.plan, set(where), dtype)
    layout = source.layout
    factors = fold_factors(source.plan.weight_map(), scales, layout.architecture, layout.layer_prefix)
    params = filled_tensors(lm)

    def lay_out() -> None:
        if runtime.main:
            os.makedirs(folder, exist_ok=True)
            write_json_atomic(os.path.join(folder, INCOMPLETE_MARKER), {"what": "tli train export in progress"})
            for shard in shards:
                path = os.path.join(folder, shard.file + PARTIAL_SUFFIX)
                header = shard.header_bytes()
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    _pwrite_all(fd, header, 0, path)
                    os.ftruncate(fd, shard.file_size)
                finally:
                    os.close(fd)

    def write_rows() -> None:
        with torch.no_grad():
            for shard in shards:
                path = os.path.join(folder, shard.file + PARTIAL_SUFFIX)
                fd = os.open(path, os.O_WRONLY)
                try:
                    pos = len(shard.header_bytes())
                    for t in shard.tensors:
                        name, piece = where[t.name]
                        _write_own_part(fd, path, pos, t, piece, params[name], factors.get(t.name))
                        pos += t.nbytes
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def finish() -> None:
        if not runtime.main:
            return
        for shard in shards:
            final = os.path.join(folder, shard.file)
            os.replace(final + PARTIAL_SUFFIX, final)
        if len(shards) > 1:
            total = sum(s.data_bytes for s in shards)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {t.name: s.file for s in shards for t in s.tensors},
            }
            write_json_atomic(os.path.join(folder, INDEX_NAME), index)
        for name in source.plan.side_files:
            shutil.copyfile(os.path.join(source.layout.path, name), os.path.join(folder, name))
        if provenance is not None:
            write_json_atomic(os.path.join(folder, PROVENANCE_NAME), provenance)
        for name, obj in extra_json.items():
            write_json_atomic(os.path.join(folder, name), obj)
        if training is not None:
            stored = sorted({t.dtype for s in shards for t in s.tensors})
            with open(os.path.join(folder, CARD_NAME), "w", encoding="utf-8") as f:
                f.write(training_card(training, stored))
        config = dict(source.plan.config)
        if repacked and SAVE_DTYPES[dtype]:
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "dtype":
                    config[key] = _CONFIG_DTYPE[SAVE_DTYPES[dtype]]
        write_json_atomic(os.path.join(folder, CONFIG_NAME), config)
        fsync_dir(folder)
        os.unlink(os.path.join(folder, INCOMPLETE_MARKER))
        fsync_dir(folder)

    agree(runtime, lay_out)
    agree(runtime, write_rows)
    agree(runtime, finish)


def training_card(training: dict, stored_dtypes: list[str]) -> str:
    """README.md of a training export: what was trained from what, on which data, how far, the
    held-out losses, and why scoring this folder gives a slightly different number than the run."""
    import yaml

    from tli_kernels.checkpoint.hub import hub_id_of_folder

    base = training.get("base_model") or "?"
    hub = hub_id_of_folder(base) if os.path.isdir(base) else None
    front = {"base_model": [hub] if hub else None, "tags": ["tli", "continued-pretraining"]}
    front["library_name"] = "transformers"
    meta = yaml.safe_dump({k: v for k, v in front.items() if v}, sort_keys=False).rstrip()
    method = training.get("method")
    made = f", upscaled on load with `--method {method}` {training.get('method_options')}" if method else ""
    lines = [
        "---", meta, "---",
        f"# {os.path.basename(base.rstrip('/'))}, trained with tli",
        "",
        f"Continued pretraining with tli {training.get('version')} of `{base}`{made}: {training.get('step')} "
        f"optimizer steps, {training.get('tokens', 0):,} tokens of {training.get('train_data')}, "
        f"{training.get('trainable_parameters', 0) / 1e6:.1f}M trainable parameters on {training.get('world_size')} "
        "process(es). It loads in stock transformers (`AutoModelForCausalLM.from_pretrained`); learnt residual "
        "scales (alpha), if any, are folded into the weights.",
    ]  # fmt: skip
    evals = training.get("evals") or []
    if evals:
        lines += ["", f"## Held-out loss ({training.get('heldout_data')}, {training.get('heldout_tokens')} tokens)", ""]
        lines += ["| step | tokens | loss (nats/token) |", "|--:|--:|--:|"]
        lines += [f"| {e['step']} | {e['tokens']:,} | {e['heldout_loss']:.4f} |" for e in evals]
        lines += [
            "",
            f"These losses were measured during training, on the float32 master weights (under bf16 autocast "
            f"on a GPU). The weights here are stored as {', '.join(stored_dtypes)}, so `tli verify` or any "
            "scoring of this folder gives a slightly different number"
            + (" (rounding of every weight to that dtype)." if stored_dtypes != ["F32"] else "."),
        ]
    lines += ["", "The whole run's settings: `tli_training.json`; provenance of the model: `tli_provenance.json`."]
    return "\n".join(lines) + "\n"


def _write_own_part(fd: int, path: str, pos: int, t: OutTensor, piece: Piece, param, factor: tuple | None) -> None:
    local, first = local_rows(param)
    rows = local.shape[0]
    if rows == 0:
        return
    flat = local.detach().reshape(rows, -1)
    size = t.nbytes // max(int(np.prod(t.shape, dtype=np.int64)), 1)
    if piece.index is None:
        data, offset = flat.reshape(-1), first * flat.shape[1]
    elif first <= piece.index < first + rows:
        slab = flat[piece.index - first].reshape(param.shape[1], -1)
        data, offset = slab[piece.offset : piece.offset + t.shape[0]].reshape(-1), 0
    else:
        return
    for done in range(0, data.numel(), CHUNK_ELEMENTS):
        x = data[done : done + CHUNK_ELEMENTS].to(device="cpu", dtype=torch.float32).numpy()  # CUDA or CPU rows
        if factor is not None:  # (alpha, offset): the plan's arithmetic (residual.apply_fold)
            alpha, off = np.float32(factor[0]), np.float32(factor[1])
            x = (x + off) * alpha - off if factor[1] else x * alpha
        _pwrite_all(fd, f32_to_bytes(x, t.dtype), pos + (offset + done) * size, path)
