"""One dispatch point for attention: flash-attn when installed, else PyTorch SDPA, with one override.

Design trade-off. Attention is compute-bound and already has excellent kernels, so tli writes none:
it picks one. flash-attn (when importable, on CUDA, fp16/bf16, no explicit mask) takes grouped-query
K/V natively and aligns its causal mask to the bottom right, which is what a KV cache needs. Otherwise
SDPA: with `enable_gqa=True` K/V are never repeated in memory; on Hopper the cuDNN backend is put first
(it is the fastest SDPA kernel there; SDPA falls through to flash / efficient / math for inputs cuDNN
does not take). One exception, as in transformers: on CUDA, SDPA's fused kernels accept GQA only
without a mask, so with a padding mask K/V are repeated (the math kernel it would otherwise fall to
repeats them too, and is slower). Masks are what the transformers model builds for "sdpa"/"eager":
bool (True = attend) or float (added), broadcastable to [B, Hq, Sq, Skv].

The override (`set_attention_backend` / `attention_backend`) is what tests flip, like nanochat's
flash_attention.py: "auto", "flash_attn", "sdpa" (torch's own backend order), "sdpa_cudnn", "reference"
(the written-out PyTorch baseline). A forced backend that cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from tli_kernels import reference

BACKENDS = ("auto", "flash_attn", "sdpa", "sdpa_cudnn", "reference")
_override = "auto"


def set_attention_backend(name: str) -> None:
    """Force one attention backend for every call from now on ("auto" restores the dispatch)."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    _override = name


def get_attention_backend() -> str:
    return _override


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Context manager form of `set_attention_backend`; restores the previous choice on exit."""
    previous = _override
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


_flash_attn = None  # the flash_attn module once looked up (False: not installed)


def _flash_attn_module():
    global _flash_attn
    if _flash_attn is None:
        try:
            import flash_attn
        except ImportError:
            _flash_attn = False
        else:
            _flash_attn = flash_attn
    return _flash_attn


# torch.compile calls these once while tracing and keeps the answer (an import or a device query
# cannot be traced); neither changes during a run.
@torch.compiler.assume_constant_result
def flash_attn_available() -> bool:
    return _flash_attn_module() is not False


@torch.compiler.assume_constant_result
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def _flash_attn_applies(q: Tensor, attn_mask: Tensor | None) -> str | None:
    """None when flash-attn can take these inputs, else the reason it cannot."""
    if not flash_attn_available():
        return "flash_attn is not installed"
    if q.device.type != "cuda":
        return f"flash_attn needs CUDA tensors, got {q.device.type}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn needs fp16/bf16, got {q.dtype}"
    if attn_mask is not None:
        return "flash_attn takes no explicit mask (padding goes through SDPA)"
    if q.shape[-1] > 256:
        return f"flash_attn supports head_dim <= 256, got {q.shape[-1]}"
    return None


def resolve_backend(q: Tensor, attn_mask: Tensor | None = None) -> str:
    """The backend `attention` will use for these inputs."""
    if _override == "flash_attn":
        reason = _flash_attn_applies(q, attn_mask)
        if reason is not None:
            raise RuntimeError(f"attention backend 'flash_attn' was forced but cannot run: {reason}")
        return "flash_attn"
    if _override != "auto":
        return _override
    if _flash_attn_applies(q, attn_mask) is None:
        return "flash_attn"
    if q.device.type == "cuda" and _is_hopper(q.device.index if q.device.index is not None else 0):
        return "sdpa_cudnn"
    return "sdpa"


def _bottom_right_causal(q_len: int, kv_len: int, device: torch.device) -> Tensor:
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= rows  # [Sq, Skv], True = attend


def _sdpa_context(q: Tensor, prefer_cudnn: bool):
    if not prefer_cudnn or q.device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    return sdpa_kernel(order, set_priority=True)


def _sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    causal: bool,
    scale: float | None,
    dropout_p: float,
    prefer_cudnn: bool,
) -> Tensor:
    q_len, kv_len = q.shape[2], k.shape[2]
    is_causal = False
    if causal and q_len > 1:
        if q_len == kv_len and attn_mask is None:
            is_causal = True  # SDPA's causal is top-left aligned: the same as bottom-right only here
        else:
            keep = _bottom_right_causal(q_len, kv_len, q.device)
            if attn_mask is None:
                attn_mask = keep
            elif attn_mask.dtype == torch.bool:
                attn_mask = attn_mask & keep
            else:
                attn_mask = attn_mask.masked_fill(~keep, torch.finfo(attn_mask.dtype).min)
    gqa = {}
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if attn_mask is None or q.device.type != "cuda":
            gqa["enable_gqa"] = True
        else:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    with _sdpa_context(q, prefer_cudnn):
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **gqa
        )
    return out.transpose(1, 2)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Softmax attention. q: [B, Hq, Sq, D]; k, v: [B, Hk, Skv, D] with Hk dividing Hq (never repeated
    in memory where the backend takes GQA). `attn_mask`: bool (True = attend) or float (added),
    broadcastable to [B, Hq, Sq, Skv]. `causal`: query i sees keys up to i + Skv - Sq (bottom-right
    alignment, right for a KV cache). Returns [B, Sq, Hq, D] (possibly a transposed view)."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0]:
        raise ValueError(
            f"attention: expected q [B, Hq, Sq, D] and k, v [B, Hk, Skv, D] with Hk dividing Hq; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    backend = resolve_backend(q, attn_mask)
    if backend == "flash_attn":
        return _flash_attn_module().flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=dropout_p, softmax_scale=scale, causal=causal,
        )  # fmt: skip
    if backend == "reference":
        return reference.attention(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale, dropout_p=dropout_p)
    return _sdpa(q, k, v, attn_mask, causal, scale, dropout_p, prefer_cudnn=backend == "sdpa_cudnn")
