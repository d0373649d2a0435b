"""Transformer Layer Injection: after every complete group of K layers, inject one new layer.

N source layers become N + floor(N/K). The injected layer after group g (layers gK .. gK+K-1):
  copy     a copy of the group's last layer, gK+K-1
  average  the mean of its two neighbours, gK+K-1 and gK+K (a copy when it closes the stack)
  zero     a copy with o_proj and down_proj zeroed: exactly the identity map
  random   fresh weights, uniform with the config's initializer_range std; norms at 1
Its two residual branches are scaled by alpha (folded into o_proj / down_proj).
"""

from __future__ import annotations

from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.methods.common import (
    INITS,
    CommonOptions,
    OutLayer,
    build_plan,
    check_alpha,
    check_int_option,
)

# Defaults chosen by the quality study (docs/quality.md; README, "Choosing the defaults"): on
# SmolLM2-135M + King James, 40 steps, the identity init (zero) was the only TLI setting that beat the
# source model trained on the same data, on both data orders (2.8127 / 2.8155 vs 2.8184 / 2.8242);
# copy at alpha 0.1 tied the source (2.8176), copy at alpha 1 lost badly (3.2336). With zero init
# alpha scales a zero branch at the start, so it stays 1 and the optimizer grows the branch.
DEFAULT_K = 2
DEFAULT_INIT = "zero"
DEFAULT_ALPHA = 1.0


def layer_map(n: int, k: int, init: str, alpha: float) -> list[OutLayer]:
    check_int_option("k", k, 1, n, f" (the source has N={n} layers)")
    if init not in INITS:
        raise ValueError(f"--init {init!r}: choose one of {', '.join(INITS)}")
    alpha = check_alpha(alpha)
    out: list[OutLayer] = []
    groups = n // k
    for g in range(groups):
        out.extend(OutLayer("original", [i]) for i in range(g * k, g * k + k))
        last = g * k + k - 1
        if init == "average" and last + 1 < n:
            sources = [last, last + 1]
        elif init == "random":
            sources = []
        else:
            sources = [last]
        out.append(OutLayer("injected", sources, init=init, alpha=alpha, extra={"after": last}))
    out.extend(OutLayer("original", [i]) for i in range(groups * k, n))
    return out


def plan(
    layout: CheckpointLayout,
    common: CommonOptions,
    *,
    k: int = DEFAULT_K,
    init: str = DEFAULT_INIT,
    alpha: float = DEFAULT_ALPHA,
    method: str = "tli",
):
    layers = layer_map(layout.num_layers, k, init, alpha)
    options = {"k": k, "init": init, "alpha": float(alpha)} if method == "tli" else {"k": k}
    return build_plan(layout, layers, method=method, options=options, common=common)
