"""Fold residual scales (alpha) into a state dict with an architecture's rule: what `tli upscale`
writes for an injected layer, applied to in-memory weights (training saves, kernels' fold).

The arithmetic is the plan's (float32, then the tensor's dtype): branch outputs times alpha, or, where
a norm follows the branch, the norm weight w -> (w + offset) * alpha - offset.
"""

from __future__ import annotations

from tli_kernels.architectures.spec import Architecture


def fold_tensor_names(arch: Architecture, suffixes) -> dict[str, str]:
    """layer-relative tensor name -> 'scale' or 'norm', for the tensors alpha is folded into."""
    out = {}
    post = arch.post_norms()
    for s in suffixes:
        branch = arch.branch_of(s)
        if branch is not None and (arch.attn if branch == "attn" else arch.mlp).post_norm is None:
            out[s] = "scale"
        elif s in post:
            out[s] = "norm"
    return out


def fold_into_state_dict(state: dict, scales: dict[int, float], arch: Architecture, prefix: str) -> dict:
    """A copy of `state` with each layer i's alpha = scales[i] folded in (layers with alpha 1 untouched)."""
    import torch

    out = dict(state)
    for i, alpha in scales.items():
        if alpha == 1.0:
            continue
        head = f"{prefix}.{i}."
        roles = fold_tensor_names(arch, [k[len(head) :] for k in state if k.startswith(head)])
        if not roles:
            raise KeyError(f"cannot fold alpha of layer {i}: no branch output of {arch.name} under {head}")
        a = torch.tensor(alpha, dtype=torch.float32)
        off = torch.tensor(arch.norm_offset, dtype=torch.float32)
        for suffix, role in roles.items():
            key = head + suffix
            w = state[key]
            x = w.to(torch.float32)
            x = (x + off) * a - off if role == "norm" and arch.norm_offset else x * a
            out[key] = x.to(w.dtype)
    return out
