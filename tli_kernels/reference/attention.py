"""Scaled dot-product attention written out (repeat K/V, matmul, softmax in float32): the independent
baseline the attention dispatch is tested against."""

from __future__ import annotations

import torch


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q: [B, Hq, Sq, D]; k, v: [B, Hk, Skv, D] with Hq a multiple of Hk. `attn_mask` broadcasts to
    [B, Hq, Sq, Skv]: bool (True = attend) or float (added to the scores). `causal` aligns the causal
    mask to the bottom right (query i sees keys up to i + Skv - Sq, as in flash-attn and a KV cache).
    A query row whose bool/causal mask allows no key outputs zeros. Returns [B, Sq, Hq, D] in q's dtype."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    assert q_heads % kv_heads == 0, (q_heads, kv_heads)
    groups = q_heads // kv_heads
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = head_dim**-0.5 if scale is None else scale

    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, Hq, Sq, Skv]
    lowest = torch.finfo(torch.float32).min
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.float()
    if causal:
        rows = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)
        allowed = allowed & (torch.arange(kv_len, device=q.device)[None, :] <= rows)
    scores = scores.masked_fill(~allowed, lowest)
    probs = torch.softmax(scores, dim=-1)
    # A query that may see no key gets a zero output (SDPA's convention for all-False bool rows).
    probs = probs.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, v.float()).to(q.dtype)
    return out.transpose(1, 2)
