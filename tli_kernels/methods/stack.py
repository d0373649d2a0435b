"""Stacking: the whole decoder stack repeated T times (T N layers)."""

from __future__ import annotations

from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.methods.common import CommonOptions, OutLayer, build_plan, check_int_option


def layer_map(n: int, times: int) -> list[OutLayer]:
    check_int_option("times", times, 1, 64)
    return [OutLayer("original" if t == 0 else "duplicate", [i]) for t in range(times) for i in range(n)]


def plan(layout: CheckpointLayout, common: CommonOptions, *, times: int = 2):
    return build_plan(
        layout, layer_map(layout.num_layers, times), method="stack", options={"times": times}, common=common
    )
