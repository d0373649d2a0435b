"""Thin nn.Modules that run the tli kernels while keeping the Hugging Face attribute names.

Each is a mixin put in front of the transformers class of one module instance (`patch_decoder_layer`),
so parameters, state-dict keys, hooks and `isinstance` checks are those of the stock module.
"""

from tli_kernels.modules.attention import TliAttention
from tli_kernels.modules.decoder_layer import (
    TliDecoderLayer,
    check_decoder_layer,
    fold_residual_scale,
    patch_decoder_layer,
    residual_scale_of,
    unpatch_decoder_layer,
)
from tli_kernels.modules.mlp import TliMLP
from tli_kernels.modules.norm import TliRMSNorm

__all__ = [
    "TliAttention",
    "TliDecoderLayer",
    "TliMLP",
    "TliRMSNorm",
    "check_decoder_layer",
    "fold_residual_scale",
    "patch_decoder_layer",
    "residual_scale_of",
    "unpatch_decoder_layer",
]
