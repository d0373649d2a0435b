"""LLaMA Pro block expansion: identity blocks (o_proj and down_proj zeroed) after every K layers.

The same surgery as `tli --init zero`, under its own name; the model's function is unchanged.
"""

from __future__ import annotations

from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.methods import tli
from tli_kernels.methods.common import CommonOptions


def plan(layout: CheckpointLayout, common: CommonOptions, *, k: int = tli.DEFAULT_K):
    return tli.plan(layout, common, k=k, init="zero", alpha=1.0, method="block-expansion")
