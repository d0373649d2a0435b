"""mergekit passthrough recipes through tli: mergekit's own passthrough examples and typical community
recipes (two-model interleaves, DUS, self-merges with repeated and overlapping layers, scaled
duplicates, dtype casts, sharded and tied sources, Mistral and Qwen2), each compared tensor by tensor
with an independent reference built from the source tensors and the YAML (recipe_reference.py), its
config checked, and loaded by stock transformers. Then: recipes compile to the same plan as the flag
form, flag-form plans written back as recipes mean the same, and bad recipes fail before any write.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.methods.recipe_reference import compare, read_folder, reference_merge
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.methods import CommonOptions, make_plan
from tli_kernels.methods.recipe import compile_recipe, parse_recipe, plan_to_recipe, recipe_yaml
from tli_kernels.upscale import upscale

ZERO_BRANCHES = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]


def S(model: str, a: int, b: int, **params) -> dict:
    source = {"model": model, "layer_range": [a, b]}
    if params:
        source["parameters"] = params
    return {"sources": [source]}


def R(*slices, **top) -> dict:
    return {"slices": list(slices), "merge_method": "passthrough", **top}


def _layers(cfg_path: str) -> list[str] | None:
    return json.load(open(cfg_path)).get("layer_types")


# name -> recipe(models), engine
CASES = {
    # mergekit's own example (examples/orcamini-platy-44layer.yml), shrunk to 6-layer models
    "two models, mergekit example": lambda m: R(S(m["a"], 0, 4), S(m["b"], 2, 6), dtype="float16"),
    "goliath-style interleave": lambda m: R(
        S(m["a"], 0, 3), S(m["b"], 1, 4), S(m["a"], 2, 5), S(m["b"], 3, 6), dtype="bfloat16"
    ),
    "dus (SOLAR)": lambda m: R(S(m["a"], 0, 4), S(m["a"], 2, 6)),
    "self-merge, repeated and overlapping": lambda m: R(
        S(m["a"], 0, 3), S(m["a"], 1, 3), S(m["a"], 1, 3), S(m["a"], 2, 6)
    ),
    "zero-init duplicates": lambda m: R(S(m["a"], 0, 2), S(m["a"], 1, 2, scale=ZERO_BRANCHES), S(m["a"], 2, 6)),
    "0.3-scaled duplicate in bf16": lambda m: R(
        S(m["a"], 0, 4),
        S(m["a"], 3, 5, scale=[{"filter": "o_proj", "value": 0.3}, {"filter": "down_proj", "value": 0.3}]),
        S(m["a"], 5, 6),
    ),
    "gradient and recipe-wide filter": lambda m: R(
        S(m["a"], 0, 3),
        S(m["b"], 0, 6, scale=[{"filter": "self_attn.o_proj", "value": 0.7}]),
        parameters={"scale": [{"filter": "down_proj", "value": [0.25, 1.0]}]},
    ),
    "unfiltered scale reaches embeddings and head": lambda m: R(S(m["a"], 0, 6), parameters={"scale": 0.5}),
    "dtype cast (models:)": lambda m: {
        "models": [{"model": m["a"]}],
        "merge_method": "passthrough",
        "dtype": "float32",
    },
    "float32 work, bfloat16 out": lambda m: R(
        S(m["a"], 0, 4), S(m["a"], 2, 6, scale=0.3), dtype="float32", out_dtype="bfloat16"
    ),
    "tied embeddings": lambda m: R(S(m["tied"], 0, 2), S(m["tied"], 1, 4)),
    "mistral, two models": lambda m: R(S(m["m1"], 0, 4), S(m["m2"], 2, 6), dtype="bfloat16"),
    "qwen2 with sliding-window layers": lambda m: R(S(m["q1"], 0, 4), S(m["q2"], 1, 6)),
    "base_model supplies the config": lambda m: R(S(m["a"], 0, 3), S(m["b_eps"], 3, 6), base_model=m["b_eps"]),
}


def _run(recipe: dict, dst: str, tmp_path, engine=None):
    path = tmp_path / "recipe.yml"
    path.write_text(recipe_yaml(recipe))
    return upscale(str(path), dst, None, engine=engine)


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_matches_reference(models, tmp_path, case):
    recipe = CASES[case](models)
    dst = str(tmp_path / "out")
    result = _run(recipe, dst, tmp_path, engine="python" if case == "goliath-style interleave" else None)
    got, want = read_folder(dst), reference_merge(recipe)
    allowed = compare(got, want)
    # The one difference allowed here: scale 0 writes +0.0 where mergekit writes -0.0.
    assert all(v.startswith("sign of zero") for v in allowed.values()), allowed
    assert ("zero" in case) == bool(allowed)

    slices = recipe.get("slices") or [S(recipe["models"][0]["model"], 0, 6)]
    cfg = json.load(open(os.path.join(dst, "config.json")))
    donor = recipe.get("base_model") or slices[0]["sources"][0]["model"]
    donor_cfg = json.load(open(os.path.join(donor, "config.json")))
    n = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in slices)
    assert cfg["num_hidden_layers"] == n == len(result.plan.layers)
    assert cfg["rms_norm_eps"] == donor_cfg["rms_norm_eps"]
    if recipe.get("dtype"):
        assert cfg["dtype"] == (recipe.get("out_dtype") or recipe["dtype"])
    if "qwen2" in case:  # per-layer entries follow each output layer's source layer, per model
        src_types = [
            (_layers(os.path.join(s["sources"][0]["model"], "config.json")), s["sources"][0]["layer_range"])
            for s in slices
        ]
        expected = [types[i] for types, (a, b) in src_types for i in range(a, b)]
        assert cfg["layer_types"] == expected and "sliding_attention" in expected
        assert cfg["max_window_layers"] == 3  # output layers 0-2 come from q1's 0-2 (< 3); layer 3 is q1's 3
    model, info = AutoModelForCausalLM.from_pretrained(dst, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.num_hidden_layers == n


def test_cast_and_scale_rounds_like_mergekit(models, tmp_path):
    """float32 weights cast to bfloat16 and scaled by 0.3: mergekit rounds the cast, then the product;
    the plan's scale op rounds its source first (pre_round), so the bits are mergekit's, and not the
    once-rounded float32 product's."""
    m = models
    recipe = R(S(m["f32"], 0, 4), S(m["f32"], 2, 4, scale=0.3), dtype="bfloat16")
    for engine in ("python", "native"):
        dst = str(tmp_path / engine)
        _run(recipe, dst, tmp_path, engine=engine)
        assert compare(read_folder(dst), reference_merge(recipe)) == {}
    once = _single_rounding(reference_merge, recipe)
    assert compare(read_folder(dst), once, ulp_ok=set(once)) != {}  # the two roundings do differ here


def _single_rounding(ref, recipe):
    """The same recipe computed in float32 and rounded once."""
    f32 = ref({**recipe, "dtype": "float32"})
    return {k: v.to(torch.bfloat16) for k, v in f32.items()}


def test_recipe_compiles_to_the_flag_forms_plan(models):
    a = models["a"]
    layout = CheckpointLayout.open(a)
    common = CommonOptions()
    pairs = [
        (R(S(a, 0, 4), S(a, 2, 6)), ("dus", dict(m=2))),
        (R(S(a, 0, 6), S(a, 0, 6)), ("stack", dict(times=2))),
        (R(S(a, 0, 4), S(a, 2, 6)), ("passthrough", dict(layers="0-3,2-5"))),
        (
            R(
                *[
                    s
                    for g in range(3)
                    for s in (S(a, 2 * g, 2 * g + 2), S(a, 2 * g + 1, 2 * g + 2, scale=ZERO_BRANCHES))
                ]
            ),
            ("block-expansion", dict(k=2)),
        ),
    ]
    for recipe, (method, options) in pairs:
        _, from_recipe, _ = compile_recipe(parse_recipe(recipe), common)
        from_flags = make_plan(layout, method, common, **options)
        assert [s.tensors for s in from_recipe.shards] == [s.tensors for s in from_flags.shards], method
        assert from_recipe.config == from_flags.config
        if method == "block-expansion":  # its identity layers are injected layers to training, too
            assert from_recipe.residual_scales() == from_flags.residual_scales()


@pytest.mark.parametrize(
    "method, options",
    [
        ("tli", dict(k=2, init="copy", alpha=0.5)),
        ("tli", dict(k=3, init="zero")),
        ("block-expansion", dict(k=2)),
        ("dus", dict(m=2)),
        ("stack", dict(times=2)),
        ("passthrough", dict(layers="0-3,2-5,5")),
    ],
)
def test_flag_plans_written_as_recipes_mean_the_same(models, tmp_path, method, options):
    """`tli plan --recipe`: the YAML, read by the independent reference (mergekit's rules), gives the
    tensors tli writes for the flags (sign of zero aside); and with dtype set, its cast."""
    src = models["a"]
    dst = str(tmp_path / "out")
    common = CommonOptions(dtype="fp16")
    result = upscale(src, dst, method, common=common, options=options)
    recipe = plan_to_recipe(result.plan, CheckpointLayout.open(src))
    assert recipe["dtype"] == "float16"
    text = recipe_yaml(recipe)
    assert "layer_range: [" in text  # mergekit's flow style for ranges
    # bf16 -> fp16 rounds values fp16 holds only as subnormals: a scaled tensor may differ by one ulp
    scaled = {t.name for t in result.plan.tensors() if t.op.kind == "scale"}
    allowed = compare(read_folder(dst), reference_merge(recipe), ulp_ok=scaled)
    assert all(v.startswith("sign of zero") or k in scaled for k, v in allowed.items()), allowed


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("tli", dict(k=2, init="average"), "averages layers"),
        ("tli", dict(k=2, init="random"), "initialised at random"),
        ("moe-upcycle", dict(experts=2, top_k=1), "moe-upcycle cannot"),
    ],
)
def test_plans_passthrough_cannot_express(models, method, options, match):
    layout = CheckpointLayout.open(models["b"])
    plan = make_plan(layout, method, CommonOptions(), **options)
    with pytest.raises(ValueError, match=match):
        plan_to_recipe(plan, layout)


BAD = {
    "other merge method": (lambda m: {**R(S(m["a"], 0, 2)), "merge_method": "slerp"}, "merge_method 'slerp'"),
    "two sources in a slice": (
        lambda m: R({"sources": S(m["a"], 0, 2)["sources"] + S(m["b"], 0, 2)["sources"]}),
        "slice 1 has 2 sources",
    ),
    "range past the end": (lambda m: R(S(m["a"], 0, 7)), "the model has 6 layers"),
    "empty range": (lambda m: R(S(m["a"], 3, 3)), "half-open"),
    "different hidden size": (lambda m: R(S(m["a"], 0, 2), S(m["narrow"], 0, 2)), "differ in hidden_size"),
    "different architecture": (
        lambda m: R(S(m["a"], 0, 2), S(m["m1"], 0, 2)),
        "different architectures|differ in model_type",
    ),
    "different dtypes, none set": (lambda m: R(S(m["a"], 0, 2), S(m["f32"], 0, 2)), "set the output dtype"),
    "no such model": (lambda m: R(S("/nonexistent/model", 0, 2)), "no such directory"),
    "lora": (lambda m: R(S(m["a"] + "+some/adapter", 0, 2)), "LoRA"),
    "scale not a number": (lambda m: R(S(m["a"], 0, 2, scale="lots")), "'lots' is not a number"),
    "tokenizer tokens": (lambda m: {**R(S(m["a"], 0, 2)), "tokenizer": {"tokens": {"<x>": {}}}}, "tokens"),
    "dtype float64": (lambda m: {**R(S(m["a"], 0, 2)), "dtype": "float64"}, "dtype 'float64'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipes_fail_before_writing(models, tmp_path, case):
    build, match = BAD[case]
    dst = str(tmp_path / "out")
    with pytest.raises(ValueError, match=match) as info:
        _run(build(models), dst, tmp_path)
    assert "\n" not in str(info.value)
    assert not os.path.exists(dst)


def test_multi_source_plan_records_every_source(models):
    a, b = models["a"], models["b"]
    layout, plan, _ = compile_recipe(parse_recipe(R(S(a, 0, 3), S(b, 1, 4))))
    ids = plan.source["sources"]
    assert [s["model"] for s in ids] == [a, b]
    assert ids[0]["files"] == CheckpointLayout.open(a).identity()["files"]
    assert ids[1]["files"] == CheckpointLayout.open(b).identity()["files"]
    assert [(e["model"], e["source"]) for e in plan.layers] == [
        (a, [0]),
        (a, [1]),
        (a, [2]),
        (b, [1]),
        (b, [2]),
        (b, [3]),
    ]
    names = {n.split("::", 1)[0] for t in plan.tensors() for n in t.op.src}
    assert names == {"0", "1"}  # tensor names qualified by source, as the engines read them


def _with_tokenizer(src: str, dst, vocab: dict, template: str) -> str:
    shutil.copytree(src, dst)
    tok = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}, "added_tokens": []}
    tok["post_processor"] = {"template": template}  # not part of the vocabulary
    json.dump(tok, open(os.path.join(dst, "tokenizer.json"), "w"))
    json.dump({"chat_template": template}, open(os.path.join(dst, "tokenizer_config.json"), "w"))
    return str(dst)


def test_tokenizer_source(models, tmp_path):
    vocab = {f"t{i}": i for i in range(128)}
    a = _with_tokenizer(models["a"], tmp_path / "ta", vocab, "A")
    b = _with_tokenizer(models["b"], tmp_path / "tb", vocab, "B")  # the same vocabulary, another template
    c = _with_tokenizer(models["b"], tmp_path / "tc", {**vocab, "t0": 127, "t127": 0}, "C")  # ids swapped
    cases = [
        (R(S(a, 0, 3), S(b, 3, 6)), a),  # no tokenizer_source: the config donor's (first slice's model)
        (R(S(a, 0, 3), S(b, 3, 6), base_model=b), b),  # base_model's, as mergekit copies it
        (R(S(a, 0, 3), S(b, 3, 6), tokenizer_source="union"), a),
        (R(S(a, 0, 3), S(b, 3, 6), tokenizer_source=b), b),
        (R(S(a, 0, 3), S(b, 3, 6), base_model=b, tokenizer_source="base"), b),
    ]
    for n, (recipe, donor) in enumerate(cases):
        dst = str(tmp_path / f"out{n}")
        _run(recipe, dst, tmp_path)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            assert open(os.path.join(dst, f)).read() == open(os.path.join(donor, f)).read(), (n, f)
    refused = [
        R(S(a, 0, 3), S(c, 3, 6), tokenizer_source="union"),  # union of different vocabularies
        R(S(a, 0, 3), S(b, 3, 6), tokenizer_source=c),  # a tokenizer the embeddings do not match
        R(S(a, 0, 3), S(c, 3, 6)),  # the head (last slice) comes from a model with other token ids
    ]
    for n, recipe in enumerate(refused):
        dst = str(tmp_path / f"bad{n}")
        with pytest.raises(ValueError, match="different vocabulary"):
            _run(recipe, dst, tmp_path)
        assert not os.path.exists(dst)
