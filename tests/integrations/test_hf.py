"""tli_kernels/integrations/hf.py: apply_tli_kernels on whole transformers models (SmolLM2- and
Llama-3-shaped, Mistral, Qwen2) against unpatched copies in float32: logits, loss, gradients, padding,
eager attention, generate with a KV cache, undo, state dicts, learnable alpha, folding through
save/load, provenance. Every other family: test_families.py."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.integrations.models import DEVICE, batch, tiny_model
from tests.ops.tolerance import rel_error
from tli_kernels.integrations import PROVENANCE_FILE, apply_tli_kernels, fold_residual_scales
from tli_kernels.modules import TliDecoderLayer

# Whole models in float32: the kernels round in a different order than PyTorch's ops, nothing more
# (measured: logits ~8e-7, gradients ~2e-6 relative).
LOGITS_TOL = 1e-5
GRAD_TOL = 1e-5


def _patched_copy(model, **kwargs):
    patched = copy.deepcopy(model)
    return patched, apply_tli_kernels(patched, **kwargs)


def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("shape", ["smollm2", "llama3"])
@pytest.mark.parametrize("left_pad", [0, 3])
def test_same_logits_loss_and_gradients(shape, left_pad):
    stock = tiny_model(shape)
    patched, _ = _patched_copy(stock)
    ids, mask = batch(seed=1, left_pad=left_pad)

    logits, loss, grads = _loss_and_grads(patched, ids, mask)
    logits_ref, loss_ref, grads_ref = _loss_and_grads(stock, ids, mask)

    real = mask.bool()  # padded positions carry no meaning (and no loss)
    assert rel_error(logits[real], logits_ref[real]) < LOGITS_TOL
    assert rel_error(loss, loss_ref) < LOGITS_TOL
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        assert rel_error(grad, grads_ref[name]) < GRAD_TOL, name


def test_eager_attention_matches_with_left_padding():
    # The eager implementation's float masks leave the left-padded rows with no key to see; SDPA's backward
    # on such rows differs from the written-out attention the stock eager forward computes (v_proj's
    # gradient 4.3x off when tli sent them to SDPA), so eager models call the family's eager function.
    stock = tiny_model("llama3")
    stock.config._attn_implementation = "eager"
    patched, _ = _patched_copy(stock)
    ids, mask = batch(seed=12, left_pad=3)
    logits, loss, grads = _loss_and_grads(patched, ids, mask)
    logits_ref, loss_ref, grads_ref = _loss_and_grads(stock, ids, mask)
    assert rel_error(logits[mask.bool()], logits_ref[mask.bool()]) < LOGITS_TOL
    assert rel_error(loss, loss_ref) < LOGITS_TOL
    for name, grad in grads.items():
        assert rel_error(grad, grads_ref[name]) < GRAD_TOL, name


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_fused_gate_up_projection_matches(mlp_bias):
    stock = tiny_model("llama3", mlp_bias=mlp_bias)
    patched, _ = _patched_copy(stock, fuse_gate_up=True)
    assert patched.model.layers[0].mlp._tli_fuse_gate_up
    ids, mask = batch(seed=10, left_pad=2)
    logits, loss, grads = _loss_and_grads(patched, ids, mask)
    logits_ref, loss_ref, grads_ref = _loss_and_grads(stock, ids, mask)
    assert rel_error(logits[mask.bool()], logits_ref[mask.bool()]) < LOGITS_TOL
    assert rel_error(loss, loss_ref) < LOGITS_TOL
    for name, grad in grads.items():
        assert rel_error(grad, grads_ref[name]) < GRAD_TOL, name
    assert list(patched.state_dict()) == list(stock.state_dict())


@pytest.mark.parametrize(
    "shape,cache", [("smollm2", "dynamic"), ("llama3", "dynamic"), ("llama3", "static"), ("mistral", "dynamic"),
                    ("qwen2", "dynamic")],
)  # fmt: skip
def test_generate_gives_the_same_tokens_with_cache(shape, cache):
    stock = tiny_model(shape)
    patched, _ = _patched_copy(stock)
    ids, mask = batch(seed=2, length=6, left_pad=2)
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    if cache == "static":
        settings["cache_implementation"] = "static"
    with torch.no_grad():
        tokens = patched.generate(ids, **settings)
        tokens_ref = stock.generate(ids, **settings)
    assert torch.equal(tokens, tokens_ref)


@pytest.mark.parametrize("shape", ["mistral", "qwen2"])
def test_other_llama_family_models_match(shape):
    stock = tiny_model(shape)
    patched, _ = _patched_copy(stock)
    ids, mask = batch(seed=3, left_pad=2)
    with torch.no_grad():
        logits = patched(input_ids=ids, attention_mask=mask).logits
        logits_ref = stock(input_ids=ids, attention_mask=mask).logits
    assert rel_error(logits[mask.bool()], logits_ref[mask.bool()]) < LOGITS_TOL


def test_state_dict_keys_and_values_are_unchanged():
    stock = tiny_model("llama3")
    patched, handle = _patched_copy(stock, residual_scales={1: 1.0}, learnable_alpha=True)
    assert handle.learnable_layers == [1]
    state, state_ref = patched.state_dict(), stock.state_dict()
    assert list(state) == list(state_ref)
    assert all(torch.equal(state[k], state_ref[k]) for k in state)
    assert "model.layers.1.residual_scale" in dict(patched.named_parameters())


def test_undo_restores_the_original_modules():
    model = tiny_model("smollm2")
    ids, _ = batch(seed=4)
    with torch.no_grad():
        before = model(ids).logits
    modules_before = [(name, module, type(module)) for name, module in model.named_modules()]
    handle = apply_tli_kernels(model, residual_scales={1: 1.0}, learnable_alpha=True)
    assert isinstance(model.model.layers[0], TliDecoderLayer)
    with pytest.raises(RuntimeError, match="already patched"):
        apply_tli_kernels(model)
    handle.undo()
    after_modules = [(name, module, type(module)) for name, module in model.named_modules()]
    assert [(n, id(m), t) for n, m, t in after_modules] == [(n, id(m), t) for n, m, t in modules_before]
    assert not any("residual_scale" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_undo_folds_alpha_so_the_function_stays():
    model = tiny_model("llama3")
    handle = apply_tli_kernels(model, residual_scales={1: 0.6})
    ids, _ = batch(seed=11)
    with torch.no_grad():
        patched = model(ids).logits
        assert handle.undo() == {1: pytest.approx(0.6)}
        assert rel_error(model(ids).logits, patched) < LOGITS_TOL
    assert handle.undo() == {}  # a second undo does nothing


def test_learnable_alpha_trains():
    model = tiny_model("llama3")
    handle = apply_tli_kernels(model, residual_scales={1: 1.0, 2: 1.0}, learnable_alpha=True)
    model.train()
    ids, mask = batch(seed=5)
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if "residual_scale" in n], lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    for index in (1, 2):
        grad = model.model.layers[index].residual_scale.grad
        assert grad is not None and grad.abs().item() > 0
    assert not hasattr(model.model.layers[0], "residual_scale") or not isinstance(
        model.model.layers[0].residual_scale, torch.nn.Parameter
    )
    optimizer.step()
    assert set(handle.current_scales()) == {1, 2}
    assert all(alpha != 1.0 for alpha in handle.current_scales().values())


def test_fold_gives_the_same_logits_after_save_and_load(tmp_path):
    model = tiny_model("smollm2")
    apply_tli_kernels(model, residual_scales={1: 0.5}, learnable_alpha=True)
    with torch.no_grad():
        model.model.layers[1].residual_scale.fill_(0.73)  # as if training had moved it
    ids, _ = batch(seed=6)
    with torch.no_grad():
        unfolded = model(ids).logits
        assert fold_residual_scales(model) == {1: pytest.approx(0.73)}
        folded = model(ids).logits
    assert rel_error(folded, unfolded) < LOGITS_TOL

    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    reloaded = reloaded.to(DEVICE)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not isinstance(reloaded.model.layers[0], TliDecoderLayer)  # a stock model
    with torch.no_grad():
        assert rel_error(reloaded.eval()(ids).logits, unfolded) < LOGITS_TOL


def test_gradient_checkpointing_and_hidden_states_still_work():
    stock = tiny_model("llama3")
    patched, _ = _patched_copy(stock)
    for model in (stock, patched):
        # transformers renamed it in 5.2x; the old name still works there, with a warning
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.train()
    ids, mask = batch(seed=7)
    _, loss, grads = _loss_and_grads(patched, ids, mask)
    _, loss_ref, grads_ref = _loss_and_grads(stock, ids, mask)
    assert rel_error(loss, loss_ref) < LOGITS_TOL
    for name in grads:
        assert rel_error(grads[name], grads_ref[name]) < GRAD_TOL, name

    with torch.no_grad():
        hidden = patched.eval()(ids, output_hidden_states=True).hidden_states
        hidden_ref = stock.eval()(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == len(hidden_ref) == stock.config.num_hidden_layers + 1
    for h, h_ref in zip(hidden, hidden_ref, strict=True):
        assert rel_error(h, h_ref) < LOGITS_TOL


# ------------------------------------------------------------------------------------ provenance
def _saved_with_provenance(tmp_path, **provenance_fields):
    model = tiny_model("llama3")
    model.save_pretrained(tmp_path)
    layers = model.config.num_hidden_layers
    provenance = {
        "tool": "tli_kernels",
        "version": "0.1.0",
        "method": "tli",
        "options": {"k": 2},
        "layers": [{"index": i, "role": "injected" if i == 2 else "original"} for i in range(layers)],
        "injected_layers": [2],
        "residual_scales": {"2": 0.5},
        "alpha_folded": True,
    }
    provenance.update(provenance_fields)
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps(provenance))
    return model, AutoModelForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()


def test_provenance_with_folded_alpha_starts_injected_layers_at_one(tmp_path):
    stock, loaded = _saved_with_provenance(tmp_path)
    handle = apply_tli_kernels(loaded, learnable_alpha=True)
    assert handle.residual_scales == {2: 1.0} and handle.learnable_layers == [2]
    ids, _ = batch(seed=8)
    with torch.no_grad():
        assert rel_error(loaded(ids).logits, stock(ids).logits) < LOGITS_TOL


def test_provenance_with_unfolded_alpha_applies_it(tmp_path):
    stock, loaded = _saved_with_provenance(tmp_path, alpha_folded=False)
    handle = apply_tli_kernels(loaded)
    assert handle.residual_scales == {2: 0.5} and handle.learnable_layers == []
    expected = copy.deepcopy(stock)
    with torch.no_grad():  # what alpha = 0.5 on layer 2 means, written into the stock weights
        expected.model.layers[2].self_attn.o_proj.weight.mul_(0.5)
        expected.model.layers[2].mlp.down_proj.weight.mul_(0.5)
        ids, _ = batch(seed=9)
        assert rel_error(loaded(ids).logits, expected(ids).logits) < LOGITS_TOL


def test_no_provenance_means_alpha_one_and_nothing_learnable(tmp_path, caplog):
    model = tiny_model("llama3")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(DEVICE)
    with caplog.at_level("WARNING"):
        handle = apply_tli_kernels(loaded, learnable_alpha=True)
    assert handle.residual_scales == {} and handle.learnable_layers == []
    assert "no alpha will learn" in caplog.text
    assert not any("residual_scale" in n for n, _ in loaded.named_parameters())


def test_explicit_scales_win_over_provenance(tmp_path):
    _, loaded = _saved_with_provenance(tmp_path)
    handle = apply_tli_kernels(loaded, residual_scales={0: 0.9})
    assert handle.residual_scales == {0: 0.9}


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"layers": [{"index": 0}]}, "lists 1 layers but the model has 3"),
        ({"tool": "mergekit"}, "not a tli_kernels provenance"),
        ({"alpha_folded": False, "residual_scales": {}}, "lacks layers"),
    ],
)
def test_bad_provenance_is_a_clear_error(tmp_path, fields, message):
    _, loaded = _saved_with_provenance(tmp_path, **fields)
    with pytest.raises(ValueError, match=message):
        apply_tli_kernels(loaded)


def test_bad_arguments_are_clear_errors():
    model = tiny_model("mistral")
    with pytest.raises(ValueError, match=r"layer index 5 is not in \[0, 2\)"):
        apply_tli_kernels(model, residual_scales={5: 0.5})
    with pytest.raises(ValueError, match="finite number"):
        apply_tli_kernels(model, residual_scales={1: float("nan")})


def test_kernels_run_under_the_interpreter_on_cpu():
    # These tests mean something on CPU only if the Triton kernels ran (not the PyTorch fallback).
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernels run compiled")
    from tli_kernels.ops._triton import use_triton
    from tli_kernels.ops.rms_norm import _rms_norm_fwd_kernel

    assert use_triton(_rms_norm_fwd_kernel, torch.empty(1)), (
        "triton was imported before TRITON_INTERPRET=1 was set: run the suite with TRITON_INTERPRET=1"
    )
