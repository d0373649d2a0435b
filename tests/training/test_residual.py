"""Hook-applied residual scales: scaling both branches of a layer by m is the same model as folding
m into its weights (what a checkpoint stores): o_proj / down_proj in a Llama block, the post norms
of Gemma2, GPT-2's c_proj weights and biases, every expert of Mixtral."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.architectures.models import FAMILIES, build_model
from tli_kernels.architectures import BY_MODEL_TYPE
from tli_kernels.training.residual import Trainee, alpha_parameters, fold_into_state_dict, layer_prefix


def _tiny(layers=4):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "mixtral"])
def test_hooks_equal_folded_weights_and_keep_the_state_dict_stock(model_type):
    lm = build_model(FAMILIES[model_type])
    reference = copy.deepcopy(lm)
    keys = set(lm.state_dict())
    trainee = Trainee(lm, [1, 3])
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(trainee(x), reference(input_ids=x).logits)  # m = 1: nothing changes
        trainee.residual_scales["1"].fill_(0.25)
        trainee.residual_scales["3"].fill_(-2.0)
        scales = {i: float(p) for i, p in alpha_parameters(trainee).items()}
        assert scales == {1: 0.25, 3: -2.0}
        arch, prefix = BY_MODEL_TYPE[model_type], layer_prefix(reference)
        reference.load_state_dict(fold_into_state_dict(reference.state_dict(), scales, arch, prefix))
        torch.testing.assert_close(trainee(x), reference(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert set(trainee.lm.state_dict()) == keys  # the scales are not in the model's state dict


def test_scale_gradient_flows():
    trainee = Trainee(_tiny(), [2])
    x = torch.randint(0, 64, (2, 8))
    trainee(x).float().square().mean().backward()
    g = trainee.residual_scales["2"].grad
    assert g is not None and g.abs().item() > 0


def test_alpha_is_applied_in_float32_on_bf16_outputs():
    """alpha = 0.3 has no bf16 value: the hook multiplies in float32 and rounds the product once."""
    lm = build_model(FAMILIES["llama"]).to(torch.bfloat16)
    trainee = Trainee(lm, [1])
    captured = {}
    attn = trainee.lm.model.layers[1].self_attn
    attn.register_forward_hook(lambda m, a, out: captured.update(scaled=out[0]))  # after tli's hook
    raw = {}
    attn.o_proj.register_forward_hook(lambda m, a, out: raw.update(out=out))
    with torch.no_grad():
        trainee.residual_scales["1"].fill_(0.3)
        trainee(torch.randint(0, 128, (1, 8)))
    assert torch.equal(captured["scaled"], (raw["out"].float() * 0.3).to(torch.bfloat16))
