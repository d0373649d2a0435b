"""Model tests run the Triton kernels on CPU under Triton's interpreter. It must be switched on before
the process first imports triton, so it is set here on machines without CUDA (running the suite with
TRITON_INTERPRET=1 in the environment does the same, and is what CI does)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
