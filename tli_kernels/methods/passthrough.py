"""Passthrough: an explicit list of source layers, mergekit-style slices.

`--layers 0-15,8-23` means layers 0..15 then 8..23 (inclusive ranges); single indices work too.
"""

from __future__ import annotations

import re

from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.methods.common import CommonOptions, OutLayer, build_plan

_PART = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layers(spec: str, n: int) -> list[int]:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("--layers: give a list such as 0-15,8-23")
    out: list[int] = []
    for part in spec.split(","):
        m = _PART.match(part)
        if not m:
            raise ValueError(f"--layers {spec!r}: cannot read {part.strip()!r} (expected A or A-B)")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if a > b:
            raise ValueError(f"--layers {spec!r}: range {a}-{b} runs backwards")
        if b >= n:
            raise ValueError(f"--layers {spec!r}: layer {b} does not exist (the source has layers 0-{n - 1})")
        out.extend(range(a, b + 1))
    return out


def layer_map(n: int, spec: str) -> list[OutLayer]:
    seen: set[int] = set()
    layers = []
    for i in parse_layers(spec, n):
        layers.append(OutLayer("duplicate" if i in seen else "original", [i]))
        seen.add(i)
    return layers


def plan(layout: CheckpointLayout, common: CommonOptions, *, layers: str):
    return build_plan(
        layout, layer_map(layout.num_layers, layers), method="passthrough", options={"layers": layers}, common=common
    )
