"""Training tokens and a deterministic, resumable order over them.

A token source (a text file, a .npy / .pt array of token ids, or the built-in King James train
split) becomes one long 1-D stream of ids, cut into non-overlapping windows of `seq_len` tokens.
Epoch e visits the windows in the order `randperm(num_windows)` drawn from a generator seeded
with (seed, e), so the sample at any global position is a pure function of (seed, position):
resuming at step s needs only s, and every rank of a distributed run computes the same order
and takes its own slice of each global batch.
"""

from __future__ import annotations

import os

import numpy as np
import torch

TOKEN_SUFFIXES = (".npy", ".pt")


def load_token_ids(path: str) -> torch.Tensor:
    """A 1-D int64 tensor from a .npy file (any integer dtype) or a .pt file holding one tensor."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path}: no such file")
    if path.endswith(".npy"):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"--data {path}: not a plain .npy array ({e})") from e
        ids = torch.from_numpy(np.array(array))  # a copy: torch wants writable memory
    elif path.endswith(".pt"):
        ids = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"--data {path}: holds a {type(ids).__name__}, expected one tensor of token ids")
    else:
        raise ValueError(f"--data {path}: expected a .npy or .pt file of token ids")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"--data {path}: token ids must be integers, got {ids.dtype}")
    return ids.reshape(-1).to(torch.long)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise FileNotFoundError(f"--text {path}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def training_ids(tokenizer, *, text_file: str | None = None, data_file: str | None = None) -> tuple[torch.Tensor, str]:
    """(ids, description) of the training stream: token ids, a text file, or the KJV train split."""
    from tli_kernels.evaluation import tokenize

    if data_file is not None and text_file is not None:
        raise ValueError("give either --text or --data, not both")
    if data_file is not None:
        return load_token_ids(data_file), data_file
    if tokenizer is None:
        raise ValueError("the model folder has no tokenizer: give pre-tokenised ids with --data FILE.npy|.pt")
    if text_file is not None:
        return tokenize(tokenizer, read_text(text_file)), text_file
    from tli_kernels.builtin.text import kjv_split

    return tokenize(tokenizer, kjv_split()[0]), "the King James train split"


def heldout_ids(tokenizer, *, text_file: str | None = None, data_file: str | None = None) -> tuple[torch.Tensor, str]:
    """(ids, description) of the held-out stream; by default the KJV held-out split (never trained on)."""
    if data_file is not None or text_file is not None:
        return training_ids(tokenizer, text_file=text_file, data_file=data_file)
    if tokenizer is None:
        raise ValueError("the model folder has no tokenizer: give held-out ids with --eval-data FILE.npy|.pt")
    from tli_kernels.builtin.text import kjv_split
    from tli_kernels.evaluation import tokenize

    return tokenize(tokenizer, kjv_split()[1]), "the King James held-out split"


class WindowOrder:
    """Non-overlapping windows of a token stream in a seeded order; `batch(...)` names one slice.

    One optimizer step consumes a global batch of `global_batch` windows; micro-step m on rank r
    takes windows [(m * world + r) * micro, + micro) of it, so one process with gradient
    accumulation A and A processes without it see the same windows in each step.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, seed: int):
        if ids.dim() != 1:
            raise ValueError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
        self.num_windows = ids.numel() // seq_len
        if self.num_windows == 0:
            raise ValueError(f"the training data has {ids.numel()} tokens, fewer than one window of {seq_len}")
        self.windows = ids[: self.num_windows * seq_len].view(self.num_windows, seq_len)
        self.seq_len = seq_len
        self.seed = seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_windows, generator=g)
        return self._perm

    def samples(self, start: int, count: int) -> torch.Tensor:
        """Windows at global positions [start, start + count): [count, seq_len]."""
        rows = []
        for pos in range(start, start + count):
            epoch, i = divmod(pos, self.num_windows)
            rows.append(self._permutation(epoch)[i])
        return self.windows[torch.stack(rows)]

    def batch(self, step: int, micro_step: int, *, micro_batch: int, accum: int, rank: int = 0, world: int = 1):
        global_batch = micro_batch * accum * world
        start = step * global_batch + (micro_step * world + rank) * micro_batch
        return self.samples(start, micro_batch)
