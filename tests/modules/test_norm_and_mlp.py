"""tli_kernels/modules/norm.py and mlp.py: which RMSNorm numerics and which gate activation a transformers
module computes is found by running it on a probe, not by its name; what the kernels cannot compute
exactly is refused with the reason."""

import pytest
import torch
from torch import nn

from tli_kernels.modules import NormNumerics, mlp_support, norm_numerics
from tli_kernels.modules.mlp import activation_of

LLAMA, GEMMA, OLMO2 = (0.0, True), (1.0, False), (0.0, False)  # (offset, cast_before_weight)


def _norm_classes():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    return [(LlamaRMSNorm, LLAMA), (Qwen3RMSNorm, LLAMA), (GemmaRMSNorm, GEMMA), (Gemma2RMSNorm, GEMMA),
            (Gemma3RMSNorm, GEMMA), (Olmo2RMSNorm, OLMO2)]  # fmt: skip


@pytest.mark.parametrize("cls,expected", _norm_classes(), ids=lambda v: getattr(v, "__name__", ""))
def test_each_family_norm_is_recognised(cls, expected):
    module = cls(32, eps=1e-5)
    numerics, why = norm_numerics(module)
    assert why == "" and numerics == NormNumerics(1e-5, *expected)


def test_a_norm_on_the_meta_device_is_probed_on_the_cpu():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    with torch.device("meta"):
        module = GemmaRMSNorm(32, eps=1e-6)
    assert norm_numerics(module)[0] == NormNumerics(1e-6, *GEMMA)


class _NormAddingEps(nn.Module):
    """Llama's names and parameters, another function (eps outside the square root)."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf / (xf.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)).to(x.dtype)


@pytest.mark.parametrize(
    "module,message",
    [
        (nn.LayerNorm(32), "parts besides its weight"),
        (_NormAddingEps(32), "none of the RMSNorm variants"),
        (nn.Linear(32, 32), "no 1-D weight"),
    ],
    ids=["layer norm", "eps elsewhere", "not a norm"],
)
def test_norms_the_kernel_does_not_compute_are_refused(module, message):
    numerics, why = norm_numerics(module)
    assert numerics is None and message in why


def test_gate_activations_are_recognised_by_what_they_compute():
    from transformers.activations import ACT2FN

    assert activation_of(ACT2FN["silu"]) == "silu" and activation_of(nn.SiLU()) == "silu"
    assert activation_of(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    # The erf GELU, and a tanh GELU written out with other rounding, are not what the kernel computes.
    assert activation_of(ACT2FN["gelu"]) is None and activation_of(ACT2FN["gelu_new"]) is None
    assert activation_of(nn.ReLU()) is None


def test_mlp_support_by_layout():
    from transformers import MixtralConfig, Phi3Config
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    phi3 = Phi3MLP(Phi3Config(hidden_size=32, intermediate_size=64))
    assert mlp_support(phi3) == ({"activation": "silu", "packed": True}, "")
    moe = MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=64, num_local_experts=2))
    support, why = mlp_support(moe)
    assert support is None and why.startswith("MoE block")
