"""Plain PyTorch versions of every tli op: the baseline of the tests and benchmarks, and the path the
ops take where Triton cannot run. They follow the Hugging Face Llama code's numerics (which values are
rounded to the input dtype and when), so a patched model on this path computes what the stock one does.
"""

from tli_kernels.reference.attention import attention
from tli_kernels.reference.rms_norm import add_rms_norm, apply_weight, rms_norm, rms_norm_backward
from tli_kernels.reference.rope import apply_rope, rotate_half
from tli_kernels.reference.scaled_add import scaled_add
from tli_kernels.reference.swiglu import ACTIVATIONS, activation, swiglu

__all__ = [
    "ACTIVATIONS",
    "activation",
    "add_rms_norm",
    "apply_rope",
    "apply_weight",
    "attention",
    "rms_norm",
    "rms_norm_backward",
    "rotate_half",
    "scaled_add",
    "swiglu",
]
