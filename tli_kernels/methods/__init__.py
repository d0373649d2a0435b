"""Upscaling methods: pure functions from a source layout and options to a SurgeryPlan."""

from __future__ import annotations

from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.plan import SurgeryPlan
from tli_kernels.methods import block_expansion, dus, moe_upcycle, passthrough, stack, tli
from tli_kernels.methods.common import CommonOptions

METHODS = {
    "tli": tli.plan,
    "dus": dus.plan,
    "block-expansion": block_expansion.plan,
    "stack": stack.plan,
    "passthrough": passthrough.plan,
    "moe-upcycle": moe_upcycle.plan,
}


def make_plan(layout: CheckpointLayout, method: str, common: CommonOptions | None = None, **options) -> SurgeryPlan:
    """Plan `method` on `layout`; options are the method's own (k, init, alpha, m, times, layers, ...)."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[method](layout, common or CommonOptions(), **options)


__all__ = ["METHODS", "CommonOptions", "make_plan"]
