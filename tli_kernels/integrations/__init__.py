"""Integrations with model libraries: `hf` patches one loaded transformers model in place."""

from tli_kernels.integrations.hf import (
    KERNEL_FAMILIES,
    PROVENANCE_FILE,
    SUPPORTED_MODEL_TYPES,
    KernelReport,
    TliKernelsHandle,
    apply_tli_kernels,
    fold_residual_scales,
    read_provenance,
    scales_from_provenance,
)

__all__ = [
    "KERNEL_FAMILIES",
    "PROVENANCE_FILE",
    "SUPPORTED_MODEL_TYPES",
    "KernelReport",
    "TliKernelsHandle",
    "apply_tli_kernels",
    "fold_residual_scales",
    "read_provenance",
    "scales_from_provenance",
]
