"""Fold residual scales (alpha) into weights with an architecture's rule: what `tli upscale` writes
for an injected layer, applied to in-memory weights (training saves and exports, the kernels' fold).

The arithmetic is the plan's (float32, then the tensor's dtype): branch outputs times alpha, or, where
a norm follows the branch, the norm weight w -> (w + offset) * alpha - offset.
"""

from __future__ import annotations

from tli_kernels.architectures.spec import Architecture


def fold_tensor_names(arch: Architecture, suffixes) -> dict[str, str]:
    """layer-relative tensor name -> 'scale' (a branch output) or 'norm' (a post norm), for the
    tensors alpha is folded into."""
    return {s: how for s, (_, how) in arch.alpha_targets(suffixes).items()}


def fold_factors(names, scales: dict[int, float], arch: Architecture, prefix: str) -> dict[str, tuple[float, float]]:
    """{tensor name: (alpha, offset)} for every tensor a layer's alpha != 1 goes into; `names` are the
    model's tensor names (in memory or on disk: the rule matches both)."""
    names = list(names)
    out = {}
    for i, a in scales.items():
        if a == 1.0:
            continue
        head = f"{prefix}.{i}."
        roles = fold_tensor_names(arch, [n[len(head) :] for n in names if n.startswith(head)])
        if not roles:
            raise KeyError(f"cannot fold alpha of layer {i}: no branch output of {arch.name} under {head}")
        for suffix, role in roles.items():
            out[head + suffix] = (float(a), arch.norm_offset if role == "norm" else 0.0)
    return out


def apply_fold(x, alpha: float, offset: float):
    """The plan's arithmetic on a tensor, in float32: x * alpha, or (x + offset) * alpha - offset."""
    import torch

    a = torch.tensor(alpha, dtype=torch.float32)
    x = x.to(torch.float32)
    if offset:
        off = torch.tensor(offset, dtype=torch.float32)
        return (x + off) * a - off
    return x * a


def fold_into_state_dict(state: dict, scales: dict[int, float], arch: Architecture, prefix: str) -> dict:
    """A copy of `state` with each layer i's alpha = scales[i] folded in (layers with alpha 1 untouched)."""
    out = dict(state)
    for key, (a, off) in fold_factors(state, scales, arch, prefix).items():
        out[key] = apply_fold(state[key], a, off).to(state[key].dtype)
    return out
