"""SOLAR depth up-scaling: layers [0, N-m) followed by layers [m, N): 2(N - m) layers.

SOLAR 10.7B took m = 8 of Mistral's 32 layers (48 layers). The default m = N/4 rounded down gives
1.5 N layers, the depth of `tli --k 2`, so the two compare at equal size.
"""

from __future__ import annotations

from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.methods.common import CommonOptions, OutLayer, build_plan, check_int_option


def layer_map(n: int, m: int) -> list[OutLayer]:
    check_int_option("m", m, 1, n - 1, f" (the source has N={n} layers; DUS keeps [0, N-m) and [m, N))")
    first = [OutLayer("original", [i]) for i in range(0, n - m)]
    second = [OutLayer("original" if i >= n - m else "duplicate", [i]) for i in range(m, n)]
    return first + second


def plan(layout: CheckpointLayout, common: CommonOptions, *, m: int | None = None):
    n = layout.num_layers
    m = max(1, n // 4) if m is None else m
    return build_plan(layout, layer_map(n, m), method="dus", options={"m": m}, common=common)
