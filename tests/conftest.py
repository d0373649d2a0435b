"""Shared fixtures: small Hugging Face checkpoints written by transformers itself (an independent
writer), and the built-in SmolLM2-135M materialised once per checkout."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run in the interpreter on a machine without a GPU, and compiled on one with a GPU,
# whatever the environment says (with TRITON_INTERPRET=1 on a GPU machine the kernels would run in
# the CPU interpreter and the suite would not test the compiled code). Set before tli_kernels.ops is
# imported: Triton decides compiled or interpreted when a kernel is decorated.
if torch.cuda.is_available():
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
        print(f"tests/conftest.py: CUDA is available, ignoring TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}")
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import save_tiny_llama

# Verdicts of generic architecture rules are cached per user; the tests keep their own cache.
if "TLI_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TLI_CACHE_DIR"] = tempfile.mkdtemp(prefix="tli-test-cache-")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_DIR = os.environ.get("TLI_SMOLLM2_DIR", os.path.join(REPO, ".cache", "smollm2-135m"))


@pytest.fixture
def tiny_llama(tmp_path):
    return save_tiny_llama(str(tmp_path / "src"))


@pytest.fixture(scope="session")
def smollm2_dir():
    from tli_kernels.builtin.smollm2 import materialize

    os.makedirs(os.path.dirname(SMOLLM2_DIR), exist_ok=True)
    return materialize(SMOLLM2_DIR)


@pytest.fixture
def require_triton():
    """Call with (kernel, tensor): skips, saying why, where the kernel cannot run (no CUDA and
    TRITON_INTERPRET was not set before triton was first imported)."""
    from tli_kernels.ops._triton import use_triton

    def check(kernel, x: torch.Tensor) -> None:
        if not use_triton(kernel, x):
            pytest.skip("Triton cannot run here: no CUDA and TRITON_INTERPRET=1 was not set before import")

    return check


def pytest_runtest_logreport(report):
    """With TLI_TEST_LOG=FILE, one line per test as it ends (`PASSED|FAILED|ERROR|SKIPPED nodeid seconds`),
    flushed at once: a run cut off by a time limit (the GPU window's) still says what passed and failed.
    Under pytest-xdist the controller writes the lines, not the workers."""
    path = os.environ.get("TLI_TEST_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = "ERROR" if report.when == "setup" and report.outcome == "failed" else report.outcome.upper()
    elif report.when == "teardown" and report.outcome == "failed":
        outcome = "ERROR"
    else:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{outcome} {report.nodeid} {report.duration:.2f}s\n")
