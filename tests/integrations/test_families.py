"""apply_tli_kernels on every decoder family of tests/architectures/models.py (tiny random models with
non-trivial norms and biases), against stock transformers in float32: logits, loss and every gradient;
greedy generate() with the KV cache; a learnable alpha on one layer against the stock model with forward
hooks scaling that layer's branch modules (the tests' own reading of each family, not tli's rule), then
folded, saved and loaded by stock transformers; what `handle.report` says; families without kernels left
stock, bit for bit. On a CUDA machine the models live on the GPU, so the compiled kernels are tested."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.architectures.models import FAMILIES, build_model
from tests.ops.tolerance import DEVICE, rel_error
from tli_kernels.architectures import BY_MODEL_TYPE
from tli_kernels.architectures.fold import fold_into_state_dict
from tli_kernels.integrations import KERNEL_FAMILIES, apply_tli_kernels, fold_residual_scales

LOGITS_TOL = 1e-5  # as tests/integrations/test_hf.py: the kernels round in another order, nothing more
GRAD_TOL = 1e-5
# d alpha sums branch * gradient over every element of a layer; here the terms cancel to about 1/100 of
# their size, so its relative error is that much larger than the elements' (measured: up to 1.3e-5).
ALPHA_GRAD_TOL = 1e-4
LAYERS = 3  # with the overrides below: a sliding-window layer (Qwen2), local and global (Gemma 3), NoPE (SmolLM3)
VOCAB = 128


def _family(model_type: str):
    """The tests' family, 3 layers, windows of 4 tokens (so that they bite in an 8-token prompt)."""
    family = FAMILIES[model_type]
    config = {**family.config, "num_hidden_layers" if family.base else family.count_key: LAYERS}
    if "sliding_window" in config:
        config["sliding_window"] = 4
    if model_type == "qwen2":
        config["max_window_layers"] = 2
    return dataclasses.replace(family, config=config)


SUPPORTED = [t for t in FAMILIES if t in KERNEL_FAMILIES]
STOCK_FAMILIES = [t for t in FAMILIES if t not in KERNEL_FAMILIES]
# What stays stock in a supported family, by kind of module: (reason fragment, layers).
EXPECTED_STOCK = {
    "mixtral": {"mlp": ("MoE block", range(LAYERS))},
    "qwen2_moe": {"mlp": ("MoE block", range(LAYERS))},
    "qwen3_moe": {"mlp": ("MoE block", range(1, LAYERS))},  # layer 0 is dense (mlp_only_layers)
}


def _model(model_type: str):
    torch.manual_seed(0)
    return build_model(_family(model_type)).to(DEVICE)


def _batch(length: int = 8, left_pad: int = 2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    ids[0, :left_pad], mask[0, :left_pad] = 0, 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _loss_and_grads(model, ids, mask, alpha):
    model.zero_grad(set_to_none=True)
    alpha.grad = None
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if not n.endswith("residual_scale")}
    return out.logits.detach(), out.loss.detach(), grads


def _hooked(stock, family, layer: int, alpha: torch.Tensor):
    """The stock model with alpha on one layer as the tests read it: forward hooks multiplying that
    layer's branch modules' outputs (the post norms for Gemma 2/3 and OLMo2) by alpha."""
    model = copy.deepcopy(stock)

    def scale(module, args, output):
        if isinstance(output, tuple):
            return (output[0] * alpha,) + tuple(output[1:])
        return output * alpha

    for branch in family.branches:
        model.get_submodule(family.layers)[layer].get_submodule(branch).register_forward_hook(scale)
    return model


def _check_report(model_type, report):
    expected = EXPECTED_STOCK.get(model_type, {})
    for kind in ("block", "attention", "mlp", "final norm"):
        total = range(1) if kind == "final norm" else range(LAYERS)
        fragment, stock_layers = expected.get(kind, ("", range(0)))
        assert report.patched(kind) == [i for i in total if i not in stock_layers], (kind, str(report))
        stock_part = report.stock(kind)
        if stock_layers:
            ((reason, where),) = stock_part.items()
            assert fragment in reason and where == list(stock_layers), (kind, str(report))
        else:
            assert stock_part == {}, (kind, str(report))
    assert str(report).count("\n") == 4 and report.brief().startswith("patched")


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_family_matches_stock_and_alpha_folds_into_a_stock_checkpoint(model_type, tmp_path):
    # Layer 1 carries a learnable alpha = 0.7, the others alpha = 1 (the plain patched path): the whole
    # model must equal the stock one with hooks on layer 1 only, in logits, loss and every gradient.
    family = _family(model_type)
    stock = _model(model_type)
    patched = copy.deepcopy(stock)
    handle = apply_tli_kernels(patched, residual_scales={1: 0.7}, learnable_alpha=True)
    _check_report(model_type, handle.report)
    alpha = patched.get_submodule(family.layers)[1].residual_scale
    assert handle.learnable_layers == [1] and isinstance(alpha, torch.nn.Parameter)
    alpha_ref = torch.nn.Parameter(torch.tensor(0.7, device=DEVICE))
    reference = _hooked(stock, family, 1, alpha_ref)

    ids, mask = _batch()
    logits, loss, grads = _loss_and_grads(patched, ids, mask, alpha)
    logits_ref, loss_ref, grads_ref = _loss_and_grads(reference, ids, mask, alpha_ref)
    real = mask.bool()  # padded positions carry no meaning (and no loss)
    assert rel_error(logits[real], logits_ref[real]) < LOGITS_TOL
    assert rel_error(loss, loss_ref) < LOGITS_TOL
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        if grads_ref[name] is None:  # an expert no token was routed to
            assert grad is None, name
            continue
        assert rel_error(grad, grads_ref[name]) < GRAD_TOL, name
    assert rel_error(alpha.grad.reshape(()), alpha_ref.grad) < ALPHA_GRAD_TOL
    assert list(patched.state_dict()) == list(stock.state_dict())

    # Folded with the registry's rule, saved, loaded by stock transformers: the same function.
    assert fold_residual_scales(patched) == {1: pytest.approx(0.7)}
    patched.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        after = loaded.to(DEVICE).eval()(input_ids=ids, attention_mask=mask).logits
    assert rel_error(after[real], logits[real]) < LOGITS_TOL
    arch = BY_MODEL_TYPE[stock.config.model_type]
    want = fold_into_state_dict({k: v.cpu() for k, v in stock.state_dict().items()}, {1: 0.7}, arch, family.layers)
    state = {k: v.cpu() for k, v in loaded.state_dict().items()}
    original = {k: v.cpu() for k, v in stock.state_dict().items()}
    changed = [k for k in want if not torch.equal(want[k], original[k])]
    assert changed and all(torch.equal(state[k], want[k]) for k in changed), changed

    handle.undo()
    assert [type(m) for m in patched.modules()] == [type(m) for m in stock.modules()]


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_generate_gives_the_same_tokens_with_cache(model_type):
    stock = _model(model_type)
    patched = copy.deepcopy(stock)
    apply_tli_kernels(patched)
    ids, mask = _batch(length=6)
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        tokens = patched.generate(ids, **settings)
        tokens_ref = stock.generate(ids, **settings)
    assert tokens.shape[1] == ids.shape[1] + 4
    assert torch.equal(tokens, tokens_ref)


@pytest.mark.parametrize("model_type", STOCK_FAMILIES)
def test_families_without_kernels_stay_stock(model_type):
    stock = _model(model_type)
    model = copy.deepcopy(stock)
    classes = [type(m) for m in model.modules()]
    handle = apply_tli_kernels(model)
    assert not handle.report.anything_patched
    assert handle.report.brief() == "stock (no kernels for this model type)"
    assert f"no tli kernels for model type '{model_type}'" in str(handle.report)
    assert "everything stock" in str(handle.report)
    assert [type(m) for m in model.modules()] == classes
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           stock(input_ids=ids, attention_mask=mask).logits)  # fmt: skip
    assert handle.undo() == {}
    with pytest.raises(ValueError, match="need patched layers"):
        apply_tli_kernels(model, residual_scales={1: 1.0}, learnable_alpha=True)
    with pytest.raises(ValueError, match="need patched layers"):
        apply_tli_kernels(model, residual_scales={1: 0.5})
