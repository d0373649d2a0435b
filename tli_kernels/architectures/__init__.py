"""Decoder architectures as data: where the layers are and how to make or scale an identity block.

`registry.ENTRIES` lists the families tli knows (proven by tests/architectures); `resolve_architecture`
picks the entry for a config, or proves a generic rule on a tiny random instance of an unknown
model type (`generic.py`, `check.py`) before any conversion uses it.
"""

from tli_kernels.architectures.registry import BY_MODEL_TYPE, ENTRIES
from tli_kernels.architectures.spec import Architecture, Branch
from tli_kernels.architectures.structure import DecoderStructure, architecture_names, resolve_architecture

__all__ = [
    "BY_MODEL_TYPE",
    "ENTRIES",
    "Architecture",
    "Branch",
    "DecoderStructure",
    "architecture_names",
    "resolve_architecture",
]
