"""tli_kernels/ops/rope.py: RoPE on q and k against transformers' apply_rotary_pos_emb, with cos/sin
from the model's own rotary embedding (default and llama3 scaling), in place and functional."""

import pytest
import torch
from torch.library import opcheck
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tests.ops.tolerance import DEVICE, assert_close
from tli_kernels import reference
from tli_kernels.ops import apply_rope
from tli_kernels.ops.rope import _rope_kernel

B, S, HQ, HK, D = 2, 6, 6, 2, 16

ROPE_CONFIGS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    # yarn scales cos/sin by its attention factor: the kernel must take them as given
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
}


def _cos_sin(rope: str, dtype, per_batch_positions: bool):
    config = LlamaConfig(
        hidden_size=HQ * D,
        num_attention_heads=HQ,
        num_key_value_heads=HK,
        rope_parameters=ROPE_CONFIGS[rope],
        max_position_embeddings=32,
    )
    rotary = LlamaRotaryEmbedding(config).to(DEVICE)
    if per_batch_positions:  # e.g. left padding: each row its own positions -> cos/sin [B, S, D]
        position_ids = torch.stack([torch.arange(S), torch.arange(S) + 3]).to(DEVICE)
    else:
        position_ids = torch.arange(S, device=DEVICE)[None]
    return rotary(torch.empty(1, device=DEVICE, dtype=dtype), position_ids)


def _hf_rope(q, k, cos, sin):
    # transformers works on [B, H, S, D]; ours is [B, S, H, D].
    q_out, k_out = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


@pytest.mark.parametrize("rope", ["default", "llama3", "yarn", "linear"])
@pytest.mark.parametrize("per_batch_positions", [False, True])
def test_rope_matches_transformers(rope, per_batch_positions, require_triton):
    torch.manual_seed(0)
    cos, sin = _cos_sin(rope, torch.float32, per_batch_positions)
    q = torch.randn(B, S, HQ, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, S, HK, D, device=DEVICE, requires_grad=True)
    require_triton(_rope_kernel, q)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    q_ref, k_ref = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)

    q_out, k_out = apply_rope(q, k, cos, sin)
    torch.autograd.backward([q_out, k_out], [dq, dk])
    q_want, k_want = _hf_rope(q_ref, k_ref, cos, sin)
    torch.autograd.backward([q_want, k_want], [dq, dk])

    assert_close(q_out, q_want, torch.float32, "q")
    assert_close(k_out, k_want, torch.float32, "k")
    assert_close(q.grad, q_ref.grad, torch.float32, "dq")
    assert_close(k.grad, k_ref.grad, torch.float32, "dk")


def test_rope_float16_matches_reference(require_triton):
    torch.manual_seed(1)
    cos, sin = _cos_sin("default", torch.float16, False)
    q = torch.randn(B, S, HQ, D, device=DEVICE).half().requires_grad_(True)
    k = torch.randn(B, S, HK, D, device=DEVICE).half().requires_grad_(True)
    require_triton(_rope_kernel, q)
    q_ref, k_ref = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    q_out, k_out = apply_rope(q, k, cos, sin)
    (q_out.float().square().sum() + k_out.float().square().sum()).backward()
    q_want, k_want = reference.apply_rope(q_ref, k_ref, cos, sin)
    (q_want.float().square().sum() + k_want.float().square().sum()).backward()
    for got, want, what in [
        (q_out, q_want, "q"),
        (k_out, k_want, "k"),
        (q.grad, q_ref.grad, "dq"),
        (k.grad, k_ref.grad, "dk"),
    ]:
        assert_close(got, want, torch.float16, what)


def test_rope_in_place_without_grad(require_triton):
    torch.manual_seed(2)
    cos, sin = _cos_sin("llama3", torch.float32, True)
    # q as a view of a projection output, the way the attention module calls it
    q = torch.randn(B, S, HQ * D, device=DEVICE).view(B, S, HQ, D)
    k = torch.randn(B, S, HK * D, device=DEVICE).view(B, S, HK, D)
    require_triton(_rope_kernel, q)
    q_want, k_want = _hf_rope(q, k, cos, sin)
    q_ptr = q.data_ptr()
    with torch.no_grad():
        q_out, k_out = apply_rope(q, k, cos, sin)
    assert q_out is q and k_out is k and q.data_ptr() == q_ptr
    assert_close(q, q_want, torch.float32, "q")
    assert_close(k, k_want, torch.float32, "k")


def test_rope_in_place_on_a_strided_layout_falls_back_correctly():
    cos, sin = _cos_sin("default", torch.float32, False)
    q = torch.randn(B, HQ, S, D, device=DEVICE).transpose(1, 2)  # heads not contiguous per token
    k = torch.randn(B, HK, S, D, device=DEVICE).transpose(1, 2)
    q_want, k_want = _hf_rope(q, k, cos, sin)
    apply_rope(q, k, cos, sin, inplace=True)
    assert_close(q, q_want, torch.float32, "q")
    assert_close(k, k_want, torch.float32, "k")


def test_rope_errors():
    cos, sin = _cos_sin("default", torch.float32, False)
    q = torch.randn(B, S, HQ, D, requires_grad=True)
    k = torch.randn(B, S, HK, D)
    with pytest.raises(ValueError, match="cannot be recorded by autograd"):
        apply_rope(q, k, cos, sin, inplace=True)
    with pytest.raises(ValueError, match="shapes do not fit"):
        apply_rope(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match=r"must be \[B, S, H, D\]"):
        apply_rope(q[0], k, cos, sin)


def test_opcheck_rope():
    cos, sin = _cos_sin("llama3", torch.float32, True)
    q = torch.randn(B, S, HQ, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, S, HK, D, device=DEVICE, requires_grad=True)
    opcheck(torch.ops.tli.rope.default, (q, k, cos, sin))
    opcheck(torch.ops.tli.rope_.default, (q.detach().clone(), k.detach().clone(), cos, sin))
