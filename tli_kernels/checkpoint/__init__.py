"""Checkpoints on disk: the safetensors format, a model's layout, the SurgeryPlan and its executors."""

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.safetensors_format import FileHeader, TensorEntry, read_header

__all__ = ["CheckpointError", "CheckpointLayout", "FileHeader", "TensorEntry", "read_header"]
