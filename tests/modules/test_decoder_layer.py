"""tli_kernels/modules: one patched transformers decoder layer against the stock one (float32), the
residual-scale semantics, learnable alpha, folding, undo, the fallback to the stock attention, and
torch.compile without graph breaks."""

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from tests.ops.tolerance import DEVICE, assert_close, rel_error
from tli_kernels.modules import (
    TliDecoderLayer,
    fold_residual_scale,
    patch_decoder_layer,
    residual_scale_of,
    unpatch_decoder_layer,
)

F32 = torch.float32


def _config(**overrides):
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=1,
        vocab_size=32,
        rms_norm_eps=1e-5,
        **overrides,
    )
    config._attn_implementation = "sdpa"
    return config


def _layer(config, seed=0):
    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(config, layer_idx=0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    return layer.to(DEVICE)


def _inputs(config, batch=2, length=8, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(batch, length, config.hidden_size, device=DEVICE, requires_grad=True)
    position_ids = torch.arange(length, device=DEVICE)[None]
    cos, sin = LlamaRotaryEmbedding(config).to(DEVICE)(x, position_ids)
    return x, {"attention_mask": None, "position_ids": position_ids, "position_embeddings": (cos, sin)}


def _run(layer, x, kwargs):
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, **kwargs)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=F32, device=out.device)).view_as(out))
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return out, x.grad, grads


def _manual_scaled_forward(stock, x, kwargs, alpha):
    """x + a*Attn(norm x), then r + a*MLP(norm r), with the stock modules: the definition of alpha."""
    attn, _ = stock.self_attn(hidden_states=stock.input_layernorm(x), **kwargs)
    r = x + alpha * attn
    return r + alpha * stock.mlp(stock.post_attention_layernorm(r))


def test_patched_layer_matches_stock():
    config = _config()
    stock = _layer(config)
    patched = copy.deepcopy(stock)
    patch_decoder_layer(patched)
    x, kwargs = _inputs(config)

    out, dx, grads = _run(patched, x, kwargs)
    out_ref, dx_ref, grads_ref = _run(stock, x, kwargs)

    assert isinstance(patched, TliDecoderLayer) and isinstance(patched, LlamaDecoderLayer)
    assert_close(out, out_ref, F32, "out")
    assert_close(dx, dx_ref, F32, "dx")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_close(grads[name], grads_ref[name], F32, name)


def test_residual_scale_scales_both_branches():
    config = _config(attention_bias=True, mlp_bias=True)
    stock = _layer(config)
    patched = copy.deepcopy(stock)
    patch_decoder_layer(patched, residual_scale=0.5)
    x, kwargs = _inputs(config)
    with torch.no_grad():
        assert_close(patched(x, **kwargs), _manual_scaled_forward(stock, x, kwargs, 0.5), F32, "out")


def test_learnable_alpha_gets_its_gradient():
    config = _config()
    stock = _layer(config)
    patched = copy.deepcopy(stock)
    patch_decoder_layer(patched, residual_scale=0.8, learnable=True)
    alpha = patched.residual_scale
    assert isinstance(alpha, torch.nn.Parameter) and alpha.dtype == F32 and alpha.shape == (1,)
    x, kwargs = _inputs(config)

    patched(x, **kwargs).square().sum().backward()
    alpha_ref = torch.tensor([0.8], device=DEVICE, requires_grad=True)
    _manual_scaled_forward(stock, x.detach(), kwargs, alpha_ref).square().sum().backward()

    assert alpha.grad is not None and alpha.grad.abs().item() > 0
    assert_close(alpha.grad, alpha_ref.grad, F32, "d alpha")


def test_alpha_stays_out_of_the_state_dict(caplog):
    config = _config()
    stock = _layer(config)
    patched = copy.deepcopy(stock)
    patch_decoder_layer(patched, residual_scale=1.0, learnable=True)
    assert "residual_scale" in dict(patched.named_parameters())
    state = patched.state_dict()
    assert state.keys() == stock.state_dict().keys()
    patched.load_state_dict(stock.state_dict(), strict=True)  # no "missing residual_scale"

    with torch.no_grad():
        patched.residual_scale.fill_(0.7)
    with caplog.at_level("WARNING"):
        patched.state_dict()
    assert "fold_residual_scales" in caplog.text  # saving an unfolded alpha is loud, not silent


def test_fold_keeps_the_function_and_resets_alpha():
    config = _config(attention_bias=True, mlp_bias=True)
    layer = _layer(config)
    patch_decoder_layer(layer, residual_scale=0.6, learnable=True)
    x, kwargs = _inputs(config)
    with torch.no_grad():
        before = layer(x, **kwargs)
        assert fold_residual_scale(layer) == pytest.approx(0.6)
        after = layer(x, **kwargs)
    assert residual_scale_of(layer) == 1.0
    assert rel_error(after, before) < 1e-6


def test_unpatch_restores_the_stock_layer():
    config = _config()
    stock = _layer(config)
    layer = copy.deepcopy(stock)
    classes = [type(m) for m in layer.modules()]
    hooks = patch_decoder_layer(layer, residual_scale=1.0, learnable=True)
    unpatch_decoder_layer(layer, hooks)
    assert [type(m) for m in layer.modules()] == classes
    assert "residual_scale" not in dict(layer.named_parameters()) and not hasattr(layer, "residual_scale")
    x, kwargs = _inputs(config)
    with torch.no_grad():
        assert torch.equal(layer(x, **kwargs), stock(x, **kwargs))


def _recording_attention(calls: list):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention_function(module, query, key, value, attention_mask, **kwargs):
        calls.append({k: v for k, v in kwargs.items() if not torch.is_tensor(v)})
        kwargs.pop("softcap", None)  # recorded; transformers' SDPA function would refuse it
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return attention_function


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen2_moe", "phi3", "gemma2"])
def test_other_attention_implementations_get_transformers_attention_function(model_type):
    # Masks built for another implementation (here a registered one) go to transformers' function for
    # it, called with the arguments the stock forward passes: Mistral's and Phi-3's window from the
    # config, Qwen2's per layer, Gemma 2's window and soft-cap; Qwen2-MoE none (it passes none).
    from transformers import AttentionInterface, AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    calls = []
    AttentionInterface.register("tli_test_recording", _recording_attention(calls))
    config = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, vocab_size=32, sliding_window=4, pad_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "tli_test_recording"
    layer_class = type(MODEL_MAPPING[type(config)](config).layers[0])
    torch.manual_seed(0)
    stock = layer_class(config, 0)
    # Every parameter drawn here: a layer built directly may hold uninitialised memory (Qwen2-MoE's experts
    # gave NaN in both outputs on an H200, 2026-12-04).
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    stock = stock.to(DEVICE)
    patched = copy.deepcopy(stock)
    patch_decoder_layer(patched)
    x, kwargs = _inputs(config)
    with torch.no_grad():
        out = patched(x, **kwargs)
        out_ref = stock(x, **kwargs)
    assert len(calls) == 2 and calls[0] == calls[1], calls
    assert ("softcap" in calls[0]) == (model_type == "gemma2")
    assert_close(out, out_ref, F32, "out")


class _ShiftedRMSNorm(torch.nn.Module):
    """Llama's attribute names, another function: what the numerics probe must catch."""

    def __init__(self, width):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))
        self.variance_epsilon = 1e-5

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-3)).to(x.dtype)


@pytest.mark.parametrize(
    "case,message",
    [
        ("extra part", r"has parts \['extra'"),
        ("layer norm", "parts besides its weight"),
        ("other eps", "none of the RMSNorm variants"),
        ("sinks", "sinks"),
        ("cohere", "not a pre-norm, sandwich or post-norm block"),
    ],
)
def test_rejects_a_block_it_does_not_compute(case, message):
    config = _config()
    layer = _layer(config)
    if case == "extra part":
        layer.extra = torch.nn.Linear(4, 4)
    elif case == "layer norm":
        layer.input_layernorm = torch.nn.LayerNorm(config.hidden_size)
    elif case == "other eps":
        layer.post_attention_layernorm = _ShiftedRMSNorm(config.hidden_size)
    elif case == "sinks":
        layer.self_attn.sinks = torch.nn.Parameter(torch.zeros(config.num_attention_heads))
    else:
        from transformers import CohereConfig
        from transformers.models.cohere.modeling_cohere import CohereDecoderLayer

        cohere = CohereConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
        layer = CohereDecoderLayer(cohere, 0)
    classes = [type(m) for m in layer.modules()]
    with pytest.raises(ValueError, match=message):
        patch_decoder_layer(layer)
    assert [type(m) for m in layer.modules()] == classes  # refused before anything changed


def _gemma3_layer():
    # The other block shape: sandwich norms with Gemma's (1 + w), per-head q/k norms, the tanh-GELU gate.
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

    config = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, num_hidden_layers=1, vocab_size=32, rms_norm_eps=1e-5)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Gemma3DecoderLayer(config, layer_idx=0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    return layer.to(DEVICE)


@pytest.mark.parametrize("block", ["llama", "gemma3"])
def test_compile_has_no_graph_breaks(block):
    # Under the interpreter the kernels run eagerly inside their custom ops; torch.compile sees opaque
    # nodes with fake implementations, so fullgraph tracing (forward and backward) must succeed.
    config = _config()
    layer = _layer(config) if block == "llama" else _gemma3_layer()
    patch_decoder_layer(layer, residual_scale=0.5, learnable=True)
    x, kwargs = _inputs(config)

    def step(x):
        return layer(x, **kwargs)

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    grad_alpha = layer.residual_scale.grad.clone()
    layer.residual_scale.grad = None
    eager = step(x)
    eager.sum().backward()
    assert_close(out, eager, F32, "compiled vs eager")
    assert_close(grad_alpha, layer.residual_scale.grad, F32, "d alpha compiled vs eager")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("learnable", [False, True])
def test_both_branches_and_the_fold_apply_the_same_float32_alpha(dtype, learnable):
    # alpha = 0.3 is 0.30078 in bf16 and 0.30005 in fp16: a branch that rounded it would be off by a
    # unit in the last place on a good share of the elements. bf16 runs on the reference path (the
    # interpreter truncates bf16 stores), fp16 on the kernels under the interpreter.
    from tli_kernels.ops import ops_backend

    config = _config()
    layer = _layer(config).to(dtype)
    weights = {name: getattr(layer, name[0]).get_submodule(name[1]).weight.detach().clone()
               for name in (("self_attn", "o_proj"), ("mlp", "down_proj"))}  # fmt: skip
    patch_decoder_layer(layer, residual_scale=0.3, learnable=learnable)
    alpha32 = torch.tensor(0.3, dtype=torch.float32).double().item()
    captured = {}
    layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("attn", o))
    layer.mlp.register_forward_hook(lambda m, i, o: captured.__setitem__("mlp", o))
    x, kwargs = _inputs(config)
    x = (x.detach() * 0.05).to(dtype)  # a small residual: the branches decide the rounding of the sums
    kwargs["position_embeddings"] = tuple(t.to(dtype) for t in kwargs["position_embeddings"])
    with ops_backend("reference" if dtype == torch.bfloat16 else "auto"), torch.no_grad():
        out = layer(x, **kwargs)

    def scaled(r, b, alpha):
        return (r.double() + alpha * b.double()).to(dtype)

    residual = scaled(x, captured["attn"], alpha32)
    want = scaled(residual, captured["mlp"], alpha32)
    rounded = torch.tensor(0.3).to(dtype).double().item()
    wrong = scaled(scaled(x, captured["attn"], alpha32), captured["mlp"], rounded)  # alpha rounded on one branch
    assert (wrong != want).float().mean().item() > 0.05  # the test can tell the two apart
    assert (out != want).float().mean().item() < 0.01  # float32 vs float64 arithmetic: rare boundary cases

    assert fold_residual_scale(layer) == alpha32
    for (module, proj), before in weights.items():
        after = getattr(layer, module).get_submodule(proj).weight
        assert torch.equal(after, (before.float() * torch.tensor(0.3, dtype=torch.float32)).to(dtype)), proj
