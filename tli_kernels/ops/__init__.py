"""Triton kernels for the memory-bound parts of a Llama-family decoder block, and the attention dispatch.

Each op is a `torch.library.custom_op` (namespace `tli`) with a fake and an autograd registration, so
`torch.compile` sees one opaque node instead of breaking the graph; in eager mode the same kernels are
called through an `autograd.Function` (or directly without grad), which costs a fraction of the custom
op's dispatch (`_triton.py`). Importing this package compiles nothing and queries no GPU; kernels are
compiled by Triton on first launch. On CPU the ops run the kernels under Triton's interpreter when
TRITON_INTERPRET=1 was set before import, else the PyTorch reference in `tli_kernels.reference`.
"""

from tli_kernels.ops._triton import custom_op_dispatch, get_ops_backend, ops_backend, set_ops_backend
from tli_kernels.ops.attention import (
    attention,
    attention_backend,
    flash_attn_available,
    get_attention_backend,
    resolve_backend,
    sdpa_priority,
    sdpa_report,
    set_attention_backend,
    tli_sdpa_order,
)
from tli_kernels.ops.gate_up_proj import gate_up_proj
from tli_kernels.ops.rms_norm import add_rms_norm, rms_norm
from tli_kernels.ops.rope import apply_rope
from tli_kernels.ops.scaled_add import scaled_add
from tli_kernels.ops.swiglu import swiglu, swiglu_packed

__all__ = [
    "add_rms_norm",
    "apply_rope",
    "attention",
    "attention_backend",
    "custom_op_dispatch",
    "flash_attn_available",
    "gate_up_proj",
    "get_attention_backend",
    "get_ops_backend",
    "ops_backend",
    "resolve_backend",
    "rms_norm",
    "scaled_add",
    "sdpa_priority",
    "sdpa_report",
    "set_attention_backend",
    "set_ops_backend",
    "swiglu",
    "swiglu_packed",
    "tli_sdpa_order",
]
