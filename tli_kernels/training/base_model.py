"""A small Llama made from scratch on the King James train split: the quality study's base model
where the built-in SmolLM2-135M (a 98 MB package plus `gguf`) cannot go, such as a GPU machine
that only receives a copy of the working tree.

Made in one call and cached by its spec: a byte-level BPE tokenizer trained on the train split
(deterministic: same text, same vocabulary), the train and held-out splits as token-id files
(.npy, so the study's runs read them instead of tokenising 4 MB each time), a randomly initialised
LlamaForCausalLM (GQA, tied embeddings) pretrained with tli's own trainer for a fixed number of
steps, and that model exported as a normal Hugging Face folder (bf16 safetensors, config,
tokenizer) that `tli upscale` and stock transformers load.

    WORKDIR/base-<digest>/tokenizer/          the tokenizer alone
    WORKDIR/base-<digest>/{train,heldout}.npy  the KJV splits as token ids
    WORKDIR/base-<digest>/model/              the pretrained model (the study's source)
    WORKDIR/base-<digest>/base.json           what was made, how long it took (written last)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass

from tli_kernels.training.checkpoints import read_json, write_json

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
FORMAT = 1  # bump when what build_base makes changes: a new digest, a new folder


@dataclass(frozen=True)
class BaseSpec:
    # tokenizer
    vocab_size: int = 8192
    text_chars: int | None = None  # use only the first N characters of the train split (the smoke test)
    # model (LlamaForCausalLM)
    layers: int = 12
    hidden: int = 512
    intermediate: int = 1536
    heads: int = 8
    kv_heads: int = 2
    max_positions: int = 2048
    # pretraining (tli's trainer; AdamW, warm-up + cosine)
    seq_len: int = 512
    micro_batch: int = 32
    steps: int = 240
    lr: float = 1.5e-3
    warmup: int = 24
    min_lr_ratio: float = 0.1
    eval_every: int = 60
    seed: int = 0

    def digest(self) -> str:
        data = {"format": FORMAT, **dataclasses.asdict(self)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        return (f"Llama made here: {self.layers} layers, hidden {self.hidden}, MLP {self.intermediate}, "
                f"{self.heads} heads / {self.kv_heads} KV heads, tied embeddings, byte-level BPE vocabulary "
                f"{self.vocab_size} trained on the King James train split")  # fmt: skip


def base_folder(workdir: str, spec: BaseSpec) -> str:
    return os.path.join(workdir, f"base-{spec.digest()}")


def cached_base(workdir: str, spec: BaseSpec) -> dict | None:
    """The record of a finished base for this spec in workdir, or None."""
    root = base_folder(workdir, spec)
    info = read_json(os.path.join(root, "base.json"))
    if not info or info.get("digest") != spec.digest():
        return None
    needed = [info["model"], info["train_ids"], info["heldout_ids"], os.path.join(info["model"], "config.json")]
    return info if all(os.path.exists(p) for p in needed) else None


def kjv_texts(spec: BaseSpec) -> tuple[str, str]:
    from tli_kernels.builtin.text import kjv_split

    train, heldout = kjv_split()
    if spec.text_chars is not None:
        cut = train.rfind("\n", 0, spec.text_chars)
        train = train[: cut if cut > 0 else spec.text_chars]
    return train, heldout


def train_tokenizer(text: str, vocab_size: int, folder: str):
    """Byte-level BPE (GPT-2 pre-tokenisation, no prefix space) trained on text's lines; one special
    token, EOS (also BOS), id 0. Saved so AutoTokenizer.from_pretrained(folder) loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(text.split("\n"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS)
    fast.model_max_length = 1 << 30  # the splits are tokenised as one stream; no length warning
    fast.save_pretrained(folder)
    return fast


def _llama_config(spec: BaseSpec, vocab: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=eos_id, eos_token_id=eos_id,
    )  # fmt: skip


def build_base(
    workdir: str,
    spec: BaseSpec,
    *,
    eval_tokens: int,
    eval_batch: int,
    device: str = "auto",
    kernels: bool = False,
    threads: int | None = None,
) -> dict:
    """Make (or reuse) the base model for spec under workdir; returns its record (base.json)."""
    cached = cached_base(workdir, spec)
    if cached is not None:
        return cached
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    from tli_kernels.evaluation import quiet_transformers, tokenize
    from tli_kernels.training.trainer import TrainConfig, train

    started = time.perf_counter()
    root = base_folder(workdir, spec)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    paths = {k: os.path.join(root, k) for k in ("tokenizer", "init", "train", "model")}

    t0 = time.perf_counter()
    train_text, heldout_text = kjv_texts(spec)
    tokenizer = train_tokenizer(train_text, spec.vocab_size, paths["tokenizer"])
    seconds_tokenizer = time.perf_counter() - t0
    t0 = time.perf_counter()
    files = {}
    for name, text in (("train", train_text), ("heldout", heldout_text)):
        ids = tokenize(tokenizer, text).numpy()
        files[name] = os.path.join(root, f"{name}.npy")
        np.save(files[name], ids.astype(np.int32))
    seconds_tokenize = time.perf_counter() - t0
    train_tokens = int(np.load(files["train"], mmap_mode="r").shape[0])
    heldout_tokens = int(np.load(files["heldout"], mmap_mode="r").shape[0])

    vocab = -(-len(tokenizer) // 64) * 64  # a multiple of 64 (the tokenizer's own size, rounded up)
    config = _llama_config(spec, vocab, tokenizer.convert_tokens_to_ids(EOS))
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    with quiet_transformers():
        model.save_pretrained(paths["init"])  # fp32: the trainer starts from exactly these weights
    tokenizer.save_pretrained(paths["init"])
    del model

    cfg = TrainConfig(
        model=paths["init"], output=paths["train"], data_file=files["train"], eval_data_file=files["heldout"],
        seq_len=spec.seq_len, micro_batch=spec.micro_batch, steps=spec.steps, lr=spec.lr, warmup=spec.warmup,
        min_lr_ratio=spec.min_lr_ratio, eval_every=spec.eval_every, eval_tokens=eval_tokens, eval_batch=eval_batch,
        seed=spec.seed, kernels=kernels, device=device, threads=threads, save_dtype="bf16",
        progress=sys.stderr.isatty(),
    )  # fmt: skip
    logger.info("pretraining the base model: %.1fM parameters, %d steps of %d tokens (%d train tokens)",
                parameters / 1e6, spec.steps, spec.seq_len * spec.micro_batch, train_tokens)  # fmt: skip
    result = train(cfg)
    # The export (config, safetensors, tokenizer) without the training state: a plain model folder.
    from tli_kernels.training import checkpoints

    os.makedirs(paths["model"])
    skip = {checkpoints.STATE_DIR, checkpoints.STATE_FILE, checkpoints.MANIFEST_FILE, checkpoints.TRAINING_FILE}
    for name in sorted(os.listdir(result.checkpoint)):
        if name not in skip:
            shutil.copy2(os.path.join(result.checkpoint, name), os.path.join(paths["model"], name))
    shutil.rmtree(paths["train"])
    shutil.rmtree(paths["init"])

    steps_seconds = sum(h["seconds"] for h in result.history)
    info = {
        "digest": spec.digest(),
        "spec": dataclasses.asdict(spec),
        "describe": spec.describe(),
        "model": os.path.abspath(paths["model"]),
        "tokenizer": os.path.abspath(paths["tokenizer"]),
        "train_ids": os.path.abspath(files["train"]),
        "heldout_ids": os.path.abspath(files["heldout"]),
        "vocab_size": vocab,
        "train_tokens": train_tokens,
        "heldout_tokens": heldout_tokens,
        "parameters": parameters,
        "tokens_per_step": spec.seq_len * spec.micro_batch,
        "epochs": spec.steps * spec.seq_len * spec.micro_batch / train_tokens,
        "evals": result.evals,
        "final_train_loss": result.history[-1]["loss"],
        "device": device,
        "kernels": kernels,
        "seconds_tokenizer": seconds_tokenizer,
        "seconds_tokenize": seconds_tokenize,
        "seconds_pretrain": result.seconds,
        "seconds_per_step": steps_seconds / max(1, len(result.history)),
        "seconds": time.perf_counter() - started,
    }
    write_json(os.path.join(root, "base.json"), info)
    logger.info("base model ready in %.1f s (pretraining %.1f s, held-out loss %.4f)", info["seconds"],
                result.seconds, result.evals[-1]["heldout_loss"] if result.evals else float("nan"))  # fmt: skip
    return info
