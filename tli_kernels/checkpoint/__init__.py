"""Checkpoints on disk: the safetensors format, a model's layout, the SurgeryPlan and its executors.

Names are loaded on first use, so that importing one submodule (errors, say) does not import the
layout and, through it, the architecture registry.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "tli_kernels.checkpoint.errors",
    "CheckpointLayout": "tli_kernels.checkpoint.layout",
    "FileHeader": "tli_kernels.checkpoint.safetensors_format",
    "TensorEntry": "tli_kernels.checkpoint.safetensors_format",
    "read_header": "tli_kernels.checkpoint.safetensors_format",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
