"""`tli train --dry-run`: what each rank of a run of a given world size holds and reads, from the
plan alone (headers only: nothing is loaded, so it runs on the 405B layout on a laptop).

Per rank, with FSDP2 sharding every tensor along dim 0 (ceil(d0 / world) rows per rank):
- parameters: the rank's rows in float32 (the master weights);
- gradients: float32, for the trainable tensors (all, or the injected layers with --train injected);
- optimizer: AdamW's two float32 moments of the trainable rows;
- FSDP buffers: the largest decoder layer unsharded twice (the one computing and the one being
  prefetched) in the compute dtype, its float32 gradients before reduce-scatter, and the root unit
  (embeddings, head, final norm), which FSDP2 keeps unsharded from forward to backward;
- activations saved for backward at --micro-batch x --seq-len tokens, per token and layer
  8h + 2kv + 4i + heads elements (h hidden, kv = kv_heads x head_dim, i intermediate; measured on
  transformers' Llama with SDPA, tests/training/test_dry_run.py), plus v + 4h for the embedding,
  final norm and logits (v vocabulary) and, in bf16, the float32 copy of the logits the loss takes;
  with --activation-checkpointing only each layer's input (h per token) is kept, plus one layer's
  full set while it is recomputed;
- bytes read: the source bytes of the rank's rows (0 for zeros / uniform ops, two sources for an
  average) - what `fill_from_plan` reads.
On a GPU (the default assumption) the compute dtype is bf16; with --device cpu, float32.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from tli_kernels.checkpoint.plan import OutTensor
from tli_kernels.training.checkpoints import injected_layers
from tli_kernels.training.sharded_load import bytes_read_for_rows, open_source, shard_rows

GB = 1e9
MAX_WORLD = 1 << 24  # more ranks than any cluster has: a larger --world-size is a typo
LISTED_RANKS = 1024  # up to this many ranks each gets its record; beyond, rank 0 (the largest) and the total


@dataclass
class RankUse:
    rank: int
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    bytes_read: int = 0

    @property
    def sharded(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass
class DryRun:
    model: str
    world: int
    layers: int
    parameters: int
    trainable: int
    tokens_per_rank: int
    compute_bytes: int
    fsdp_buffers: int
    activations: int
    activations_checkpointed: int
    checkpointing: bool
    ranks: list[RankUse] = field(default_factory=list)  # every rank, or only rank 0 beyond LISTED_RANKS
    source_bytes: int = 0
    bytes_read_all: int = 0  # by all ranks together

    def peak(self, r: RankUse) -> int:
        act = self.activations_checkpointed if self.checkpointing else self.activations
        return r.sharded + self.fsdp_buffers + act

    def text(self) -> str:
        worst = max(self.ranks, key=self.peak)
        most_read = max(self.ranks, key=lambda r: r.bytes_read)
        act = self.activations_checkpointed if self.checkpointing else self.activations
        dtype = "bf16" if self.compute_bytes == 2 else "fp32"
        lines = [
            f"model           {self.model}: {self.layers} layers, {self.parameters / 1e9:.2f}B parameters, "
            f"{self.trainable / 1e9:.2f}B trainable",
            f"world size      {self.world} ranks; {self.tokens_per_rank} tokens per rank per micro-step; "
            f"compute dtype {dtype}",
            "",
            "per rank (largest rank)                 GB",
            f"  parameters (fp32 shards)         {worst.params / GB:9.2f}",
            f"  gradients (fp32 shards)          {worst.grads / GB:9.2f}",
            f"  optimizer (AdamW, 2 x fp32)      {worst.optimizer / GB:9.2f}",
            f"  FSDP unsharded buffers           {self.fsdp_buffers / GB:9.2f}",
            f"  activations{' (checkpointed)' if self.checkpointing else '               '}      {act / GB:9.2f}"
            f"   ({'without' if self.checkpointing else 'with'} --activation-checkpointing: "
            f"{(self.activations if self.checkpointing else self.activations_checkpointed) / GB:.2f})",
            f"  total                            {self.peak(worst) / GB:9.2f}",
            "",
            f"source bytes read: {most_read.bytes_read / GB:.2f} GB on the busiest rank, "
            f"{self.bytes_read_all / GB:.2f} GB in all "
            f"(the source holds {self.source_bytes / GB:.2f} GB)",
        ]
        return "\n".join(lines)


def dry_run(cfg, world: int | None = None) -> DryRun:
    """Plan cfg's run on `world` ranks (default: WORLD_SIZE, else 1); reads headers only."""
    world = int(world if world is not None else os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise ValueError(f"--world-size {world}: must be at least 1")
    if world > MAX_WORLD:
        raise ValueError(
            f"--world-size {world}: more than {MAX_WORLD} ranks; give the number of ranks the run will have"
        )
    cfg.check(world)
    source = open_source(cfg.model, cfg.method, cfg.method_options, seed=cfg.init_seed)
    config = source.config
    tensors = list(source.plan.tensors())
    layer_re = re.compile(re.escape(source.layout.layer_prefix) + r"\.(\d+)\.")
    injected = set(injected_layers(source.provenance))
    if cfg.train == "injected" and not injected:
        raise ValueError(f"--train injected: {cfg.model} has no injected layers")

    def trainable(t: OutTensor) -> bool:
        if cfg.train == "all":
            return True
        m = layer_re.match(t.name)
        return bool(m) and int(m.group(1)) in injected

    # FSDP2 gives rank 0 the most rows of every tensor (torch.chunk), so beyond LISTED_RANKS rank 0
    # stands for the largest rank and the total is counted over whole tensors: the work stays
    # proportional to the tensors, not to the ranks.
    ranks = [RankUse(r) for r in range(world if world <= LISTED_RANKS else 1)]
    bytes_read_all = 0
    for t in tensors:
        dim0 = t.shape[0] if t.shape else 1
        bytes_read_all += bytes_read_for_rows(t, 0, dim0 * (_numel(t.shape[1:]) if t.shape else 1), source.layout)
    for t in tensors:
        dim0 = t.shape[0] if t.shape else 1
        row = _numel(t.shape[1:]) if t.shape else 1
        for use in ranks:
            first, rows = shard_rows(dim0, use.rank, world)
            n = rows * row
            use.params += 4 * n
            if trainable(t):
                use.grads += 4 * n
                use.optimizer += 8 * n
            use.bytes_read += bytes_read_for_rows(t, first * row, n, source.layout)

    compute = 4 if cfg.device == "cpu" else 2
    layer_sizes: dict[int, int] = {}
    root = 0
    for t in tensors:
        m = layer_re.match(t.name)
        if m:
            layer_sizes[int(m.group(1))] = layer_sizes.get(int(m.group(1)), 0) + _numel(t.shape)
        else:
            root += _numel(t.shape)
    biggest = max(layer_sizes.values(), default=0)  # a tied head is the embedding: the plan holds it once
    fsdp = 2 * biggest * compute + 4 * biggest + root * compute

    layers = source.num_layers
    tokens = cfg.micro_batch * cfg.seq_len
    upcast = tokens * int(config["vocab_size"]) * 4 if compute == 2 else 0  # the loss's float32 logits
    activations = tokens * activation_elements_per_token(config, layers) * compute + upcast
    checkpointed = tokens * activation_elements_per_token(config, layers, checkpointing=True) * compute + upcast
    return DryRun(
        model=cfg.model + (f" --method {cfg.method} {cfg.method_options}" if cfg.method else ""),
        world=world,
        layers=layers,
        parameters=sum(_numel(t.shape) for t in tensors),
        trainable=sum(_numel(t.shape) for t in tensors if trainable(t)),
        tokens_per_rank=tokens,
        compute_bytes=compute,
        fsdp_buffers=fsdp,
        activations=activations,
        activations_checkpointed=checkpointed,
        checkpointing=cfg.activation_checkpointing,
        ranks=ranks,
        source_bytes=source.layout.total_bytes,
        bytes_read_all=bytes_read_all,
    )


def _first(config: dict, keys: tuple[str, ...], default=None):
    for key in keys:
        if isinstance(config.get(key), int):
            return int(config[key])
    if default is None:
        raise ValueError(f"--dry-run: config.json has none of {', '.join(keys)}")
    return default


def activation_elements_per_token(config: dict, layers: int, checkpointing: bool = False) -> int:
    """Activations kept per token, in elements, for a Llama-shaped block (the estimate the dry run
    uses; the test measures it against autograd's saved tensors). Other families' keys are read where
    they name the same sizes (n_embd, n_head, ...)."""
    h = _first(config, ("hidden_size", "n_embd", "d_model"))
    heads = _first(config, ("num_attention_heads", "n_head"))
    head_dim = _first(config, ("head_dim",), h // heads)
    kv = _first(config, ("num_key_value_heads",), heads) * head_dim
    inter = _first(config, ("intermediate_size", "n_inner", "ffn_dim"), 4 * h)
    per_layer = 8 * h + 2 * kv + 4 * inter + heads
    outside = int(config["vocab_size"]) + 4 * h
    return (layers * h + per_layer if checkpointing else layers * per_layer) + outside


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
