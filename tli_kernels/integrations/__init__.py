"""Integrations with model libraries: `hf` patches one loaded transformers model in place."""

from tli_kernels.integrations.hf import (
    PROVENANCE_FILE,
    SUPPORTED_MODEL_TYPES,
    TliKernelsHandle,
    apply_tli_kernels,
    fold_residual_scales,
    read_provenance,
    scales_from_provenance,
)

__all__ = [
    "PROVENANCE_FILE",
    "SUPPORTED_MODEL_TYPES",
    "TliKernelsHandle",
    "apply_tli_kernels",
    "fold_residual_scales",
    "read_provenance",
    "scales_from_provenance",
]
