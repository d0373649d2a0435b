"""Thin nn.Modules that run the tli kernels while keeping the Hugging Face attribute names.

Each is a mixin put in front of the transformers class of one module instance (`patch_decoder_layer`),
so parameters, state-dict keys, hooks and `isinstance` checks are those of the stock module. Each
module kind has a `*_support` function saying whether the mixin computes exactly what that module does.
"""

from tli_kernels.modules.attention import TliAttention, attention_support
from tli_kernels.modules.decoder_layer import (
    TliDecoderLayer,
    TliPostNormDecoderLayer,
    TliSandwichDecoderLayer,
    check_decoder_layer,
    fold_residual_scale,
    layer_support,
    patch_decoder_layer,
    residual_scale_of,
    unpatch_decoder_layer,
)
from tli_kernels.modules.mlp import TliMLP, mlp_support
from tli_kernels.modules.norm import NormNumerics, TliRMSNorm, norm_numerics

__all__ = [
    "NormNumerics",
    "TliAttention",
    "TliDecoderLayer",
    "TliMLP",
    "TliPostNormDecoderLayer",
    "TliRMSNorm",
    "TliSandwichDecoderLayer",
    "attention_support",
    "check_decoder_layer",
    "fold_residual_scale",
    "layer_support",
    "mlp_support",
    "norm_numerics",
    "patch_decoder_layer",
    "residual_scale_of",
    "unpatch_decoder_layer",
]
