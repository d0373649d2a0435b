"""tli_kernels/ops/attention.py: the dispatch against the written-out reference (causal, decode with a
cache, chunked prefill, bool and float masks, grouped-query heads), forward and backward, and the
override the tests flip."""

import pytest
import torch

from tests.ops.tolerance import DEVICE, assert_close
from tli_kernels import reference
from tli_kernels.ops import attention, attention_backend, flash_attn_available, resolve_backend, set_attention_backend

B, HQ, HK, D = 2, 6, 2, 16
LOWEST = torch.finfo(torch.float32).min


def _qkv(q_len, kv_len, requires_grad=False):
    torch.manual_seed(q_len * 100 + kv_len)
    q = torch.randn(B, HQ, q_len, D, device=DEVICE, requires_grad=requires_grad)
    k = torch.randn(B, HK, kv_len, D, device=DEVICE, requires_grad=requires_grad)
    v = torch.randn(B, HK, kv_len, D, device=DEVICE, requires_grad=requires_grad)
    return q, k, v


def _padding_mask(q_len, kv_len, kind):
    # Batch row 0 padded by two tokens, as transformers builds it: [B, 1, Sq, Skv]. A bool mask pads on
    # the left (its first queries then see no key: SDPA and the reference both output zeros there); a
    # float mask pads on the right (a float row with no key left is degenerate in every backend).
    keep = torch.ones(B, 1, q_len, kv_len, dtype=torch.bool, device=DEVICE)
    if kind == "bool":
        keep[0, :, :, :2] = False
    else:
        keep[0, :, :, -2:] = False
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, LOWEST)


CASES = [
    # (q_len, kv_len, mask kind)
    (7, 7, None),  # training / prefill: plain causal
    (1, 9, None),  # decode step with a KV cache
    (3, 9, None),  # chunked prefill on top of a cache: bottom-right causal
    (7, 7, "bool"),
    (7, 7, "float"),
    (3, 9, "bool"),
]


@pytest.mark.parametrize("q_len,kv_len,mask", CASES)
def test_dispatch_matches_reference(q_len, kv_len, mask):
    q, k, v = _qkv(q_len, kv_len, requires_grad=True)
    attn_mask = _padding_mask(q_len, kv_len, mask) if mask else None
    refs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    out = attention(q, k, v, attn_mask=attn_mask, causal=True, scale=0.3)
    want = reference.attention(*refs, attn_mask=attn_mask, causal=True, scale=0.3)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)

    assert out.shape == (B, q_len, HQ, D)
    assert_close(out, want, torch.float32, "out")
    for got, exp, name in zip((q.grad, k.grad, v.grad), (r.grad for r in refs), "qkv", strict=True):
        assert_close(got, exp, torch.float32, f"d{name}")


def test_reference_matches_transformers_eager_attention():
    # The baseline itself against transformers' eager path (repeat_kv + matmul + softmax).
    from transformers.models.llama.modeling_llama import eager_attention_forward

    q, k, v = _qkv(5, 5)
    mask = torch.zeros(B, 1, 5, 5, device=DEVICE)
    mask[0, :, :, :2] = LOWEST  # left padding
    causal = torch.ones(5, 5, dtype=torch.bool, device=DEVICE).tril()
    full_mask = mask.masked_fill(~causal, LOWEST)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = HQ // HK, False
    want, _ = eager_attention_forward(module, q, k, v, full_mask, scaling=0.25)
    got = reference.attention(q, k, v, attn_mask=mask, causal=True, scale=0.25)
    # Row 0's first two queries see no key: eager averages them, SDPA and the reference give zeros.
    assert_close(got[1], want[1], torch.float32, "unpadded row")
    assert_close(got[0, 2:], want[0, 2:], torch.float32, "padded row, real tokens")


def test_override_flips_the_backend():
    q, k, v = _qkv(4, 4)
    assert resolve_backend(q) in ("sdpa", "sdpa_cudnn", "flash_attn")
    with attention_backend("reference"):
        assert resolve_backend(q) == "reference"
        out = attention(q, k, v, causal=True)
    assert resolve_backend(q) != "reference"
    assert_close(out, attention(q, k, v, causal=True), torch.float32, "reference vs dispatch")


def test_forced_backend_that_cannot_run_raises():
    q, k, v = _qkv(4, 4)
    if flash_attn_available() and DEVICE.type == "cuda":
        pytest.skip("flash_attn can run here")
    with attention_backend("flash_attn"), pytest.raises(RuntimeError, match="'flash_attn' was forced"):
        attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="must be one of"):
        set_attention_backend("xformers")


def test_shape_errors():
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="Hk dividing Hq"):
        attention(q[:, :5], k, v)
