"""TliAttention: Llama-family self-attention with the RoPE kernel and the attention dispatch.

Three routes, chosen before any work is done:
  * tli: the masks transformers builds for its "sdpa" and "eager" implementations (None = causal, or
    a 4-D bool/float mask) go to `tli_kernels.ops.attention` (flash-attn / SDPA, GQA not repeated);
  * interface: any other implementation (flash_attention_2 packs sequences through position_ids and
    2-D masks, flex attention takes a BlockMask...) keeps the tli projections and RoPE kernel and calls
    transformers' own attention function for it, with the arguments the stock forward passes;
  * stock: the stock forward of this very module, for `output_attentions`, a missing or partial
    rotary embedding, or an sdpa/eager mask of another form.
Never silently wrong: when in doubt, the stock path.
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

    def _tli_route(self, position_embeddings, attention_mask, kwargs: dict) -> str:
        if kwargs.get("output_attentions") or position_embeddings is None:
            return "stock"
        if position_embeddings[0].shape[-1] != self.head_dim:
            return "stock"  # partial rotary: not a Llama-family block after all
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl not in FAST_PATH_IMPLEMENTATIONS:
            return "interface"
        if attention_mask is None or (isinstance(attention_mask, Tensor) and attention_mask.dim() == 4):
            return "tli"
        return "stock"

    def _tli_sliding_window(self) -> dict:
        # What the stock forward passes to the attention function: Qwen2 its per-layer window,
        # Mistral the config's, Llama nothing.
        if hasattr(self, "sliding_window"):
            return {"sliding_window": self.sliding_window}
        if getattr(self.config, "model_type", None) == "mistral":
            return {"sliding_window": getattr(self.config, "sliding_window", None)}
        return {}

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        cache = cache if cache is not None else past_key_values
        route = self._tli_route(position_embeddings, attention_mask, kwargs)
        if route == "stock":
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
        dropout = self.attention_dropout if self.training else 0.0

        if route == "interface":
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            out, weights = interface(
                self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling,
                **self._tli_sliding_window(), **kwargs,
            )  # fmt: skip
            return self.o_proj(out.reshape(batch, q_len, -1).contiguous()), weights

        causal = attention_mask is None and q_len > 1
        if causal and k.shape[2] > q_len:
            # transformers leaves the mask out here only for a prefill into an empty static cache:
            # the new keys are the first q_len slots (the same crop its SDPA path makes).
            k, v = k[:, :, :q_len], v[:, :, :q_len]
        out = attention(q, k, v, attn_mask=attention_mask, causal=causal, scale=self.scaling, dropout_p=dropout)
        return self.o_proj(out.reshape(batch, q_len, -1)), None


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
