"""Triton kernels for the memory-bound parts of a Llama-family decoder block, and the attention dispatch.

Each op is a `torch.library.custom_op` (namespace `tli`) with a fake and an autograd registration, so
`torch.compile` sees one opaque node instead of breaking the graph. Importing this package compiles
nothing and queries no GPU; kernels are compiled by Triton on first launch. On CPU the ops run the
kernels under Triton's interpreter when TRITON_INTERPRET=1 was set before import, else the PyTorch
reference in `tli_kernels.reference`.
"""

from tli_kernels.ops._triton import get_ops_backend, ops_backend, set_ops_backend
from tli_kernels.ops.attention import (
    attention,
    attention_backend,
    flash_attn_available,
    get_attention_backend,
    resolve_backend,
    set_attention_backend,
)
from tli_kernels.ops.gate_up_proj import gate_up_proj
from tli_kernels.ops.rms_norm import add_rms_norm, rms_norm
from tli_kernels.ops.rope import apply_rope
from tli_kernels.ops.swiglu import swiglu, swiglu_packed

__all__ = [
    "add_rms_norm",
    "apply_rope",
    "attention",
    "attention_backend",
    "flash_attn_available",
    "gate_up_proj",
    "get_attention_backend",
    "get_ops_backend",
    "ops_backend",
    "resolve_backend",
    "rms_norm",
    "set_attention_backend",
    "set_ops_backend",
    "swiglu",
    "swiglu_packed",
]
