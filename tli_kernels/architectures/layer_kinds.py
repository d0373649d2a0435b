"""Which output layers are MoE, said the way each family's config says it (`Architecture.moe_layout`).

A new layer keeps its source layer's kind (dense MLP or MoE block), so the output's kinds are fixed by
the layer map. Some configs list them (`mlp_only_layers`: any pattern), others state a rule that only
some patterns satisfy:

  first_k_dense_replace   layers [0, k) dense, the rest MoE (GLM-4-MoE, DeepSeek-V2/V3)
  moe_layer_range         layer i is MoE when start <= i <= end and (i + 1) % interval == 0 (ERNIE-4.5-MoE)

For a rule, `layout_config` returns the config entries that express the output's kinds, or refuses in one
line naming the first output layer that breaks the pattern and a layer map (passthrough ranges) that would
work: the same map without the layers that break it.
"""

from __future__ import annotations


def _first_k_dense(kinds: list[bool]) -> tuple[dict | None, int]:
    k = kinds.index(True) if True in kinds else len(kinds)
    if all(kinds[k:]):
        return {"first_k_dense_replace": k}, -1
    return None, kinds.index(False, k)


def _moe_range(kinds: list[bool]) -> tuple[dict | None, int]:
    n = len(kinds)
    moe = [i for i, m in enumerate(kinds) if m]
    if not moe:
        return {"moe_layer_start_index": n, "moe_layer_end_index": n - 1, "moe_layer_interval": 1}, -1
    start, end = moe[0], moe[-1]
    for interval in range(1, end + 2):
        want = [start <= i <= end and (i + 1) % interval == 0 for i in range(n)]
        if want == kinds:
            return {"moe_layer_start_index": start, "moe_layer_end_index": end, "moe_layer_interval": interval}, -1
    # No interval fits: the first layer that the densest pattern (interval 1) gets wrong breaks it.
    return None, next(i for i in range(start, end + 1) if not kinds[i])


RULES = {"first_k_dense_replace": _first_k_dense, "moe_layer_range": _moe_range}


def layout_config(rule: str, model_type: str, origin: list[int], is_moe) -> dict:
    """Config entries saying which output layers are MoE, for output layers made from source layers
    `origin` (is_moe(i): whether source layer i is MoE). Raises ValueError when the rule cannot say it."""
    express = RULES[rule]
    update, bad = express([is_moe(s) for s in origin])
    if update is not None:
        return update
    keep = list(origin)
    first_bad, first_src = bad, origin[bad]
    while bad >= 0:
        del keep[bad]
        _, bad = express([is_moe(s) for s in keep])
    kind = "an MoE" if is_moe(first_src) else "a dense"
    raise ValueError(
        f"output layer {first_bad} would be {kind} layer (source layer {first_src}), which {model_type}'s "
        f"{rule} cannot express; a layer map that would work: --method passthrough --layers {ranges(keep)}"
    )


def ranges(layers: list[int]) -> str:
    """[0, 1, 2, 1, 2, 5] -> '0-2,1-2,5' (passthrough's --layers syntax)."""
    out: list[list[int]] = []
    for i in layers:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)
