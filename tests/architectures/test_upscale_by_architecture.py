"""Every method on every supported decoder family, checked end to end against transformers.

For each family (tests/architectures/models.py) a tiny random model is saved by transformers, float32
and sharded, bfloat16 in one file. Each method's output must load in stock transformers with no
missing, unexpected or mismatched keys, and its logits must match the independent reference (layers
deep-copied, branch outputs scaled by forward hooks) to 1e-5; identity injections must give the
source's logits bit for bit; per-layer config lists must follow the layer map.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from tests.architectures.models import (
    FAMILIES,
    OutSpec,
    build_model,
    decoder_layers,
    load,
    logits,
    per_layer_lists,
    reference_upscale,
    save_model,
)
from tli_kernels.methods import CommonOptions
from tli_kernels.upscale import upscale

N = 6
SHARD = CommonOptions(shard_size=120_000)


# ---- the layer maps, written out independently of tli's methods --------------------------------
def tli_map(k: int, init: str, alpha: float) -> list[OutSpec]:
    out = []
    for g in range(N // k):
        out += [OutSpec([i]) for i in range(g * k, g * k + k)]
        last = g * k + k - 1
        sources = [last, last + 1] if init == "average" and last + 1 < N else [last]
        out.append(OutSpec(sources, alpha=alpha, zero=init == "zero"))
    out += [OutSpec([i]) for i in range(N // k * k, N)]
    return out


CASES = {
    "tli-zero": ("tli", dict(k=2, init="zero", alpha=1.0), tli_map(2, "zero", 1.0)),
    "tli-copy-alpha": ("tli", dict(k=3, init="copy", alpha=0.5), tli_map(3, "copy", 0.5)),
    "tli-average": ("tli", dict(k=2, init="average", alpha=0.75), tli_map(2, "average", 0.75)),
    "block-expansion": ("block-expansion", dict(k=3), tli_map(3, "zero", 1.0)),
    "dus": ("dus", dict(m=2), [OutSpec([i]) for i in list(range(0, N - 2)) + list(range(2, N))]),
    "stack": ("stack", dict(times=2), [OutSpec([i]) for i in list(range(N)) * 2]),
    "passthrough": ("passthrough", dict(layers="0-3,2-5"), [OutSpec([i]) for i in [0, 1, 2, 3, 2, 3, 4, 5]]),
}
IDENTITY = {"tli-zero", "block-expansion"}


class Sources:
    """Per family: the in-memory model and its two saved copies, made once."""

    def __init__(self, root):
        self.root, self.cache = root, {}

    def get(self, model_type: str):
        if model_type not in self.cache:
            family = FAMILIES[model_type]
            model = build_model(family)
            base = os.path.join(self.root, model_type)
            f32 = save_model(model, base + "-f32", shard="100KB")
            b16 = save_model(model, base + "-bf16", dtype=torch.bfloat16)
            self.cache[model_type] = (model, f32, b16)
        return self.cache[model_type]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return Sources(str(tmp_path_factory.mktemp("families")))


def _check_config(dst: str, model_type: str, source_model, spec: list[OutSpec]) -> None:
    from transformers import AutoConfig

    family = FAMILIES[model_type]
    raw = json.load(open(os.path.join(dst, "config.json"), encoding="utf-8"))
    assert raw[family.count_key] == len(spec)
    loaded = AutoConfig.from_pretrained(dst)
    for key, values in per_layer_lists(source_model.config).items():
        assert getattr(loaded, key) == [values[o.sources[0]] for o in spec], key


def _refused(family, case: str, src: str, dst: str, **kwargs) -> bool:
    """For a case the family's config cannot express: the refusal, in one line, before anything is written."""
    if case not in family.refuses:
        return False
    method, options, _ = CASES[case]
    with pytest.raises(ValueError, match=family.refuses[case]) as info:
        upscale(src, dst, method, options=options, **kwargs)
    assert "\n" not in str(info.value) and not os.path.exists(dst)
    return True


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_method_matches_reference_float32_sharded(tmp_path, sources, model_type, case):
    family = FAMILIES[model_type]
    model, src, _ = sources.get(model_type)
    method, options, spec = CASES[case]
    dst = str(tmp_path / "out")
    if _refused(family, case, src, dst, common=SHARD):
        return
    result = upscale(src, dst, method, common=SHARD, options=options)
    assert len(result.plan.shards) > 1
    _check_config(dst, model_type, model, spec)
    out = load(dst)
    assert len(decoder_layers(out, family)) == len(spec)
    got = logits(out)
    want = logits(reference_upscale(model, family, spec, per_layer_lists(model.config)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if case in IDENTITY:
        assert torch.equal(got, logits(load(src))), "an identity injection must not change a single logit"


@pytest.mark.parametrize("case", ["tli-zero", "tli-copy-alpha", "tli-average", "dus"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_method_on_bfloat16_single_file(tmp_path, sources, model_type, case):
    """bf16 in, bf16 out: every output tensor equals torch's own arithmetic on the source tensors
    (float32 math, round to nearest even), and the model matches the reference within bf16 rounding."""
    family = FAMILIES[model_type]
    model, _, src = sources.get(model_type)
    method, options, spec = CASES[case]
    dst = str(tmp_path / "out")
    if _refused(family, case, src, dst):
        return
    upscale(src, dst, method, options=options)
    assert os.listdir(dst).count("model.safetensors") == 1
    source16 = load(src)
    out = load(dst)
    _check_tensors(src, dst, family, spec)
    got = logits(out)
    want = logits(reference_upscale(source16, family, spec, per_layer_lists(model.config)))
    if case in ("tli-zero", "dus"):
        assert torch.equal(got, want) if case == "dus" else torch.equal(got, logits(source16))
    else:
        torch.testing.assert_close(got, want, rtol=0.0, atol=0.02 * want.abs().max().item())


def _read(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# Branch outputs and post norms per family, by name, for the tensor-level check of bf16 outputs.
def _role(model_type: str, suffix: str) -> str:
    family = FAMILIES[model_type]
    if family.branches[0].startswith("post_"):
        return "norm" if suffix.split(".")[0] in family.branches else ("out" if _is_output(suffix) else "other")
    return "out" if _is_output(suffix) else "other"


def _is_output(suffix: str) -> bool:
    parts = suffix.split(".")
    outputs = ("o_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "w2", "output_linear")
    fused = parts[-1] in ("down_proj", "down_proj_bias")  # stacked experts stored as the module holds them
    return (parts[-2] in outputs or fused) and "c_fc" not in suffix


def _check_tensors(src: str, dst: str, family, spec: list[OutSpec]) -> None:
    s, d = _read(src), _read(dst)
    prefix = "model.layers" if family.layers == "model.layers" else family.layers
    offset = 1.0 if family.model_type.startswith("gemma") else 0.0
    post = family.branches[0].startswith("post_")
    for j, o in enumerate(spec):
        for name in [k for k in s if k.startswith(f"{prefix}.{o.sources[0]}.")]:
            suffix = name[len(f"{prefix}.{o.sources[0]}.") :]
            got = d[f"{prefix}.{j}.{suffix}"]
            x = sum(s[f"{prefix}.{i}.{suffix}"].float() for i in o.sources)
            if len(o.sources) > 1:
                x = x / len(o.sources)
            role = _role(family.model_type, suffix)
            if o.zero and role == "out":
                want = torch.zeros_like(got)
            elif o.alpha != 1.0 and role == "norm":
                want = ((x + offset) * o.alpha - offset).to(torch.bfloat16)
            elif o.alpha != 1.0 and role == "out" and not post:
                want = (x * o.alpha).to(torch.bfloat16)
            else:
                want = x.to(torch.bfloat16)
            assert torch.equal(got, want), f"{family.model_type} {prefix}.{j}.{suffix}"


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_random_init_loads_with_identity_norms(tmp_path, sources, model_type):
    family = FAMILIES[model_type]
    _, src, _ = sources.get(model_type)
    dst = str(tmp_path / "out")
    upscale(src, dst, "tli", common=SHARD, options=dict(k=3, init="random", alpha=1.0))
    out = load(dst)
    assert torch.isfinite(logits(out)).all()
    injected = decoder_layers(out, family)[3]
    norm_identity = 0.0 if model_type.startswith("gemma") else 1.0
    for name, p in injected.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif p.dim() == 1:
            assert torch.equal(p, torch.full_like(p, norm_identity)), name
        else:
            assert 0 < p.abs().max() <= 0.02 * 3**0.5 * 1.0001, name


UPCYCLABLE = sorted(t for t, f in FAMILIES.items() if f.upcycle_to)


@pytest.mark.parametrize("model_type", UPCYCLABLE)
def test_moe_upcycle_into_the_sibling_preserves_the_function(tmp_path, sources, model_type):
    family = FAMILIES[model_type]
    model, src, _ = sources.get(model_type)
    dst = str(tmp_path / "moe")
    upscale(src, dst, "moe-upcycle", common=SHARD, options=dict(experts=4, top_k=2))
    out = load(dst)
    assert out.config.model_type == family.upcycle_to
    torch.testing.assert_close(logits(out), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma", "gpt2"])
def test_tied_and_untied_embeddings(tmp_path, model_type):
    """The family's other embedding setting (tied for Llama/Qwen3, untied for Gemma/GPT-2)."""
    family = FAMILIES[model_type]
    model = build_model(family, tie=not family.tie, seed=1)
    src = save_model(model, str(tmp_path / "src"))
    dst = str(tmp_path / "out")
    spec = tli_map(3, "copy", 0.5)
    upscale(src, dst, "tli", options=dict(k=3, init="copy", alpha=0.5))
    out = load(dst)
    assert out.config.tie_word_embeddings == (not family.tie)
    want = logits(reference_upscale(model, family, spec, per_layer_lists(model.config)))
    torch.testing.assert_close(logits(out), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_native_and_python_engines_write_the_same_bytes(tmp_path, sources, model_type):
    from tli_kernels.checkpoint import executor_native

    if not executor_native.available():
        pytest.fail("the native engine is not built in this environment (CI builds it)")
    _, src, _ = sources.get(model_type)
    files = {}
    for engine in ("python", "native"):
        dst = str(tmp_path / engine)
        upscale(src, dst, "tli", common=CommonOptions(dtype="bf16"), engine=engine,
                options=dict(k=2, init="average", alpha=0.375))  # fmt: skip
        files[engine] = {
            f: open(os.path.join(dst, f), "rb").read() for f in os.listdir(dst) if f.endswith(".safetensors")
        }
    assert files["python"] == files["native"]


def test_moe_layer_pattern_follows_the_layer_map_and_mixed_averages_are_refused(tmp_path, sources):
    """Qwen3-MoE with a dense layer 0 (mlp_only_layers): the output's dense layers are where layer 0's
    copies went; averaging the dense layer 0 with the MoE layer 1 is refused before anything is written."""
    model, src, _ = sources.get("qwen3_moe")
    dst = str(tmp_path / "out")
    upscale(src, dst, "passthrough", options=dict(layers="0-2,0-1"))
    config = json.load(open(os.path.join(dst, "config.json"), encoding="utf-8"))
    assert config["mlp_only_layers"] == [0, 3] and config["decoder_sparse_step"] == 1
    load(dst)  # no missing / unexpected keys: the layer kinds agree with the config
    bad = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="average source layers 0 and 1"):
        upscale(src, bad, "tli", options=dict(k=1, init="average", alpha=1.0))
    assert not os.path.exists(bad)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_fused_expert_layout_on_disk(tmp_path, model_type):
    """MoE weights saved under the module names (fused 3-D experts.gate_up_proj / experts.down_proj),
    which transformers also reads: alpha and zero reach every expert through the fused tensor."""
    from safetensors.torch import save_file

    family = FAMILIES[model_type]
    model = build_model(family)
    src = str(tmp_path / "src")
    model.config.save_pretrained(src)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.down_proj") for k in state), "expected fused experts in memory"
    save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    for case in ("tli-copy-alpha", "tli-zero"):
        method, options, spec = CASES[case]
        dst = str(tmp_path / case)
        upscale(src, dst, method, options=options)
        want = logits(reference_upscale(model, family, spec, per_layer_lists(model.config)))
        torch.testing.assert_close(logits(load(dst)), want, rtol=1e-5, atol=1e-5)


def test_first_k_dense_layers_follow_the_layer_map_or_the_map_is_refused_with_one_that_works(tmp_path, sources):
    """GLM-4-MoE with a dense layer 0 (first_k_dense_replace = 1): a map that keeps dense layers first is
    written with the new count of dense layers; one that puts a dense layer after an MoE layer is refused,
    naming a map that works, and that map does."""
    from tli_kernels.architectures.layer_kinds import ranges

    model, src, _ = sources.get("glm4_moe")
    family = FAMILIES["glm4_moe"]
    dst = str(tmp_path / "ok")
    spec = [OutSpec([i]) for i in [0, 0, 1, 2, 1, 2, 3, 4, 5]]
    upscale(src, dst, "passthrough", options=dict(layers=ranges([o.sources[0] for o in spec])))
    config = json.load(open(os.path.join(dst, "config.json"), encoding="utf-8"))
    assert config["first_k_dense_replace"] == 2 and config["num_hidden_layers"] == 9
    want = logits(reference_upscale(model, family, spec, {}))
    torch.testing.assert_close(logits(load(dst)), want, rtol=1e-5, atol=1e-5)

    bad = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="output layer 3 would be a dense layer .source layer 0.") as info:
        upscale(src, bad, "passthrough", options=dict(layers="0-2,0-5"))
    assert not os.path.exists(bad)
    suggested = str(info.value).rsplit("--layers ", 1)[1]
    assert suggested == "0-2,1-5"
    upscale(src, bad, "passthrough", options=dict(layers=suggested))
    spec = [OutSpec([i]) for i in [0, 1, 2, 1, 2, 3, 4, 5]]
    torch.testing.assert_close(
        logits(load(bad)), logits(reference_upscale(model, family, spec, {})), rtol=1e-5, atol=1e-5
    )
