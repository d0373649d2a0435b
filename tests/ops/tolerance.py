"""How close an op must come to its reference (import as tests.ops.tolerance)."""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# float32 must agree to 1e-5 relative; float16 within a few ulps of its 2^-11 epsilon.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.shape == expected.shape, (what, tuple(actual.shape), tuple(expected.shape))
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    error = rel_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g} > {TOLERANCE[dtype]} ({dtype})"
