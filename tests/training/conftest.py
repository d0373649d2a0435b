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


WORDS = ("in the beginning god created heaven and earth light was good day night water land sea fish bird "
         "tree seed fruit man woman garden river gold stone").split()  # fmt: skip


def documents(n: int, seed: int = 0) -> list[str]:
    """n short made-up documents of varied length (some longer than a window)."""
    g = np.random.default_rng(seed)
    return [" ".join(g.choice(WORDS, size=int(g.integers(3, 60)))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def doc_model(tmp_path_factory):
    """A tiny Llama whose folder has a real (byte-level BPE) tokenizer, trained here on the documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    path = str(tmp_path_factory.mktemp("docmodel") / "m")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(documents(300, seed=5), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=fast.vocab_size + 8,
                                  max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


TLI_COPY = {"k": 2, "init": "copy", "alpha": 0.5}


@pytest.fixture
def train_config(token_files, tiny_source, tmp_path):
    """A TrainConfig factory: the tiny source upscaled on load (TLI K=2, copy, alpha 0.5), trained on the
    token files with small settings (4 steps, no periodic eval) into tmp_path/out; any field overridden."""
    from tli_kernels.training.trainer import TrainConfig

    train_file, held_file = token_files

    def make(**overrides) -> TrainConfig:
        values = dict(
            model=tiny_source, method="tli", method_options=dict(TLI_COPY), output=str(tmp_path / "out"),
            data_file=train_file, eval_data_file=held_file, seq_len=32, micro_batch=2, accum=1, steps=4, lr=3e-3,
            warmup=1, eval_every=0, eval_tokens=128, progress=False, threads=2,
        )  # fmt: skip
        values.update(overrides)
        return TrainConfig(**values)

    return make
