"""On a GPU: bf16 autocast training, with and without the tli kernels (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from tli_kernels.training.trainer import TrainConfig, train

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_training_with_and_without_kernels(token_files, tiny_tli, tmp_path):
    train_file, held_file = token_files
    common = dict(model=tiny_tli, data_file=train_file, eval_data_file=held_file, seq_len=64, micro_batch=4, steps=20,
                  lr=3e-3, warmup=2, eval_every=10, eval_tokens=1024, learnable_alpha=True, device="cuda",
                  progress=False)  # fmt: skip
    stock = train(TrainConfig(output=str(tmp_path / "stock"), **common))
    assert stock.evals[-1]["heldout_loss"] < stock.evals[0]["heldout_loss"] - 0.1
    pytest.importorskip("tli_kernels.integrations.hf", reason="the tli kernels are not in this checkout")
    fast = train(TrainConfig(output=str(tmp_path / "kernels"), kernels=True, **common))
    # bf16 rounding differs between the fused kernels and stock layers: compare loosely
    assert fast.evals[-1]["heldout_loss"] == pytest.approx(stock.evals[-1]["heldout_loss"], abs=0.05)
