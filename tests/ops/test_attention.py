"""tli_kernels/ops/attention.py: the dispatch against the written-out reference (causal, decode with a
cache, chunked prefill, bool and float masks, grouped-query heads), forward and backward, and the
override the tests flip."""

import pytest
import torch

from tests.ops.tolerance import DEVICE, assert_close
from tli_kernels import ops, reference
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


# --------------------------------------------------------------- SDPA backends: the user's switches
# On this CPU the SDPA call runs for real; what tli would do on a Hopper GPU is shown by making the
# dispatch believe its tensors are there (`_on_cuda`, `_prefers_cudnn`) and recording, at the moment
# SDPA is called, the enable switches and the priority order it sees.
import importlib  # noqa: E402

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

attention_module = importlib.import_module("tli_kernels.ops.attention")
CUDNN, FLASH, EFFICIENT, MATH = (int(b) for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH))  # fmt: skip


def _switches():
    b = torch.backends.cuda
    return {"flash": b.flash_sdp_enabled(), "efficient": b.mem_efficient_sdp_enabled(), "math": b.math_sdp_enabled(),
            "cudnn": b.cudnn_sdp_enabled(), "order": list(torch._C._get_sdp_priority_order())}  # fmt: skip


@pytest.fixture
def as_if_on_hopper(monkeypatch):
    """Calls as if the tensors were on an sm_90 GPU; returns the list of (switches, kwargs) SDPA saw."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((_switches(), {"k_heads": k.shape[1], **{n: kwargs.get(n) for n in ("enable_gqa",)}}))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    monkeypatch.setattr(attention_module, "_on_cuda", lambda t: True)
    monkeypatch.setattr(attention_module, "_device_index", lambda t: 0)
    monkeypatch.setattr(attention_module, "_prefers_cudnn", lambda index: True)
    monkeypatch.setattr(attention_module, "_gqa_with_mask", {})
    if DEVICE.type == "cuda":  # let torch set its own default order first (it does so lazily, once)
        q = torch.randn(1, 2, 8, 64, device=DEVICE, dtype=torch.float16)
        torch._fused_sdp_choice(q, q, q, None, 0.0, False)
    order = torch._C._get_sdp_priority_order()
    yield seen
    torch._C._set_sdp_priority_order(order)


def test_cudnn_first_for_prefill_not_for_decode_and_order_restored(as_if_on_hopper):
    before = _switches()
    torch._C._set_sdp_priority_order([FLASH, EFFICIENT, MATH, CUDNN])  # torch's static default
    prefill, decode = _qkv(7, 7), _qkv(1, 9)
    attention(*prefill, causal=True)
    attention(*decode, causal=True)
    assert as_if_on_hopper[0][0]["order"][0] == CUDNN
    assert as_if_on_hopper[1][0]["order"][0] != CUDNN
    assert _switches()["order"][:4] == [FLASH, EFFICIENT, MATH, CUDNN]  # put back after each call
    # Where torch already puts cuDNN first, decode moves it back, prefill changes nothing.
    torch._C._set_sdp_priority_order([CUDNN, FLASH, EFFICIENT, MATH])
    attention(*prefill, causal=True)
    attention(*decode, causal=True)
    assert as_if_on_hopper[2][0]["order"][0] == CUDNN and as_if_on_hopper[3][0]["order"][-1] == CUDNN
    assert {k: v for k, v in _switches().items() if k != "order"} == {k: v for k, v in before.items() if k != "order"}


def test_a_masked_decode_step_keeps_cudnn_first(as_if_on_hopper):
    # Flash takes no mask, and GQA with a mask has no efficient kernel: demoting cuDNN for a padded
    # batch's decode step would land on math (seen on an H200). Unmasked decode still moves it back.
    torch._C._set_sdp_priority_order([CUDNN, FLASH, EFFICIENT, MATH])
    q, k, v = _qkv(1, 9)
    mask = _padding_mask(1, 9, "bool")
    attention(q, k, v, attn_mask=mask, causal=True)
    assert as_if_on_hopper[-1][0]["order"][0] == CUDNN
    attention(q, k, v, causal=True)
    assert as_if_on_hopper[-1][0]["order"][-1] == CUDNN
    assert ops.sdpa_report(q, k, v, attn_mask=mask, causal=True)["tli_priority_order"] == "unchanged"


def test_backends_the_user_disabled_stay_disabled(as_if_on_hopper):
    q, k, v = _qkv(7, 7)
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        out = attention(q, k, v, causal=True)
        assert as_if_on_hopper[-1][0]["flash"] is False  # not re-enabled for the call
        assert torch.backends.cuda.flash_sdp_enabled() is False
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
    with sdpa_kernel([SDPBackend.MATH]):  # the user's context: math only
        attention(q, k, v, causal=True)
        inside = as_if_on_hopper[-1][0]
        assert not inside["cudnn"] and not inside["flash"] and not inside["efficient"] and inside["math"]
    assert_close(out, reference.attention(q, k, v, causal=True), torch.float32, "out")


def test_an_order_the_user_set_is_left_alone(as_if_on_hopper):
    torch._C._set_sdp_priority_order([EFFICIENT, FLASH, CUDNN, MATH])
    attention(*_qkv(7, 7), causal=True)
    assert as_if_on_hopper[-1][0]["order"][:4] == [EFFICIENT, FLASH, CUDNN, MATH]


@pytest.mark.parametrize("fused", [True, False])
def test_gqa_with_a_mask_takes_enable_gqa_where_torch_has_a_fused_kernel(as_if_on_hopper, monkeypatch, fused):
    # What the installed torch would choose for GQA with a mask decides; here it is made to answer
    # "efficient" (a fused kernel: K/V stay unrepeated) or "math" (repeat K/V, as transformers does).
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **kw: EFFICIENT if fused else MATH)
    q, k, v = _qkv(7, 7, requires_grad=True)
    mask = _padding_mask(7, 7, "bool")
    out = attention(q, k, v, attn_mask=mask, causal=True)
    call = as_if_on_hopper[-1][1]
    assert call == ({"k_heads": HK, "enable_gqa": True} if fused else {"k_heads": HQ, "enable_gqa": False})
    assert_close(out, reference.attention(q, k, v, attn_mask=mask, causal=True), torch.float32, "out")


def test_sdpa_report_says_what_runs(as_if_on_hopper):
    import json

    torch._C._set_sdp_priority_order([FLASH, EFFICIENT, MATH, CUDNN])
    report = ops.sdpa_report(*_qkv(7, 7), causal=True)
    json.dumps(report)  # goes into the benchmark's JSON as is
    assert report["priority_order_before"][:4] == ["flash", "efficient", "math", "cudnn"]
    assert report["tli_priority_order"][0] == "cudnn" and report["priority_order_after"] == report[
        "priority_order_before"]  # fmt: skip
    assert report["tli_backend"] == "sdpa" and report["tli_enable_gqa"] is True
    if DEVICE.type == "cpu":  # SDPA's CPU kernels
        assert report["stock_choice"] in ("flash", "math") and report["tli_choice"] in ("flash", "math")
    decode = ops.sdpa_report(*_qkv(1, 9), causal=True)
    assert decode["tli_priority_order"] == "unchanged"
