"""One error type for everything wrong with a checkpoint on disk.

Its message always starts with the file (and the tensor, when one is at fault) so the command line
can print it as a single line.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file, index or config breaks the format contract or does not fit the request."""

    def __init__(self, message: str, path: str | None = None, tensor: str | None = None):
        self.path = path
        self.tensor = tensor
        self.reason = message
        where = path or ""
        if tensor is not None:
            where = f"{where}: tensor {tensor!r}" if where else f"tensor {tensor!r}"
        super().__init__(f"{where}: {message}" if where else message)
