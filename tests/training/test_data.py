"""The training stream: token files, and a window order that is a pure function of (seed, position)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tli_kernels.training.data import WindowOrder, load_token_ids, training_ids


def test_order_is_seeded_and_covers_every_window_once_per_epoch():
    ids = torch.arange(1000)
    a, b, c = WindowOrder(ids, 10, seed=3), WindowOrder(ids, 10, seed=3), WindowOrder(ids, 10, seed=4)
    epoch = a.samples(0, 100)
    assert torch.equal(epoch, b.samples(0, 100))
    assert not torch.equal(epoch, c.samples(0, 100))
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 1000, 10))  # a permutation of the 100 windows
    assert torch.equal(epoch[:, 1:] - epoch[:, :-1], torch.ones(100, 9, dtype=torch.long))  # contiguous windows
    second = a.samples(100, 100)
    assert sorted(second[:, 0].tolist()) == list(range(0, 1000, 10)) and not torch.equal(second, epoch)
    # random access agrees with sequential reading, across the epoch boundary
    assert torch.equal(WindowOrder(ids, 10, seed=3).samples(95, 10), torch.cat([epoch[95:], second[:5]]))


def test_accumulation_and_ranks_see_the_same_windows_per_step():
    order = WindowOrder(torch.arange(5000), 8, seed=0)
    for step in range(3):
        one_process = torch.cat([order.batch(step, m, micro_batch=2, accum=2) for m in range(2)])
        two_ranks = torch.cat([order.batch(step, 0, micro_batch=2, accum=1, rank=r, world=2) for r in range(2)])
        assert torch.equal(one_process, two_ranks)
        assert torch.equal(one_process, order.samples(step * 4, 4))


def test_token_files(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(10, dtype=np.uint16))
    torch.save(torch.arange(6, dtype=torch.int32).view(2, 3), tmp_path / "b.pt")
    assert load_token_ids(str(tmp_path / "a.npy")).tolist() == list(range(10))
    b = load_token_ids(str(tmp_path / "b.pt"))
    assert b.dtype == torch.long and b.tolist() == list(range(6))

    np.save(tmp_path / "f.npy", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="must be integers"):
        load_token_ids(str(tmp_path / "f.npy"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"\.npy or \.pt"):
        load_token_ids(str(tmp_path / "x.txt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_token_ids(str(tmp_path / "missing.npy"))
    with pytest.raises(ValueError, match="fewer than one window"):
        WindowOrder(torch.arange(5), 8, seed=0)
    with pytest.raises(ValueError, match="no tokenizer"):
        training_ids(None, text_file=str(tmp_path / "x.txt"))
    with pytest.raises(ValueError, match="either --text or --data"):
        training_ids(None, text_file="a", data_file="b")
