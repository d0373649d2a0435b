"""FP8 checkpoints grown without dequantising (tli_kernels/checkpoint/quant.py), and dequantised on
the way with --dtype: against float64 dequantisation of tiny checkpoints written with safetensors,
both engines byte for byte, the quantisation config renumbered, transformers loading the output."""

from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch
from safetensors import safe_open

from tests.checkpoint.fp8_fixtures import SCHEMES, dequant64, save_fp8_model
from tli_kernels.checkpoint import executor_native
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.methods import CommonOptions
from tli_kernels.methods.tli import layer_map
from tli_kernels.upscale import upscale

ENGINES = ["python"] + (["native"] if executor_native.available() else [])
N = 6
BRANCH_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")


def read_all(path: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for fname in files:
        with safe_open(os.path.join(path, fname), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def run(src, dst, engine, dtype="keep", **options):
    upscale(src, dst, options.pop("method", "tli"), options=options, engine=engine,
            common=CommonOptions(dtype=dtype, shard_size=100_000))  # fmt: skip
    return dst


def block_of(q: torch.Tensor, s: torch.Tensor, cfg: dict) -> tuple[int, int]:
    rows, cols = q.shape
    if s.numel() == 1:
        return rows, cols
    if list(s.shape) == [rows, 1]:
        return 1, cols
    return tuple(cfg["quantization_config"]["weight_block_size"])


def scale_name(tensors: dict, module: str) -> str | None:
    return next((f"{module}.{s}" for s in ("weight_scale_inv", "weight_scale") if f"{module}.{s}" in tensors), None)


def real_weights(tensors: dict, cfg: dict) -> dict[str, torch.Tensor]:
    """Every weight as float64: FP8 ones dequantised exactly, others widened."""
    out = {}
    for name, t in tensors.items():
        if not name.endswith(".weight"):
            continue
        s = scale_name(tensors, name[: -len(".weight")])
        out[name] = dequant64(t, tensors[s], block_of(t, tensors[s], cfg)) if s else t.to(torch.float64)
    return out


def same_files(a: str, b: str) -> bool:
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(
        filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False) for f in names if f.endswith(".safetensors")
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return {s: save_fp8_model(str(root / s), s, layers=N) for s in SCHEMES}


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.3])
def test_copy_stays_fp8_and_dequantises_to_the_alpha_scaled_source(tmp_path, sources, scheme, alpha):
    src = sources[scheme]
    outs = [run(src, str(tmp_path / e), e, k=2, init="copy", alpha=alpha) for e in ENGINES]
    assert all(same_files(outs[0], o) for o in outs[1:])
    s_t, o_t = read_all(src), read_all(outs[0])
    s_cfg, o_cfg = config(src), config(outs[0])
    assert o_cfg["num_hidden_layers"] == N + N // 2
    s_real, o_real = real_weights(s_t, s_cfg), real_weights(o_t, o_cfg)
    for j, layer in enumerate(layer_map(N, 2, "copy", alpha)):
        (i,) = layer.sources
        for suffix in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            src_name, out_name = f"model.layers.{i}.{suffix}", f"model.layers.{j}.{suffix}"
            w, w_src = o_t[out_name + ".weight"], s_t[src_name + ".weight"]
            assert w.dtype == w_src.dtype  # FP8 stays FP8 (BF16 stays BF16)
            a = layer.alpha if layer.role == "injected" and suffix in BRANCH_OUTPUTS else 1.0
            s = scale_name(s_t, src_name)
            if s is None:  # unquantised (fbgemm keeps some modules BF16): the plain rule
                assert torch.equal(w, (w_src.float() * torch.tensor(a, dtype=torch.float32)).to(w.dtype))
                continue
            assert torch.equal(w.view(torch.uint8), w_src.view(torch.uint8))  # the FP8 bytes themselves
            if a in (0.5, 1.0):  # powers of two: exact
                assert torch.equal(o_real[out_name + ".weight"], s_real[src_name + ".weight"] * a), out_name
            else:  # one rounding of the scale: f32(s) * f32(a), in the scale's dtype
                want = (s_t[s].float() * torch.tensor(a, dtype=torch.float32)).to(s_t[s].dtype)
                assert torch.equal(o_t[scale_name(o_t, out_name)], want), out_name
                got, ref = o_real[out_name + ".weight"], s_real[src_name + ".weight"] * a
                assert torch.allclose(got, ref, rtol=2**-7 if s_t[s].dtype == torch.bfloat16 else 2**-23, atol=0)
            if src_name + ".input_scale" in s_t:  # activation scales never take alpha
                assert torch.equal(o_t[out_name + ".input_scale"], s_t[src_name + ".input_scale"])
    assert set(o_t) == {n.replace(f".{i}.", f".{j}.", 1) for j, layer in enumerate(layer_map(N, 2, "copy", alpha))
                        for i in layer.sources for n in s_t if n.startswith(f"model.layers.{i}.")} | {
        n for n in s_t if not n.startswith("model.layers.")}  # fmt: skip


def not_converted_from_weights(tensors: dict, n_layers: int) -> set[str]:
    """What modules_to_not_convert must say: every decoder linear whose weight is not FP8."""
    out = set()
    for j in range(n_layers):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # fmt: skip
            if tensors[f"model.layers.{j}.{m}.weight"].dtype != torch.float8_e4m3fn:
                out.add(f"model.layers.{j}.{m}")
    return out


@pytest.mark.parametrize(
    "method,options",
    [
        ("tli", {"k": 2, "init": "zero"}),
        ("tli", {"k": 3, "init": "copy"}),
        ("dus", {"m": 2}),
        ("stack", {"times": 2}),
        ("passthrough", {"layers": "0-3,2-5"}),
    ],  # fmt: skip
)
def test_fbgemm_modules_to_not_convert_follow_the_layers(tmp_path, sources, method, options):
    out = run(sources["fbgemm"], str(tmp_path / "out"), ENGINES[-1], method=method, **options)
    cfg, tensors = config(out), read_all(out)
    listed = cfg["quantization_config"]["modules_to_not_convert"]
    assert "lm_head" in listed
    assert set(listed) - {"lm_head"} == not_converted_from_weights(tensors, cfg["num_hidden_layers"])
    assert len(listed) == len(set(listed))
    assert cfg["quantization_config"]["activation_scale_ub"] == 1200.0


@pytest.mark.parametrize("scheme", ["block-bf16", "ct-tensor"])
def test_zero_init_zeroes_fp8_branch_outputs_and_keeps_their_scales(tmp_path, sources, scheme):
    src = sources[scheme]
    outs = [run(src, str(tmp_path / e), e, k=2, init="zero") for e in ENGINES]
    assert all(same_files(outs[0], o) for o in outs[1:])
    s_t, o_t = read_all(src), read_all(outs[0])
    for j, layer in enumerate(layer_map(N, 2, "zero", 1.0)):
        if layer.role != "injected":
            continue
        (i,) = layer.sources
        for m in BRANCH_OUTPUTS:
            w = o_t[f"model.layers.{j}.{m}.weight"]
            assert w.dtype == torch.float8_e4m3fn and not w.view(torch.uint8).any()
            s = scale_name(s_t, f"model.layers.{i}.{m}")
            assert torch.equal(o_t[s.replace(f".{i}.", f".{j}.", 1)], s_t[s])
        q = f"model.layers.{j}.self_attn.q_proj.weight"
        assert torch.equal(o_t[q].view(torch.uint8), s_t[q.replace(f".{j}.", f".{i}.", 1)].view(torch.uint8))


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_dtype_dequantises_while_streaming(tmp_path, sources, scheme, dtype):
    src = sources[scheme]
    outs = [run(src, str(tmp_path / e), e, dtype=dtype, k=2, init="average", alpha=0.5) for e in ENGINES]
    assert all(same_files(outs[0], o) for o in outs[1:])
    s_t, o_t = read_all(src), read_all(outs[0])
    s_cfg, o_cfg = config(src), config(outs[0])
    assert "quantization_config" not in o_cfg
    assert not any(n.endswith(("_scale", "_scale_inv")) for n in o_t)
    target = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    assert all(t.dtype == target for t in o_t.values())

    def deq32(name):  # torch's arithmetic, as transformers' Fp8Dequantize: f32(q) * f32(scale)
        q, s = s_t[name], s_t[scale_name(s_t, name[: -len(".weight")])]
        rows, cols = q.shape
        from tests.checkpoint.fp8_fixtures import expand

        return q.float() * expand(s.float(), rows, cols, *block_of(q, s, s_cfg))

    for j, layer in enumerate(layer_map(N, 2, "average", 0.5)):
        for m in ("self_attn.q_proj", "mlp.down_proj"):
            names = [f"model.layers.{i}.{m}.weight" for i in layer.sources]
            if s_t[names[0]].dtype != torch.float8_e4m3fn:
                continue
            x = deq32(names[0])
            for n in names[1:]:
                x = x + deq32(n)
            if len(names) > 1:
                x = x / len(names)
            if layer.role == "injected" and m in BRANCH_OUTPUTS:
                x = x * 0.5
            assert torch.equal(o_t[f"model.layers.{j}.{m}.weight"], x.to(target)), (j, m)


def test_average_and_random_of_fp8_layers_are_refused(tmp_path, sources):
    for init in ("average", "random"):
        with pytest.raises(ValueError, match=rf"--init {init} on an FP8-quantized weight .* --dtype bf16\|fp32"):
            run(sources["block-f32"], str(tmp_path / init), "python", k=2, init=init)


def test_unsupported_quantisation_is_refused_in_one_line(tmp_path, sources):
    import shutil

    src = str(tmp_path / "gptq")
    shutil.copytree(sources["ct-channel"], src)
    cfg = config(src)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"quantized checkpoints \(gptq\) are not supported") as e:
        run(src, str(tmp_path / "out"), "python", k=2)
    assert "\n" not in str(e.value)
    cfg["quantization_config"] = json.loads(json.dumps(config(sources["ct-channel"])["quantization_config"]))
    cfg["quantization_config"]["ignore"] = ["lm_head", r"re:model\.layers\.3\..*"]
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="names layers by a pattern"):
        run(src, str(tmp_path / "out2"), "python", k=2)


def test_odd_block_grid_both_engines(tmp_path):
    """A block that does not divide the weight (scale grid rounded up), BF16 scales, dequantised."""
    src = save_fp8_model(str(tmp_path / "src"), "block-bf16", layers=4, block=(24, 40))
    outs = [run(src, str(tmp_path / e), e, dtype="fp32", k=2, init="copy", alpha=0.75) for e in ENGINES]
    assert all(same_files(outs[0], o) for o in outs[1:])
    s_t, o_t = read_all(src), read_all(outs[0])
    s_real = real_weights(s_t, config(src))
    got = o_t["model.layers.2.mlp.down_proj.weight"].double()  # injected copy of layer 1
    ref = s_real["model.layers.1.mlp.down_proj.weight"] * 0.75
    assert torch.allclose(got, ref, rtol=2**-22, atol=0)
    keep = [run(src, str(tmp_path / f"keep-{e}"), e, k=2, init="copy", alpha=0.75) for e in ENGINES]
    assert all(same_files(keep[0], o) for o in keep[1:])


def _hook_reference_logits(src_tensors: dict, cfg: dict, layers, ids):
    """Independent reference: a plain bf16 model of the source's config whose layer j is source layer
    layers[j] (dequantised here in float64), with each injected layer's branches scaled by hooks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    c = dict(cfg)
    c.pop("quantization_config")
    c.pop("layer_types", None)  # all full attention here; rebuilt for the new count
    c["num_hidden_layers"] = len(layers)
    # Built in bf16 (not .to(bf16), which would round the rotary inv_freq buffer as a loaded model does not)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**c), attn_implementation="eager",
                                             dtype=torch.bfloat16).eval()  # fmt: skip
    real = real_weights(src_tensors, cfg)
    state = {}
    for name in src_tensors:
        if not name.endswith(".weight"):
            continue
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            for j, layer in enumerate(layers):
                if layer.sources[0] == i:
                    state[name.replace(f".{i}.", f".{j}.", 1)] = real[name].to(torch.bfloat16)
        else:
            state[name] = real[name].to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    for j, layer in enumerate(layers):
        if layer.role == "injected" and layer.alpha != 1.0:
            for mod in (model.model.layers[j].self_attn, model.model.layers[j].mlp):
                a = layer.alpha
                mod.register_forward_hook(lambda m, i, o, a=a: (o[0] * a, *o[1:]) if isinstance(o, tuple) else o * a)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("scale", ["block-f32", "block-bf16"])
def test_transformers_loads_block_fp8_output_on_cpu_with_the_same_logits(tmp_path, sources, scale):
    from transformers import AutoModelForCausalLM

    src = sources[scale]
    out = run(src, str(tmp_path / "out"), ENGINES[-1], k=2, init="copy", alpha=0.5)
    model, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.eval()(ids).logits
    want = _hook_reference_logits(read_all(src), config(src), layer_map(N, 2, "copy", 0.5), ids)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", ["keep", "bf16"])
def test_mtp_layer_after_the_stack_is_renumbered(tmp_path, dtype):
    """DeepSeek-V3 keeps its multi-token-prediction module at index num_hidden_layers: it is carried
    outside the stack and moves to the output's num_hidden_layers."""
    src = save_fp8_model(str(tmp_path / "src"), "block-f32", layers=4, mtp=True)
    outs = [run(src, str(tmp_path / e), e, dtype=dtype, k=2, init="zero") for e in ENGINES]
    assert all(same_files(outs[0], o) for o in outs[1:])
    s_t, o_t = read_all(src), read_all(outs[0])
    assert config(outs[0])["num_hidden_layers"] == 6 and config(outs[0])["num_nextn_predict_layers"] == 1
    mtp_src = {n[len("model.layers.4.") :] for n in s_t if n.startswith("model.layers.4.")}
    mtp_out = {n[len("model.layers.6.") :] for n in o_t if n.startswith("model.layers.6.")}
    assert not any(n.startswith("model.layers.7.") for n in o_t)
    if dtype == "keep":
        assert mtp_out == mtp_src
        for rest in mtp_src:
            a, b = s_t[f"model.layers.4.{rest}"], o_t[f"model.layers.6.{rest}"]
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    else:
        assert mtp_out == {r for r in mtp_src if not r.endswith("_scale_inv")}
        real = real_weights(s_t, config(src))["model.layers.4.eh_proj.weight"]
        assert torch.equal(o_t["model.layers.6.eh_proj.weight"], real.float().to(torch.bfloat16))


def test_synthetic_fbgemm_layout_both_engines(tmp_path):
    """checkpoint/synthetic.py's Llama-3.1-405B-FP8 layout at small shapes, dense: kept FP8 and
    dequantised, both engines alike, modules_to_not_convert naming exactly the BF16 linears."""
    from tli_kernels.checkpoint.synthetic import llama_config, write_checkpoint

    cfg = llama_config("llama-3.1-405b", hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128)  # fmt: skip
    src = str(tmp_path / "src")
    write_checkpoint(src, cfg, quant="fbgemm-fp8", num_shards=3)
    for dtype in ("keep", "fp32"):
        outs = [run(src, str(tmp_path / f"{dtype}-{e}"), e, dtype=dtype, k=2, init="copy", alpha=0.25) for e in ENGINES]
        assert all(same_files(outs[0], o) for o in outs[1:])
        o_cfg, o_t = config(outs[0]), read_all(outs[0])
        assert o_cfg["num_hidden_layers"] == 7
        if dtype == "keep":
            listed = set(o_cfg["quantization_config"]["modules_to_not_convert"]) - {"lm_head"}
            assert listed == not_converted_from_weights(o_t, 7)
            # output layers 0 1 1' 2 3 3' 4 from source layers whose MLPs are FP8 for 1..3: five layers
            assert sum(t.dtype == torch.float8_e4m3fn for t in o_t.values()) == 5 * 3
        else:
            assert "quantization_config" not in o_cfg and all(t.dtype == torch.float32 for t in o_t.values())
            s_real = real_weights(read_all(src), cfg | {"quantization_config": {}})
            got = o_t["model.layers.2.mlp.down_proj.weight"].double()  # injected after layer 1 (FP8)
            assert torch.allclose(got, s_real["model.layers.1.mlp.down_proj.weight"] * 0.25, rtol=2**-23, atol=0)
            got = o_t["model.layers.3.mlp.down_proj.weight"].double()  # source layer 2, alpha 1
            assert torch.allclose(got, s_real["model.layers.2.mlp.down_proj.weight"], rtol=2**-23, atol=0)


@pytest.mark.skipif(not executor_native.available(), reason="the native engine is not built")
def test_synthetic_405b_fp8_sparse_layout(tmp_path):
    """The real 405B-FP8 shapes, four layers, data as holes: the plan and the native engine (the Python
    engine writes holes as data: gigabytes here), the output sparse too."""
    from tli_kernels.checkpoint.layout import CheckpointLayout
    from tli_kernels.checkpoint.synthetic import write_preset

    src = str(tmp_path / "src")
    write_preset(src, "llama-3.1-405b", fill="sparse", layers=4, quant="fbgemm-fp8")
    layout = CheckpointLayout.open(src)
    assert layout.tensors["model.layers.1.mlp.up_proj.weight"].dtype == "F8_E4M3"
    assert layout.tensors["model.layers.1.mlp.up_proj.weight_scale"].shape == (53248, 1)
    assert layout.tensors["model.layers.0.mlp.up_proj.weight"].dtype == "BF16"
    dst = run(src, str(tmp_path / "out"), "native", k=2, init="copy", alpha=0.5)
    out = CheckpointLayout.open(dst)
    assert sum(os.stat(h.path).st_blocks * 512 for h in out.files.values()) < 64 << 20
    assert out.num_layers == 6 and out.tensors["model.layers.2.mlp.up_proj.weight"].dtype == "F8_E4M3"


def test_scale_grid_that_does_not_fit_the_config_is_refused(tmp_path, sources):
    import shutil

    src = str(tmp_path / "src")
    shutil.copytree(sources["block-f32"], src)
    cfg = config(src)
    cfg["quantization_config"]["weight_block_size"] = [8, 8]  # the files hold 16 x 32 blocks
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(
        CheckpointError, match=r"has shape \[\d+, \d+\] for a \d+x\d+ weight; the fp8 scheme wants"
    ) as e:
        run(src, str(tmp_path / "out"), "python", k=2)
    assert "\n" not in str(e.value)


def test_recipe_and_moe_upcycle_refuse_fp8_sources_in_one_line(tmp_path, sources):
    src = sources["block-f32"]
    with pytest.raises(CheckpointError, match="--method moe-upcycle does not take FP8-quantized sources yet"):
        run(src, str(tmp_path / "moe"), "python", method="moe-upcycle", experts=2, top_k=1)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"slices:\n  - sources:\n      - model: {src}\n        layer_range: [0, 4]\n"
        f"  - sources:\n      - model: {src}\n        layer_range: [2, 6]\nmerge_method: passthrough\n"
    )
    with pytest.raises(CheckpointError, match="a recipe does not take FP8-quantized sources yet"):
        upscale(str(recipe), str(tmp_path / "rec"), None, engine="python")
