"""TliAttention: self-attention of the Llama-shaped families with the RoPE kernel and the attention dispatch.

What varies across the families it covers, all read from the module at patch time (`attention_support`):
  * projections: q_proj / k_proj / v_proj, or one fused qkv_proj split into [q | k | v] (Phi-3);
  * q/k norms: none, per head over head_dim (Qwen3, Gemma 3, Qwen3-MoE) or over the whole projection
    before the heads are split (OLMo2), each an RMSNorm the norm kernel computes (`norm_numerics`);
  * RoPE: on every layer, or not on the NoPE layers (SmolLM3's `use_rope`);
  * the scale (`scaling`: Granite's attention multiplier, Gemma's query_pre_attn_scalar), sliding
    windows (in the mask transformers builds, or passed to its attention function) and attention logit
    soft-capping (Gemma 2: passed to the attention function, as the stock forward does).

Three routes, chosen before any work is done:
  * tli: the masks transformers builds for its "sdpa" implementation (None = causal, or a 4-D bool/float
    mask) go to `tli_kernels.ops.attention` (flash-attn / SDPA, GQA not repeated);
  * interface: any other implementation keeps the tli projections and RoPE kernel and calls the attention
    function the stock forward calls, with the same arguments: transformers' function for it
    (flash_attention_2 packs sequences through position_ids and 2-D masks, flex attention takes a
    BlockMask, both take `softcap`), or for "eager" the family's own `eager_attention_forward` (which
    soft-caps; and whose float masks, on a row left padding masks out entirely, have a backward that
    SDPA's does not reproduce: measured 4.3x off in v_proj's gradient on a left-padded Llama batch);
  * stock: the stock forward of this very module, for `output_attentions`, a missing or partial
    rotary embedding, a non-causal module without a mask, soft-capping on sdpa (which transformers
    refuses), or an sdpa mask of another form.
Never silently wrong: when in doubt, the stock path.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from tli_kernels.modules.norm import norm_numerics, patch_rms_norm, unpatch_rms_norm
from tli_kernels.ops import apply_rope, attention

FAST_PATH_IMPLEMENTATIONS = ("sdpa",)
KNOWN_CHILDREN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "q_norm", "k_norm"}
# What each family's stock forward passes to the attention function besides the tensors, dropout and
# scaling (read from transformers' modeling files): keyword -> the module's attribute or "config.<key>".
# Families not listed pass nothing more (Qwen2-MoE keeps a sliding_window attribute it does not pass;
# Gemma 3 an attn_logit_softcapping it does not pass).
ATTENTION_EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "mistral": (("sliding_window", "config.sliding_window"),),
    "mixtral": (("sliding_window", "config.sliding_window"),),
    "phi3": (("sliding_window", "config.sliding_window"),),
    "qwen2": (("sliding_window", "sliding_window"),),
    "qwen3": (("sliding_window", "sliding_window"),),
    "qwen3_moe": (("sliding_window", "sliding_window"),),
    "smollm3": (("sliding_window", "sliding_window"),),
    "gemma3_text": (("sliding_window", "sliding_window"),),
    "gemma2": (("sliding_window", "sliding_window"), ("softcap", "attn_logit_softcapping")),
}


class TliAttention(nn.Module):
    """Mixin put in front of a transformers attention class (see `_swap` and `patch_attention`)."""

    o_proj: nn.Linear
    _tli_original_class: type  # set on the per-class subclass by `_swap.swap_in`
    _tli_cache_kwarg: str
    _tli_qk_norm: str | None = None  # "head" or "full", set per instance by `patch_attention`
    _tli_qkv_split: tuple[int, int] | None = None  # (q width, kv width) of a fused qkv_proj
    _tli_eager = None  # the family's eager_attention_forward, set per instance by `patch_attention`
    _tli_extras: tuple[tuple[str, str], ...] = ()  # its ATTENTION_EXTRAS, set per instance
    # SmolLM3's use_rope, read at patch time: a missing attribute would cost an AttributeError raised
    # and caught inside nn.Module.__getattr__ on every call of a decode step.
    _tli_use_rope = True

    def _tli_interface_kwargs(self) -> dict:
        out = {}
        for key, source in self._tli_extras:
            owner, attr = (self.config, source[7:]) if source.startswith("config.") else (self, source)
            out[key] = getattr(owner, attr, None)
        return out

    def _tli_route(self, position_embeddings, attention_mask, kwargs: dict) -> str:
        if kwargs.get("output_attentions"):
            return "stock"
        if self._tli_use_rope and (position_embeddings is None or position_embeddings[0].shape[-1] != self.head_dim):
            return "stock"  # partial rotary: not a block this module computes
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl not in FAST_PATH_IMPLEMENTATIONS:
            return "interface"
        if self._tli_extras and self._tli_interface_kwargs().get("softcap") is not None:
            return "stock"  # as the stock forward, which transformers' SDPA function refuses
        if attention_mask is None:
            return "tli" if getattr(self, "is_causal", True) else "stock"
        if isinstance(attention_mask, Tensor) and attention_mask.dim() == 4:
            return "tli"
        return "stock"

    def _tli_project(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, S, Hq, D], k and v [B, S, Hk, D] (views where they can be), q/k norms applied."""
        batch, q_len, _ = hidden_states.shape
        if self._tli_qkv_split is not None:
            q_width, kv_width = self._tli_qkv_split
            qkv = self.qkv_proj(hidden_states)
            q, k, v = qkv[..., :q_width], qkv[..., q_width : q_width + kv_width], qkv[..., q_width + kv_width :]
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self._tli_qk_norm == "full":  # OLMo2: one norm over all heads, before the split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, q_len, -1, self.head_dim)
        k = k.view(batch, q_len, -1, self.head_dim)
        v = v.view(batch, q_len, -1, self.head_dim)
        if self._tli_qk_norm == "head":  # Qwen3, Gemma 3: per head, over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

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
        if self._tli_qkv_split is None and self._tli_qk_norm is None:  # the common case, without a call
            q = self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim)  # [B, S, Hq, D]
            k = self.k_proj(hidden_states).view(batch, q_len, -1, self.head_dim)  # [B, S, Hk, D]
            v = self.v_proj(hidden_states).view(batch, q_len, -1, self.head_dim)
        else:
            q, k, v = self._tli_project(hidden_states)
        if self._tli_use_rope:  # SmolLM3's NoPE layers skip it
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

            impl = self.config._attn_implementation
            interface = self._tli_eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]
            out, weights = interface(
                self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling,
                **self._tli_interface_kwargs(), **kwargs,
            )  # fmt: skip
            return self.o_proj(out.reshape(batch, q_len, -1).contiguous()), weights

        causal = attention_mask is None and q_len > 1
        if causal and k.shape[2] > q_len:
            # transformers leaves the mask out here only for a prefill into an empty static cache:
            # the new keys are the first q_len slots (the same crop its SDPA path makes).
            k, v = k[:, :, :q_len], v[:, :, :q_len]
        out = attention(q, k, v, attn_mask=attention_mask, causal=causal, scale=self.scaling, dropout_p=dropout)
        return self.o_proj(out.reshape(batch, q_len, -1)), None


# ------------------------------------------------------------------------------ what it can compute
def attention_support(module: nn.Module) -> tuple[dict | None, str]:
    """({"qk_norm": ..., "qkv_split": ..., "norms": {name: numerics}}, "") when TliAttention computes exactly
    what `module` does, else (None, why)."""
    name = type(module).__name__
    missing = [a for a in ("o_proj", "head_dim", "scaling", "layer_idx", "config") if not hasattr(module, a)]
    if missing:
        return None, f"{name} lacks {missing}"
    children = set(dict(module.named_children()))
    if children - KNOWN_CHILDREN:
        return None, f"{name} has parts tli does not compute ({', '.join(sorted(children - KNOWN_CHILDREN))})"
    if torch.is_tensor(getattr(module, "sinks", None)):
        return None, f"{name} has attention sinks"
    if any(torch.is_tensor(t) for t in module.__dict__.get("_parameters", {}).values()):
        return None, f"{name} has parameters outside its projections"
    head_dim = module.head_dim
    config = module.config
    support = {"qk_norm": None, "qkv_split": None, "norms": {}, "eager": None, "extras": ()}
    if {"q_proj", "k_proj", "v_proj"} <= children and "qkv_proj" not in children:
        linears = ("q_proj", "k_proj", "v_proj", "o_proj")
    elif "qkv_proj" in children and not children & {"q_proj", "k_proj", "v_proj"}:
        linears = ("qkv_proj", "o_proj")
        q_width = getattr(config, "num_attention_heads", 0) * head_dim
        fused = module.qkv_proj.out_features
        kv_width = (fused - q_width) // 2
        if q_width <= 0 or kv_width <= 0 or q_width + 2 * kv_width != fused or kv_width % head_dim:
            return None, f"{name}: qkv_proj of {fused} outputs does not split into q ({q_width}) and two equal k, v"
        support["qkv_split"] = (q_width, kv_width)
    else:
        return None, f"{name} has neither q/k/v projections nor one fused qkv_proj"
    for attr in linears:
        if not isinstance(getattr(module, attr), nn.Linear):
            return None, f"{name}.{attr} is a {type(getattr(module, attr)).__name__}, not a Linear"
    norms = children & {"q_norm", "k_norm"}
    if norms and norms != {"q_norm", "k_norm"}:
        return None, f"{name} has {sorted(norms)[0]} without its pair"
    if norms:
        if support["qkv_split"] is not None:
            return None, f"{name} has q/k norms and a fused qkv_proj"
        widths = tuple(getattr(getattr(module, n), "weight", torch.empty(0)).shape[-1:] for n in ("q_norm", "k_norm"))
        if widths == ((head_dim,), (head_dim,)):
            support["qk_norm"] = "head"
        elif widths == ((module.q_proj.out_features,), (module.k_proj.out_features,)):
            support["qk_norm"] = "full"
        else:
            return None, f"{name}: q/k norms of widths {widths} are neither per head ({head_dim}) nor whole"
        for norm_name in ("q_norm", "k_norm"):
            numerics, why = norm_numerics(getattr(module, norm_name))
            if numerics is None:
                return None, f"{name}.{norm_name}: {why}"
            support["norms"][norm_name] = numerics
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if not callable(eager):
        return None, f"{name}: its module has no eager_attention_forward (what the stock forward calls for eager)"
    support["eager"] = eager
    support["extras"] = ATTENTION_EXTRAS.get(getattr(config, "model_type", None), ())
    return support, ""


def patch_attention(module: nn.Module, support: dict) -> None:
    from tli_kernels.modules import _swap

    _swap.swap_in(module, TliAttention)
    for norm_name, numerics in support["norms"].items():
        patch_rms_norm(getattr(module, norm_name), numerics)
    if support["qk_norm"] is not None:
        module._tli_qk_norm = support["qk_norm"]
    if support["qkv_split"] is not None:
        module._tli_qkv_split = support["qkv_split"]
    module._tli_eager = support["eager"]
    module._tli_extras = support["extras"]
    if not getattr(module, "use_rope", True):
        module._tli_use_rope = False


def unpatch_attention(module: nn.Module) -> None:
    from tli_kernels.modules import _swap

    for norm_name in ("q_norm", "k_norm"):
        norm = getattr(module, norm_name, None)
        if norm is not None:
            unpatch_rms_norm(norm)
    module.__dict__.pop("_tli_qk_norm", None)
    module.__dict__.pop("_tli_qkv_split", None)
    module.__dict__.pop("_tli_eager", None)
    module.__dict__.pop("_tli_extras", None)
    module.__dict__.pop("_tli_use_rope", None)
    _swap.swap_out(module)


def check_attention(module: nn.Module, where: str) -> dict:
    support, why = attention_support(module)
    if support is None:
        raise ValueError(f"{where}: {why}")
    return support
