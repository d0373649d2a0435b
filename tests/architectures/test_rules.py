"""Every registry entry's branch rule, proven on a tiny random transformers instance of its family
(tli_kernels/architectures/check.py: identity exactly, alpha scales each branch, the block composes
as its residual structure says), and broken rules caught by the same check."""

from __future__ import annotations

import dataclasses

import pytest

from tests.architectures.models import FAMILIES, build_model
from tli_kernels.architectures import BY_MODEL_TYPE, ENTRIES, Branch
from tli_kernels.architectures.check import RuleCheckFailed, check_rule

PARALLEL = {"gpt_neox", "falcon", "cohere"}


def test_every_registry_entry_has_a_tested_family():
    assert {t for a in ENTRIES for t in a.model_types} == set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_rule_holds_on_a_tiny_instance(model_type):
    family = FAMILIES[model_type]
    model = build_model(family)
    arch = BY_MODEL_TYPE[model_type]
    for layer in (0, 1):  # qwen3_moe: layer 0 is dense (mlp_only_layers), layer 1 MoE
        report = check_rule(model, arch, layer=layer)
        assert report.residual == ("parallel" if model_type in PARALLEL else "sequential")
        assert report.max_error < 1e-5


def _broken(model_type: str, **changes):
    return dataclasses.replace(BY_MODEL_TYPE[model_type], **changes)


@pytest.mark.parametrize(
    "model_type, changes, complaint",
    [
        # gate_proj: zeroing it does zero the MLP (silu(0) = 0), but scaling it does not scale the MLP.
        ("llama", dict(mlp=Branch(("mlp.gate_proj.weight",))), "does not scale"),
        # q_proj: zeroing queries gives uniform attention, not a zero branch.
        ("llama", dict(attn=Branch(("self_attn.q_proj.weight",))), "identity"),
        # A Gemma2 rule that scales o_proj: the post norm normalises the scale away.
        ("gemma2", dict(attn=Branch(("self_attn.o_proj.weight",)), mlp=Branch(("mlp.down_proj.weight",))), "scale"),
        # Forgetting Gemma's (1 + w): the post norm's weight is scaled as if it were w.
        ("gemma2", dict(norm_offset=0.0), "does not scale"),
        # A bias left out: GPT-2's c_proj bias keeps the branch alive.
        ("gpt2", dict(attn=Branch(("attn.c_proj.weight",))), "identity"),
        # Only one expert's projection.
        ("mixtral", dict(mlp=Branch(("mlp.experts.down_proj_typo",))), "no parameter"),
    ],
)
def test_a_broken_rule_fails_the_check(model_type, changes, complaint):
    model = build_model(FAMILIES[model_type])
    with pytest.raises(RuleCheckFailed, match=complaint):
        check_rule(model, _broken(model_type, **changes))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_branch_modules_match_the_tests_own_reading(model_type):
    from tli_kernels.architectures.spec import branch_module

    arch = BY_MODEL_TYPE[model_type]
    assert (branch_module(arch, "attn"), branch_module(arch, "mlp")) == FAMILIES[model_type].branches


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_folding_alpha_into_weights_equals_scaling_the_branches(model_type):
    """fold_into_state_dict (what training saves) against forward hooks on the branch modules."""
    import copy

    import torch

    from tests.architectures.models import decoder_layers, logits
    from tli_kernels.architectures.fold import fold_into_state_dict

    family = FAMILIES[model_type]
    model = build_model(family)
    scales = {1: 0.375, 4: 1.5}
    folded = copy.deepcopy(model)
    folded.load_state_dict(fold_into_state_dict(model.state_dict(), scales, BY_MODEL_TYPE[model_type], family.layers))
    hooked = copy.deepcopy(model)
    for i, a in scales.items():
        for branch in family.branches:
            decoder_layers(hooked, family)[i].get_submodule(branch).register_forward_hook(
                lambda m, args, out, a=a: (out[0] * a,) + tuple(out[1:]) if isinstance(out, tuple) else out * a
            )
    torch.testing.assert_close(logits(folded), logits(hooked), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(folded), logits(model))
