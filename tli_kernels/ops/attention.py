"""One dispatch point for attention: flash-attn when installed, else PyTorch SDPA, with one override.

Design trade-off. Attention is compute-bound and already has excellent kernels, so tli writes none:
it picks one, and leaves the user's SDPA switches alone. flash-attn (when importable, on CUDA,
fp16/bf16, no explicit mask) takes grouped-query K/V natively and aligns its causal mask to the bottom
right, which is what a KV cache needs. Otherwise SDPA, with `enable_gqa=True` so K/V are not repeated
in memory; with a mask (padding), only where the installed torch has a fused kernel taking GQA with a
mask for these inputs (asked once per input kind through `torch._fused_sdp_choice`), else K/V are
repeated, as transformers does, rather than fall to the math kernel.

SDPA backend order. tli never turns a backend on or off (`torch.backends.cuda.enable_*_sdp` and
`sdpa_kernel(...)` are the user's), and enters no `sdpa_kernel` context per call (about 90 us of CPU
each). On Hopper/Blackwell it prefers cuDNN for training and prefill shapes, where it is the fastest
SDPA kernel, and not for decode (one query against a KV length that grows every token: cuDNN builds an
execution graph per new shape). Recent torch already puts cuDNN first on those GPUs; where the current
priority order is one of torch's two defaults and does not match that preference, tli reorders it
(two C calls) for the one SDPA call and puts it back. An order the user set is left as it is.

The override (`set_attention_backend` / `attention_backend`) is what tests flip, like nanochat's
flash_attention.py: "auto", "flash_attn", "sdpa" (torch's own backend order, untouched), "sdpa_cudnn"
(cuDNN first for every shape), "reference" (the written-out PyTorch baseline). A forced backend that
cannot run raises; nothing falls back silently. `sdpa_report` says what SDPA would run, inside and
outside tli's ordering, for the benchmark records.
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

# SDPBackend values (torch.nn.attention.SDPBackend): the priority order is a list of these ints.
_MATH, _FLASH, _EFFICIENT, _CUDNN, _OVERRIDEABLE = 0, 1, 2, 3, 4
_BACKEND_NAMES = {-1: "error", 0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
# The orders torch itself sets (OVERRIDEABLE left out): its static default, and the one it switches to
# on sm90/sm100 with a recent cuDNN. Any other order was chosen by the user, and tli leaves it alone.
_TORCH_DEFAULT_ORDERS = ((_FLASH, _EFFICIENT, _MATH, _CUDNN), (_CUDNN, _FLASH, _EFFICIENT, _MATH))


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
def _prefers_cudnn(device_index: int) -> bool:
    # Where torch itself prefers cuDNN attention (sdp_utils.cpp: sm 9.x and 10.x with a recent cuDNN).
    return torch.cuda.get_device_capability(device_index)[0] in (9, 10)


def _on_cuda(t: Tensor) -> bool:
    return t.device.type == "cuda"


def _device_index(t: Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _flash_attn_applies(q: Tensor, attn_mask: Tensor | None) -> str | None:
    """None when flash-attn can take these inputs, else the reason it cannot."""
    if q.device.type != "cuda":
        return f"flash_attn needs CUDA tensors, got {q.device.type}"
    if not flash_attn_available():
        return "flash_attn is not installed"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn needs fp16/bf16, got {q.dtype}"
    if attn_mask is not None:
        return "flash_attn takes no explicit mask (padding goes through SDPA)"
    if q.shape[-1] > 256:
        return f"flash_attn supports head_dim <= 256, got {q.shape[-1]}"
    return None


def resolve_backend(q: Tensor, attn_mask: Tensor | None = None) -> str:
    """The backend `attention` will use for these inputs: flash_attn, sdpa, sdpa_cudnn or reference.
    Under "auto" SDPA resolves to "sdpa"; its per-shape backend order is `sdpa_priority`'s business."""
    if _override == "flash_attn":
        reason = _flash_attn_applies(q, attn_mask)
        if reason is not None:
            raise RuntimeError(f"attention backend 'flash_attn' was forced but cannot run: {reason}")
        return "flash_attn"
    if _override != "auto":
        return _override
    if _flash_attn_applies(q, attn_mask) is None:
        return "flash_attn"
    return "sdpa"


# ------------------------------------------------------------------------ SDPA backend ordering
def _backend_enabled(backend: int) -> bool:
    getter = {_MATH: "_get_math_sdp_enabled", _FLASH: "_get_flash_sdp_enabled",
              _EFFICIENT: "_get_mem_efficient_sdp_enabled", _CUDNN: "_get_cudnn_sdp_enabled"}[backend]  # fmt: skip
    return bool(getattr(torch._C, getter)())


_priority_initialised: set[int] = set()


def _init_torch_priority(q: Tensor) -> None:
    """torch sets its own (cuDNN-first) order lazily, at the first SDPA call on a device; reading the
    order before that would see the static default, and restoring it after a reordered call would then
    undo torch's choice. Asking torch which backend it would pick does the initialisation."""
    index = _device_index(q)
    if index in _priority_initialised:
        return
    _priority_initialised.add(index)
    with contextlib.suppress(Exception):
        torch._fused_sdp_choice(q, q, q, None, 0.0, False)


def _sdpa_mode() -> str:
    """How the SDPA order is chosen under the current override: "auto" (by shape), "torch" (the "sdpa"
    override: torch's order untouched) or "cudnn" (the "sdpa_cudnn" override: cuDNN first)."""
    return {"sdpa": "torch", "sdpa_cudnn": "cudnn"}.get(_override, "auto")


def sdpa_priority(q: Tensor, mode: str = "auto", masked: bool = False) -> list[int] | None:
    """The SDPA priority order tli wants for this call, or None to leave torch's order as it is.

    mode "auto": cuDNN first for training and prefill shapes on GPUs where torch prefers it, and not
    first for an unmasked decode step (q_len 1: flash is faster there); a masked decode step (padded
    batches) keeps cuDNN first, as flash takes no mask and GQA with a mask would fall to the math
    kernel (measured on an H200: 213 against stock's 249 tokens/s, batch 4 left-padded, 2026-12-04);
    "cudnn": first for every shape; "torch": no change. Only torch's own default orders are reordered,
    and only while cuDNN is enabled; the enable switches are never touched."""
    if mode == "torch" or not _on_cuda(q) or torch.compiler.is_compiling():
        return None
    if not hasattr(torch._C, "_get_sdp_priority_order"):
        return None
    if mode == "cudnn":
        prefer_cudnn = True
    elif not _prefers_cudnn(_device_index(q)):
        return None
    else:
        prefer_cudnn = q.shape[-2] > 1 or masked
    if not _backend_enabled(_CUDNN):
        return None
    _init_torch_priority(q)
    order = list(torch._C._get_sdp_priority_order())
    if tuple(b for b in order if b != _OVERRIDEABLE) not in _TORCH_DEFAULT_ORDERS:
        return None  # the user's order
    cudnn_first = order[0] == _CUDNN
    if prefer_cudnn == cudnn_first:
        return None
    rest = [b for b in order if b != _CUDNN]
    return [_CUDNN, *rest] if prefer_cudnn else [*rest, _CUDNN]


@contextlib.contextmanager
def _sdpa_order(order: list[int] | None) -> Iterator[None]:
    if order is None:
        yield
        return
    previous = torch._C._get_sdp_priority_order()
    torch._C._set_sdp_priority_order(order)
    try:
        yield
    finally:
        torch._C._set_sdp_priority_order(previous)


@contextlib.contextmanager
def tli_sdpa_order(q: Tensor, masked: bool = False) -> Iterator[None]:
    """Run the block under the SDPA priority order tli's attention uses for queries like q (for control
    runs: the stock model under it separates the attention backend's share of a speed-up)."""
    with _sdpa_order(sdpa_priority(q, _sdpa_mode(), masked)):
        yield


# --------------------------------------------------------------------------- GQA with a mask
_gqa_with_mask: dict[tuple, bool] = {}


def _fused_gqa_with_mask(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, dropout_p: float) -> bool:
    """Whether SDPA has a fused (non-math) kernel for GQA with this kind of mask on this device, per
    the installed torch's own choice. Asked once per kind of input (device, dtype, heads, head_dim, mask
    dtype, decode or not, grad or not); a wrong guess costs speed, never correctness (math takes GQA)."""
    key = (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[-1], attn_mask.dtype, q.shape[-2] == 1,
           torch.is_grad_enabled() and q.requires_grad, dropout_p > 0)  # fmt: skip
    answer = _gqa_with_mask.get(key)
    if answer is None:
        try:
            choice = int(torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, False, enable_gqa=True))
        except (RuntimeError, TypeError):  # an old torch without enable_gqa, or no kernel at all
            choice = _MATH
        answer = _gqa_with_mask[key] = choice not in (_MATH, -1)
    return answer


# ------------------------------------------------------------------------------------ SDPA call
def _bottom_right_causal(q_len: int, kv_len: int, device: torch.device) -> Tensor:
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= rows  # [Sq, Skv], True = attend


def _sdpa_arguments(q, k, v, attn_mask, causal, dropout_p):
    """(k, v, attn_mask, is_causal, enable_gqa) as SDPA should get them."""
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
    groups = q.shape[1] // k.shape[1]
    enable_gqa = False
    if groups > 1:
        if attn_mask is None or not _on_cuda(q):
            enable_gqa = True
        elif not torch.compiler.is_compiling() and _fused_gqa_with_mask(q, k, v, attn_mask, dropout_p):
            enable_gqa = True  # (under torch.compile the choice cannot be asked while tracing: repeat)
        else:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    return k, v, attn_mask, is_causal, enable_gqa


def _sdpa(q, k, v, attn_mask, causal, scale, dropout_p, mode: str) -> Tensor:
    order = sdpa_priority(q, mode, attn_mask is not None)
    k, v, attn_mask, is_causal, gqa = _sdpa_arguments(q, k, v, attn_mask, causal, dropout_p)
    if order is None:  # the common case: no context manager at all (decode calls this every token)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
    else:
        with _sdpa_order(order):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
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
    return _sdpa(q, k, v, attn_mask, causal, scale, dropout_p, _sdpa_mode())


# -------------------------------------------------------------------------------------- report
def sdpa_report(
    q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, causal: bool = True, dropout_p: float = 0.0
) -> dict:
    """What SDPA would run for these inputs: torch's and cuDNN's versions, the enable switches, the
    priority order, and `torch._fused_sdp_choice` as a stock call makes it (torch's order, K/V as
    given) and as tli makes it (its ordering and GQA handling). For benchmark records: part of a
    speed-up may be the attention backend, not the kernels."""

    def names(order):
        return [_BACKEND_NAMES.get(int(b), str(b)) for b in order]

    def choice(kk, vv, mask, is_causal, gqa):
        try:
            return _BACKEND_NAMES.get(int(torch._fused_sdp_choice(q, kk, vv, mask, dropout_p, is_causal,
                                                                   enable_gqa=gqa)), "?")  # fmt: skip
        except Exception as error:  # recorded, not raised: a report must not fail the benchmark
            return f"{type(error).__name__}: {error}"

    if q.device.type == "cuda":
        _init_torch_priority(q)  # the order torch really uses, not the static one it starts from
    order_before = list(torch._C._get_sdp_priority_order()) if hasattr(torch._C, "_get_sdp_priority_order") else []
    backend = resolve_backend(q, attn_mask)
    groups = q.shape[1] // k.shape[1]
    report = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(q.device),
        "capability": list(torch.cuda.get_device_capability(q.device)) if q.device.type == "cuda" else None,
        "enabled": {
            name: _backend_enabled(b)
            for b, name in ((_FLASH, "flash"), (_EFFICIENT, "efficient"), (_CUDNN, "cudnn"), (_MATH, "math"))
        },
        "priority_order_before": names(order_before),
        "shape": {
            "q": list(q.shape),
            "k": list(k.shape),
            "mask": None if attn_mask is None else list(attn_mask.shape),
            "causal": causal,
            "dtype": str(q.dtype),
        },
        "tli_backend": backend,
    }
    # A stock transformers call: K/V repeated when a mask is given (its sdpa path), torch's order.
    stock_k, stock_v = (k, v) if groups == 1 or attn_mask is None else (
        k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))  # fmt: skip
    report["stock_choice"] = choice(stock_k, stock_v, attn_mask, causal and attn_mask is None and q.shape[2] > 1,
                                    groups > 1 and attn_mask is None)  # fmt: skip
    if backend in ("sdpa", "sdpa_cudnn"):
        tli_k, tli_v, mask, is_causal, gqa = _sdpa_arguments(q, k, v, attn_mask, causal, dropout_p)
        order = sdpa_priority(q, _sdpa_mode(), attn_mask is not None)
        report["tli_priority_order"] = names(order) if order is not None else "unchanged"
        report["tli_enable_gqa"] = gqa
        with _sdpa_order(order):
            report["tli_choice"] = choice(tli_k, tli_v, mask, is_causal, gqa)
    else:
        report["tli_choice"] = backend
    report["priority_order_after"] = names(torch._C._get_sdp_priority_order()) if order_before else []
    return report
