"""Module tests run the Triton kernels on CPU under Triton's interpreter. It must be switched on before
the process first imports triton, so it is set here on machines without CUDA (running the suite with
TRITON_INTERPRET=1 in the environment does the same, and is what CI does)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tli_kernels.ops._triton import use_triton  # noqa: E402


@pytest.fixture
def require_triton():
    """Call with (kernel, tensor): skips, saying why, where the kernel cannot run."""

    def check(kernel, x: torch.Tensor) -> None:
        if not use_triton(kernel, x):
            pytest.skip("Triton cannot run here: no CUDA and TRITON_INTERPRET=1 was not set before import")

    return check
