"""Fixtures for the training tests: a tiny upscaled Llama and token streams a tiny model can learn."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.helpers import save_tiny_llama

VOCAB = 128


def markov_ids(n: int, seed: int) -> np.ndarray:
    """x[t+1] = 3 x[t] + 7 mod 128, with 10% of the tokens random: easy to learn, not trivial."""
    g = np.random.default_rng(seed)
    noise, random = g.random(n) < 0.1, g.integers(0, VOCAB, n)
    out = np.empty(n, np.int64)
    out[0] = 1
    for t in range(1, n):
        out[t] = random[t] if noise[t] else (3 * out[t - 1] + 7) % VOCAB
    return out


@pytest.fixture(scope="session")
def token_files(tmp_path_factory):
    """(train.npy, heldout.npy): disjoint streams from different seeds."""
    root = tmp_path_factory.mktemp("tokens")
    train, held = str(root / "train.npy"), str(root / "heldout.npy")
    np.save(train, markov_ids(30_000, seed=1).astype(np.int32))
    np.save(held, markov_ids(4_000, seed=2))
    return train, held


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("src") / "tiny"), layers=4, dtype=torch.float32, shard=None)


@pytest.fixture(scope="session")
def tiny_tli(tiny_source, tmp_path_factory):
    """The tiny model upscaled with tli --k 2 --init copy --alpha 0.5: 6 layers, injected at 2 and 5."""
    from tli_kernels.upscale import upscale

    dst = str(tmp_path_factory.mktemp("up") / "tli")
    upscale(tiny_source, dst, "tli", options={"k": 2, "init": "copy", "alpha": 0.5})
    assert os.path.isfile(os.path.join(dst, "tli_provenance.json"))
    return dst
