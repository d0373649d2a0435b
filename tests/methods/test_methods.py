"""Every method on real transformers checkpoints, checked against transformers and safetensors.

The references are independent of our code: transformers' own modules (deep-copied and edited in
memory), and tensors read back with the safetensors library.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.helpers import save_tiny_llama
from tli_kernels.methods import CommonOptions, dus, passthrough, stack, tli
from tli_kernels.upscale import upscale

SMALL_SHARDS = CommonOptions(shard_size=150_000)


def read_all(path: str) -> dict[str, torch.Tensor]:
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        with safe_open(os.path.join(path, f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def load(path: str, dtype=torch.float32):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def in_memory_upscale(src_model, sources: list[list[int]], alphas: list[float], zero: list[bool]):
    """The expected model built from transformers modules: layers copied (or averaged) and scaled."""
    model = copy.deepcopy(src_model)
    old = src_model.model.layers
    new = torch.nn.ModuleList()
    for j, (srcs, alpha, z) in enumerate(zip(sources, alphas, zero)):
        layer = copy.deepcopy(old[srcs[0]])
        if len(srcs) > 1:
            with torch.no_grad():
                for name, p in layer.named_parameters():
                    p.copy_(sum(dict(old[s].named_parameters())[name] for s in srcs) / len(srcs))
        with torch.no_grad():
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight.mul_(0.0 if z else alpha)
        layer.self_attn.layer_idx = j
        new.append(layer)
    model.model.layers = new
    model.config.num_hidden_layers = len(new)
    return model


def test_tli_copy_sharded_llama_byte_identical_and_loads(tmp_path):
    src = save_tiny_llama(str(tmp_path / "src"), layers=6)
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json")), "fixture must be sharded"
    dst = str(tmp_path / "dst")
    result = upscale(src, dst, "tli", common=SMALL_SHARDS, options=dict(k=2, init="copy", alpha=1.0))
    assert len(result.plan.shards) > 1
    s, d = read_all(src), read_all(dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert cfg["num_hidden_layers"] == 6 + 3
    # output layer -> source layer: 0 1 [1] 2 3 [3] 4 5 [5]
    mapping = [0, 1, 1, 2, 3, 3, 4, 5, 5]
    for j, i in enumerate(mapping):
        suffixes = [k.split(f"model.layers.{i}.", 1)[1] for k in s if k.startswith(f"model.layers.{i}.")]
        assert len(suffixes) == 9
        for suf in suffixes:
            a, b = d[f"model.layers.{j}.{suf}"], s[f"model.layers.{i}.{suf}"]
            assert a.dtype == b.dtype and a.view(torch.uint8).numpy().tobytes() == b.view(torch.uint8).numpy().tobytes()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(d[name], s[name])
    assert set(d) == {
        f"model.layers.{j}.{k.split('.', 3)[3]}" for j in range(9) for k in s if k.startswith("model.layers.0.")
    } | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    model = load(dst)
    assert model.config.num_hidden_layers == 9
    prov = json.load(open(os.path.join(dst, "tli_provenance.json")))
    assert prov["injected_layers"] == [2, 5, 8] and prov["alpha_folded"] is True


@pytest.mark.parametrize(
    "method, options",
    [
        ("tli", dict(k=2, init="zero")),
        ("tli", dict(k=4, init="zero", alpha=0.3)),
        ("block-expansion", dict(k=3)),
        ("moe-upcycle", dict(experts=4, top_k=2)),
        ("moe-upcycle", dict(experts=3, top_k=1)),
    ],
)
def test_identity_preserving_methods_keep_logits(tmp_path, method, options):
    src = save_tiny_llama(str(tmp_path / "src"), layers=6, tie=method == "moe-upcycle")
    dst = str(tmp_path / "dst")
    upscale(src, dst, method, common=SMALL_SHARDS, options=options)
    a, b = load(src), load(dst)
    assert (logits(a) - logits(b)).abs().max().item() <= 1e-4
    if method == "moe-upcycle":
        assert type(b).__name__ == "MixtralForCausalLM"
        assert b.config.num_local_experts == options["experts"]
    else:
        assert b.config.num_hidden_layers > a.config.num_hidden_layers


@pytest.mark.parametrize("init, alpha", [("copy", 0.5), ("copy", 1.7), ("average", 0.25), ("average", 1.0)])
def test_alpha_equals_scaling_in_memory(tmp_path, init, alpha):
    src = save_tiny_llama(str(tmp_path / "src"), layers=5, dtype=torch.float32)
    dst = str(tmp_path / "dst")
    upscale(src, dst, "tli", common=SMALL_SHARDS, options=dict(k=2, init=init, alpha=alpha))
    layers = tli.layer_map(5, 2, init, alpha)
    expected = in_memory_upscale(
        load(src), [lay.sources for lay in layers], [lay.alpha for lay in layers], [False] * len(layers)
    )
    assert (logits(expected) - logits(load(dst))).abs().max().item() <= 1e-5


def test_random_init_layers_are_fresh_and_seeded(tmp_path):
    src = save_tiny_llama(str(tmp_path / "src"), layers=4)
    out = []
    for seed in (0, 0, 1):
        dst = str(tmp_path / f"dst{len(out)}")
        upscale(src, dst, "tli", common=CommonOptions(seed=seed), options=dict(k=2, init="random"))
        out.append(read_all(dst))
    w = out[0]["model.layers.2.self_attn.q_proj.weight"].float()
    assert torch.equal(
        out[0]["model.layers.2.self_attn.q_proj.weight"], out[1]["model.layers.2.self_attn.q_proj.weight"]
    )
    assert not torch.equal(
        out[0]["model.layers.2.self_attn.q_proj.weight"], out[2]["model.layers.2.self_attn.q_proj.weight"]
    )
    assert abs(w.std().item() - 0.02) < 0.003 and abs(w.mean().item()) < 0.002
    assert torch.equal(out[0]["model.layers.2.input_layernorm.weight"], torch.ones(64, dtype=torch.bfloat16))
    # originals untouched
    s = read_all(src)
    assert torch.equal(out[0]["model.layers.3.mlp.up_proj.weight"], s["model.layers.2.mlp.up_proj.weight"])
    load(str(tmp_path / "dst0"))


@pytest.mark.parametrize(
    "method, options, mapping",
    [
        ("dus", dict(m=2), [0, 1, 2, 3, 2, 3, 4, 5]),
        ("dus", dict(), [0, 1, 2, 3, 4, 1, 2, 3, 4, 5]),  # default m = N // 4 = 1
        ("stack", dict(times=2), [0, 1, 2, 3, 4, 5] * 2),
        ("stack", dict(times=1), [0, 1, 2, 3, 4, 5]),
        ("passthrough", dict(layers="0-3,2-5"), [0, 1, 2, 3, 2, 3, 4, 5]),
        ("passthrough", dict(layers="5,0-1,5"), [5, 0, 1, 5]),
    ],
)
def test_layer_order_tensor_by_tensor(tmp_path, method, options, mapping):
    src = save_tiny_llama(str(tmp_path / "src"), layers=6)
    dst = str(tmp_path / "dst")
    upscale(src, dst, method, common=SMALL_SHARDS, options=options)
    s, d = read_all(src), read_all(dst)
    assert json.load(open(os.path.join(dst, "config.json")))["num_hidden_layers"] == len(mapping)
    n_checked = 0
    for j, i in enumerate(mapping):
        for key in s:
            if key.startswith(f"model.layers.{i}."):
                suf = key.split(f"model.layers.{i}.", 1)[1]
                assert torch.equal(d[f"model.layers.{j}.{suf}"], s[key]), (j, i, suf)
                n_checked += 1
    assert n_checked == 9 * len(mapping)
    assert not any(k.startswith(f"model.layers.{len(mapping)}.") for k in d)
    # the in-memory stack of transformers layers gives the same function
    n = len(mapping)
    expected = in_memory_upscale(load(src), [[i] for i in mapping], [1.0] * n, [False] * n)
    assert (logits(expected) - logits(load(dst))).abs().max().item() <= 1e-5


def test_per_layer_config_entries_follow_the_layers(tmp_path):
    src = save_tiny_llama(
        str(tmp_path / "src"),
        layers=4,
        model_type="qwen2",
        use_sliding_window=True,
        max_window_layers=2,
        sliding_window=16,
    )
    cfg = json.load(open(os.path.join(src, "config.json")))
    assert cfg["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    dst = str(tmp_path / "dst")
    upscale(src, dst, "tli", options=dict(k=2, init="zero"))
    out = json.load(open(os.path.join(dst, "config.json")))
    assert out["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"] * 3
    assert out["max_window_layers"] == 3
    a, b = load(src), load(dst)
    assert (logits(a) - logits(b)).abs().max().item() <= 1e-4


def test_dtype_option_casts_floats_and_rewrites_config(tmp_path):
    src = save_tiny_llama(str(tmp_path / "src"), layers=2)
    dst = str(tmp_path / "dst")
    upscale(src, dst, "tli", common=CommonOptions(dtype="fp32"), options=dict(k=1, init="copy", alpha=0.5))
    s, d = read_all(src), read_all(dst)
    assert all(t.dtype == torch.float32 for t in d.values())
    assert torch.equal(d["model.embed_tokens.weight"], s["model.embed_tokens.weight"].float())
    assert torch.equal(
        d["model.layers.1.self_attn.o_proj.weight"], s["model.layers.0.self_attn.o_proj.weight"].float() * 0.5
    )
    assert json.load(open(os.path.join(dst, "config.json")))["dtype"] == "float32"


def test_layer_maps():
    assert [lay.sources for lay in tli.layer_map(5, 2, "average", 1.0)] == [[0], [1], [1, 2], [2], [3], [3, 4], [4]]
    assert [lay.sources for lay in tli.layer_map(4, 4, "average", 1.0)] == [[0], [1], [2], [3], [3]]
    assert len(tli.layer_map(30, 2, "copy", 1.0)) == 45
    assert len(tli.layer_map(126, 2, "copy", 1.0)) == 189
    assert len(dus.layer_map(32, 8)) == 48
    assert [lay.sources[0] for lay in stack.layer_map(2, 3)] == [0, 1, 0, 1, 0, 1]
    assert passthrough.parse_layers("0-2, 1 ,4-4", 5) == [0, 1, 2, 1, 4]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: tli.layer_map(6, 0, "copy", 1.0), "--k 0: must be between 1 and 6"),
        (lambda: tli.layer_map(6, 7, "copy", 1.0), "--k 7: must be between 1 and 6"),
        (lambda: tli.layer_map(6, 2, "clone", 1.0), "--init 'clone'"),
        (lambda: tli.layer_map(6, 2, "copy", float("nan")), "--alpha nan"),
        (lambda: dus.layer_map(6, 6), "--m 6"),
        (lambda: dus.layer_map(6, 0), "--m 0"),
        (lambda: stack.layer_map(6, 0), "--times 0"),
        (lambda: passthrough.parse_layers("0-6", 6), "layer 6 does not exist"),
        (lambda: passthrough.parse_layers("3-1", 6), "runs backwards"),
        (lambda: passthrough.parse_layers("a-b", 6), "cannot read"),
    ],
)
def test_bad_method_options(call, match):
    with pytest.raises(ValueError, match=match):
        call()
