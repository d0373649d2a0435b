"""`tli train --dry-run`: its activation estimate against the bytes autograd really saves (counted with
saved-tensor hooks on transformers' Llama), its shard sizes against torch.chunk (FSDP2's split) and
its bytes read against what each rank's loader reads."""

from __future__ import annotations

import torch

from tests.helpers import save_tiny_llama
from tli_kernels.cli.main import main
from tli_kernels.training.dry_run import activation_elements_per_token, dry_run
from tli_kernels.training.sharded_load import _CountingReader, _fill_param, bind, build_meta_model, open_source
from tli_kernels.training.trainer import TrainConfig, enable_checkpointing


def _saved_bytes(config: dict, tokens: int, checkpointing: bool) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).train()
    if checkpointing:
        enable_checkpointing(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, config["vocab_size"], (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=x, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:])
    return sum(seen.values())


def test_activation_estimate_matches_what_autograd_saves():
    for h, heads, kv_heads, inter, layers in [(64, 4, 2, 128, 3), (128, 8, 1, 384, 2)]:
        config = dict(model_type="llama", hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=256)  # fmt: skip
        tokens = 64
        measured = _saved_bytes(config, tokens, checkpointing=False)
        estimate = activation_elements_per_token(config, layers) * tokens * 4
        assert abs(estimate - measured) / measured < 0.1, (estimate, measured)
        # checkpointed: layer inputs only (the one layer being recomputed is transient, not saved)
        measured = _saved_bytes(config, tokens, checkpointing=True)
        per_layer = activation_elements_per_token(config, 1) - activation_elements_per_token(config, 0)
        estimate = (activation_elements_per_token(config, layers, checkpointing=True) - per_layer) * tokens * 4
        assert abs(estimate - measured) / measured < 0.15, (estimate, measured)


def test_shards_and_bytes_read_per_rank(tmp_path):
    src = save_tiny_llama(str(tmp_path / "src"), layers=4, dtype=torch.bfloat16)
    options = {"k": 2, "init": "average", "alpha": 0.5}
    cfg = TrainConfig(model=src, method="tli", method_options=options, micro_batch=1, seq_len=16, device="cpu")
    world = 3
    plan = dry_run(cfg, world=world)
    source = open_source(src, "tli", options)
    tensors = list(source.plan.tensors())
    for r in range(world):  # torch.chunk is how FSDP2 splits dim 0
        rows = sum(torch.chunk(torch.empty(t.shape[0]), world)[r].numel() * (t.nbytes // t.shape[0] // 2)
                   for t in tensors if len(torch.chunk(torch.empty(t.shape[0]), world)) > r)  # fmt: skip
        assert plan.ranks[r].params == 4 * rows
        assert plan.ranks[r].optimizer == 2 * plan.ranks[r].params == 4 * plan.ranks[r].grads / 2
    model = build_meta_model(source.config)
    bindings = bind(model, source.plan)
    for r in range(world):
        with _CountingReader(source.layout) as reader:
            for name, pieces in bindings.items():
                full = model.get_parameter(name)
                chunk = -(-full.shape[0] // world)
                first = min(r * chunk, full.shape[0])
                local = torch.empty((max(0, min(chunk, full.shape[0] - first)), *full.shape[1:]))
                _fill_param(local, first, pieces, reader)
            assert reader.bytes_read == plan.ranks[r].bytes_read
    assert sum(r.params for r in plan.ranks) == 4 * sum(t.nbytes // 2 for t in tensors)
    injected = dry_run(TrainConfig(model=src, method="tli", method_options=options, train="injected"), world=2)
    assert 0 < injected.trainable < injected.parameters


def test_cli_dry_run_writes_nothing(tmp_path, capsys):
    src = save_tiny_llama(str(tmp_path / "src"), layers=4, dtype=torch.bfloat16)
    out = tmp_path / "out"
    args = ["train", src, "--method", "tli", "--k", "2", "--dry-run", "--world-size", "4", "-o", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "world size      4 ranks" in text and "optimizer (AdamW" in text and "source bytes read" in text
    assert not out.exists()
    assert main(["train", src, "--world-size", "4"]) == 1
    assert "--world-size is for --dry-run" in capsys.readouterr().err
