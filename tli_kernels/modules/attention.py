"""TliAttention: Llama-family self-attention with the RoPE kernel and the attention dispatch.

The fast path applies to the masks transformers builds for its "sdpa" and "eager" implementations
(None = causal, or a 4-D bool/float mask). Everything else goes to the stock forward of the very same
module, decided before any work is done: masks built for another kernel (flash_attention_2 packs
sequences through position_ids, flex attention takes a BlockMask), `output_attentions`, a rotary
embedding that does not cover the whole head. Never silently wrong: when in doubt, the stock path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tli_kernels.ops import apply_rope, attention

FAST_PATH_IMPLEMENTATIONS = ("sdpa", "eager")


class TliAttention(nn.Module):
    """Mixin put in front of a transformers Llama-family attention class (see `_swap`)."""

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    _tli_original_class: type  # set on the per-class subclass by `_swap.swap_in`
    _tli_cache_kwarg: str

    def _tli_fallback_reason(self, position_embeddings, attention_mask: Tensor | None, kwargs: dict) -> str | None:
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl not in FAST_PATH_IMPLEMENTATIONS:
            return f"attention implementation {impl!r} builds masks for another kernel"
        if kwargs.get("output_attentions"):
            return "output_attentions was requested"
        if position_embeddings is None:
            return "no position_embeddings were passed"
        if position_embeddings[0].shape[-1] != self.head_dim:
            return "the rotary embedding does not cover the whole head"
        if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 4):
            return "the attention mask is not a 4-D tensor"
        return None

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        cache = cache if cache is not None else past_key_values
        if self._tli_fallback_reason(position_embeddings, attention_mask, kwargs) is not None:
            kwargs[self._tli_cache_kwarg] = cache
            return self._tli_original_class.forward(
                self, hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
            )

        batch, q_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim)  # [B, S, Hq, D]
        k = self.k_proj(hidden_states).view(batch, q_len, -1, self.head_dim)  # [B, S, Hk, D]
        v = self.v_proj(hidden_states).view(batch, q_len, -1, self.head_dim)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D], the cache layout
        if cache is not None:
            if self._tli_cache_kwarg == "cache":
                k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
            else:
                k, v = cache.update(k, v, self.layer_idx)

        causal = attention_mask is None and q_len > 1
        if causal and k.shape[2] > q_len:
            # transformers leaves the mask out here only for a prefill into an empty static cache:
            # the new keys are the first q_len slots (the same crop its SDPA path makes).
            k, v = k[:, :, :q_len], v[:, :, :q_len]
        dropout = self.attention_dropout if self.training else 0.0
        out = attention(q, k, v, attn_mask=attention_mask, causal=causal, scale=self.scaling, dropout_p=dropout)
        out = out.reshape(batch, q_len, -1)
        return self.o_proj(out), None


def check_attention(module: nn.Module, where: str) -> None:
    missing = [
        name
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx", "config")
        if not hasattr(module, name)
    ]
    if missing:
        raise ValueError(f"{where}: {type(module).__name__} lacks {missing}; not a Llama-family attention")
    if torch.is_tensor(getattr(module, "sinks", None)) or hasattr(module, "q_norm"):
        raise ValueError(f"{where}: {type(module).__name__} has extra parts (sinks / q_norm) tli does not compute")
