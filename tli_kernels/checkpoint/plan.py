"""The SurgeryPlan: what the output checkpoint holds, tensor by tensor, as ops over source tensors.

A method (tli, dus, ...) turns a source layout and options into a plan; an executor (the Python
reference or the native engine) turns the plan into files. The plan is plain data and round-trips
through JSON, so `tli plan --json` shows exactly what `tli upscale` will do.

Element-wise ops and their exact arithmetic (both executors MUST produce identical bytes):

- copy     out = src, converted to the output dtype (bytes unchanged when the dtypes match)
- scale    out = f32(src) * f32(factor); with an offset o != 0 (a norm weight w that means a scale
           of w + o, as Gemma's (1 + w)): out = (f32(src) + f32(o)) * f32(factor) - f32(o)
- average  s = f32(src[0]); s = s + f32(src[i]) for i = 1..n-1; s = s / f32(n);
           then s = s * f32(factor) if factor != 1 (with an offset: s = (s + o) * factor - o)
           A scale with `pre_round` R (BF16/F16) first rounds the source value to R and widens it
           again: mergekit's cast-then-scale, which rounds twice (recipes).
- dequant  src = [q0, s0, q1, s1, ...]: FP8 weights (F8_E4M3 / F8_E5M2, 2-D [R, C]) with their scales
           (BF16/F16/F32, one per block of `block` = [br, bc] elements: scale grid [ceil(R/br),
           ceil(C/bc)], row-major); v_i = f32(q_i[r, c]) * f32(s_i[r // br, c // bc]) (the FP8 value
           widens exactly; the product rounds once); s = v_0 (+ v_i for i = 1.. , then / f32(n) as
           average); then s = s * f32(factor) if factor != 1 (checkpoint/quant.py)
- zeros    out = 0 (written as a hole where the file system allows)
- fill     out = f32(value)
- uniform  per element index i (0-based within the tensor), splitmix64 on the u64 counter
           z = seed + (i + 1) * 0x9E3779B97F4A7C15, u = (z' >> 11) * 2^-53 (an f64 in [0, 1)),
           v = (2u - 1) * bound in f64, out = f32(v)
The f32 result is rounded to BF16/F16 with round-to-nearest-even, which is what torch's .to(dtype)
does; a NaN stays NaN but is written as the canonical quiet NaN (0x7FC0, 0x7E00, 0x7FC00000 for
F32), since NaN payloads after an add differ between SIMD and scalar code paths. Sources in
BF16/F16/F32 widen to f32 exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from tli_kernels.checkpoint.safetensors_format import ARITHMETIC_DTYPES, build_header, tensor_nbytes

PLAN_FORMAT = "tli-surgery-plan/1"
OP_KINDS = ("copy", "scale", "average", "dequant", "zeros", "fill", "uniform")
SHARD_METADATA = {"format": "pt"}


@dataclass
class TensorOp:
    kind: str
    src: list[str] = field(default_factory=list)
    factor: float = 1.0
    value: float = 0.0
    seed: int = 0
    bound: float = 0.0
    offset: float = 0.0  # scale / average of a norm weight stored as (scale - offset)
    pre_round: str = ""  # scale: round the source value to this dtype first ("" = no)
    block: list[int] = field(default_factory=list)  # dequant: weight rows x columns per scale element

    def to_json(self) -> dict:
        out: dict = {"kind": self.kind}
        if self.src:
            out["src"] = list(self.src)
        if self.kind == "dequant":
            out["factor"], out["block"] = self.factor, list(self.block)
        if self.kind in ("scale", "average"):
            out["factor"] = self.factor
            if self.offset:
                out["offset"] = self.offset
            if self.pre_round:
                out["pre_round"] = self.pre_round
        if self.kind == "fill":
            out["value"] = self.value
        if self.kind == "uniform":
            out["seed"], out["bound"] = self.seed, self.bound
        return out


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    op: TensorOp

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass
class OutShard:
    file: str
    tensors: list[OutTensor]

    def header_bytes(self) -> bytes:
        """The exact header (length prefix included) both executors write. Built once per shard
        (plans are not changed once built): a shard of 200k tensors takes seconds to build."""
        key = (id(self.tensors), len(self.tensors))
        if self.__dict__.get("_header_key") != key:
            self.__dict__["_header"] = build_header(((t.name, t.dtype, t.shape) for t in self.tensors), SHARD_METADATA)
            self.__dict__["_header_key"] = key
        return self.__dict__["_header"]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_size(self) -> int:
        return len(self.header_bytes()) + self.data_bytes


@dataclass
class SurgeryPlan:
    method: str
    options: dict
    source: dict  # CheckpointLayout.identity()
    config: dict  # the output config.json
    layers: list[dict]  # provenance: one entry per output layer
    shards: list[OutShard]
    side_files: list[str] = field(default_factory=list)
    format: str = PLAN_FORMAT

    # ---- views --------------------------------------------------------------------------
    def tensors(self):
        for shard in self.shards:
            yield from shard.tensors

    @property
    def total_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    @property
    def num_parameters(self) -> int:
        return sum(_numel(t.shape) for t in self.tensors())

    def weight_map(self) -> dict[str, str]:
        return {t.name: s.file for s in self.shards for t in s.tensors}

    def index_json(self) -> dict:
        return {
            "metadata": {"total_size": self.total_bytes, "total_parameters": self.num_parameters},
            "weight_map": self.weight_map(),
        }

    def residual_scales(self) -> dict[str, float]:
        return {str(e["index"]): e["alpha"] for e in self.layers if e.get("role") == "injected"}

    def provenance(self, version: str) -> dict:
        return {
            "tool": "tli_kernels",
            "version": version,
            "method": self.method,
            "options": self.options,
            "source": self.source,
            "num_layers": len(self.layers),
            "layers": self.layers,
            "injected_layers": [e["index"] for e in self.layers if e.get("role") == "injected"],
            "residual_scales": self.residual_scales(),
            "alpha_folded": True,
            "plan_sha256": self.digest(),
        }

    # ---- serialisation --------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            **self.to_json_head(),
            "shards": [
                {
                    "file": s.file,
                    "tensors": [
                        {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "op": t.op.to_json()}
                        for t in s.tensors
                    ],
                }
                for s in self.shards
            ],
        }

    @classmethod
    def from_json(cls, obj: dict) -> SurgeryPlan:
        if obj.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a tli surgery plan (format {obj.get('format')!r}, expected {PLAN_FORMAT!r})")
        shards = [
            OutShard(
                file=s["file"],
                tensors=[
                    OutTensor(t["name"], t["dtype"], tuple(t["shape"]), TensorOp(**t["op"])) for t in s["tensors"]
                ],
            )
            for s in obj["shards"]
        ]
        return cls(
            method=obj["method"],
            options=obj["options"],
            source=obj["source"],
            config=obj["config"],
            layers=obj["layers"],
            shards=shards,
            side_files=obj.get("side_files", []),
        )

    def digest(self) -> str:
        """sha256 of the plan's data ops and config (not of where the source lives): the JSON of
        everything but the shards, then per shard its file name and each tensor's JSON, so a plan of
        a million tensors is hashed without its whole JSON in memory (JSON texts delimit
        themselves). Computed once: plans are not changed once built, and a run asks many times."""
        if "_digest" not in self.__dict__:
            head = self.to_json_head()
            head["source"] = _without_paths(self.source)
            h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
            for s in self.shards:
                h.update(json.dumps(s.file).encode())
                for t in s.tensors:
                    h.update(json.dumps([t.name, t.dtype, list(t.shape), t.op.to_json()], sort_keys=True).encode())
            self.__dict__["_digest"] = h.hexdigest()
        return self.__dict__["_digest"]

    def to_json_head(self) -> dict:
        """to_json() without the shards."""
        return {
            "format": self.format,
            "method": self.method,
            "options": self.options,
            "source": self.source,
            "config": self.config,
            "layers": self.layers,
            "side_files": self.side_files,
        }


def _without_paths(source: dict) -> dict:
    """A source identity without the folders it was read from (several, for a multi-source recipe)."""
    out = {k: v for k, v in source.items() if k != "path"}
    if isinstance(out.get("sources"), list):
        out["sources"] = [_without_paths(s) if isinstance(s, dict) else s for s in out["sources"]]
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def pack_shards(tensors: list[OutTensor], shard_size: int) -> list[OutShard]:
    """Greedy packing in order: a new shard starts when the next tensor would pass shard_size.

    A tensor larger than shard_size gets a shard of its own (as transformers does).
    """
    groups: list[list[OutTensor]] = [[]]
    used = 0
    for t in tensors:
        if groups[-1] and used + t.nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.nbytes
    names = shard_file_names(len(groups))
    return [OutShard(file=n, tensors=g) for n, g in zip(names, groups)]


def validate_plan(plan: SurgeryPlan, source_tensors: dict) -> None:
    """Check every op against the source before a byte is written (raise ValueError naming it)."""
    seen: set[str] = set()
    for t in plan.tensors():
        where = f"output tensor {t.name!r}"
        if t.name in seen:
            raise ValueError(f"{where} appears twice in the plan")
        seen.add(t.name)
        op = t.op
        if op.kind not in OP_KINDS:
            raise ValueError(f"{where}: unknown op {op.kind!r}")
        if op.pre_round and (op.kind != "scale" or op.pre_round not in ("BF16", "F16")):
            raise ValueError(f"{where}: pre_round {op.pre_round!r} is for scale ops, to BF16 or F16")
        wanted = {"copy": 1, "scale": 1, "zeros": 0, "fill": 0, "uniform": 0}.get(op.kind)
        if (len(op.src) != wanted) if wanted is not None else not op.src:
            raise ValueError(f"{where}: op {op.kind} got {len(op.src)} sources")
        if op.kind == "dequant":
            _validate_dequant(t, source_tensors, where)
            continue
        sources = []
        for s in op.src:
            src = source_tensors.get(s)
            if src is None:
                raise ValueError(f"{where}: source tensor {s!r} is not in the checkpoint")
            if tuple(src.shape) != tuple(t.shape):
                raise ValueError(f"{where}: source {s!r} has shape {list(src.shape)}, output wants {list(t.shape)}")
            sources.append(src)
        # Byte copies and zeros work for any dtype; everything else goes through f32.
        arithmetic = op.kind not in ("copy", "zeros") or (op.kind == "copy" and sources[0].dtype != t.dtype)
        if arithmetic:
            for dtype, what in [(t.dtype, "produce")] + [(s.dtype, f"read (source {s.name!r})") for s in sources]:
                if dtype not in ARITHMETIC_DTYPES:
                    raise ValueError(f"{where}: op {op.kind} cannot {what} dtype {dtype}")


def _validate_dequant(t: OutTensor, source_tensors: dict, where: str) -> None:
    op = t.op
    if not op.src or len(op.src) % 2 or len(op.block) != 2 or any(b < 1 for b in op.block):
        raise ValueError(f"{where}: op dequant needs (weight, scale) source pairs and a block [rows, cols]")
    if t.dtype not in ARITHMETIC_DTYPES or len(t.shape) != 2:
        raise ValueError(f"{where}: op dequant produces a 2-D BF16/F16/F32 tensor, not {t.dtype}{list(t.shape)}")
    rows, cols = t.shape
    grid = -(-rows // op.block[0]) * -(-cols // op.block[1])
    for w_name, s_name in zip(op.src[::2], op.src[1::2]):
        w, s = source_tensors.get(w_name), source_tensors.get(s_name)
        if w is None or s is None:
            raise ValueError(f"{where}: source tensor {w_name if w is None else s_name!r} is not in the checkpoint")
        if w.dtype not in FP8_STORAGE or tuple(w.shape) != tuple(t.shape):
            raise ValueError(f"{where}: dequant weight {w_name!r} is {w.dtype}{list(w.shape)}, not FP8 {list(t.shape)}")
        if s.dtype not in ARITHMETIC_DTYPES or _numel(s.shape) != grid:
            raise ValueError(f"{where}: dequant scale {s_name!r} is {s.dtype}{list(s.shape)}, expected {grid} values")


FP8_STORAGE = ("F8_E4M3", "F8_E5M2")


def write_json_atomic(path: str, obj: object) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: leave no temporary file behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
