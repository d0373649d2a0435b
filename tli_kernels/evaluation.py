"""Held-out loss and logit comparison: the numbers behind `tli verify` and the quality study."""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass

import torch

from tli_kernels.checkpoint.output import check_complete_output

FIXED_PROMPT = "In the beginning God created the heaven and the earth. And the earth was without form, and void;"


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars or load reports from transformers (its report of missing keys is ours to
    make, as one line); the previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, quiet: bool = True):
    """(model, tokenizer or None) from a finished model folder, in eval mode.

    The folder is first read as tli reads any checkpoint (CheckpointLayout.open: regular files,
    headers, sizes, index, no unfinished-output marker), so a truncated or lying file is one clear
    error instead of a traceback from deep inside the loader; then the weights must cover exactly
    what config.json describes: transformers would otherwise initialise missing layers randomly
    (a config naming 99 layers over weights for 93) or drop extra tensors, and the numbers
    reported would be of some other model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tli_kernels.checkpoint.layout import CheckpointLayout

    check_complete_output(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json, not a model folder")
    CheckpointLayout.open(path)
    with quiet_transformers() if quiet else contextlib.nullcontext():
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    for key, what in (
        ("missing_keys", "config.json describes tensors that the weights do not hold (transformers would "
         "initialise them randomly)"),
        ("unexpected_keys", "the weights hold tensors that config.json does not describe"),
        ("mismatched_keys", "tensors have other shapes than config.json describes"),
    ):  # fmt: skip
        names = sorted(n for n in map(_key_name, info.get(key) or ()) if not _LEGACY_BUFFER.search(n))
        if names:
            raise ValueError(f"{path}: {what}: {len(names)} tensor(s), e.g. {', '.join(names[:3])}")
    model.eval()
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")) or os.path.isfile(os.path.join(path, "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


# Buffers old checkpoints saved that current transformers recomputes (not weights of the model).
_LEGACY_BUFFER = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


def _key_name(key) -> str:
    return key[0] if isinstance(key, tuple) else str(key)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D tensor of token ids (no special tokens between paragraphs)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [num, seq_len] from the start of ids (at most max_tokens tokens)."""
    n = ids.numel() // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.inference_mode()
def mean_loss(model, batches: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats/token) over all windows, every window weighted equally."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, batches.shape[0], batch_size)
    for i in tqdm(starts, desc="held-out", unit="batch", disable=not progress, leave=False):
        x = batches[i : i + batch_size].to(device)
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count


@torch.inference_mode()
def prompt_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


@torch.inference_mode()
def max_logit_difference(model_a, model_b, input_ids: torch.Tensor) -> float:
    a = model_a(input_ids=input_ids).logits.float()
    b = model_b(input_ids=input_ids).logits.float()
    if a.shape != b.shape:
        raise ValueError(f"the models' logits differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).abs().max().item()


@dataclass
class VerifyReport:
    src_layers: int
    dst_layers: int
    src_params: int
    dst_params: int
    max_logit_diff: float
    src_loss: float
    dst_loss: float
    tokens: int
    text: str

    def lines(self) -> list[str]:
        return [
            f"layers          {self.src_layers} -> {self.dst_layers}",
            f"parameters      {self.src_params / 1e6:.1f}M -> {self.dst_params / 1e6:.1f}M",
            f"max |logit diff| on the fixed prompt: {self.max_logit_diff:.3e}",
            f"held-out loss on {self.text} ({self.tokens} tokens): source {self.src_loss:.4f}  "
            f"upscaled {self.dst_loss:.4f}  (ppl {math.exp(self.src_loss):.2f} -> {math.exp(self.dst_loss):.2f})",
        ]


def heldout_ids(tokenizer, text_file: str | None, text: str | None = None) -> tuple[torch.Tensor, str]:
    if text_file is not None:
        return tokenize(tokenizer, read_text(text_file) if text is None else text), text_file
    from tli_kernels.builtin.text import kjv_split

    return tokenize(tokenizer, kjv_split()[1]), "the King James held-out split"


def read_text(path: str) -> str:
    """A UTF-8 text file for --text: a regular file, or a pipe (`--text <(zcat file.gz)`); a
    device or directory is refused before it is read; bad UTF-8 is named with its byte offset."""
    import stat

    from tli_kernels.checkpoint.validate import decode_utf8

    try:
        st = os.stat(path)
    except OSError as e:
        raise FileNotFoundError(f"--text {path}: cannot read ({e.strerror})") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise ValueError(f"--text {path}: not a regular file or a pipe")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise FileNotFoundError(f"--text {path}: cannot read ({e.strerror})") from None
    return decode_utf8(raw, path, "--text file")


def verify(
    src: str,
    dst: str,
    *,
    text_file: str | None = None,
    seq_len: int = 256,
    max_tokens: int = 4096,
    batch_size: int = 8,
    progress: bool = False,
) -> VerifyReport:
    """Load each model in float32 in turn; compare logits on a fixed prompt and held-out loss on a text.

    One model is in memory at a time (SRC is scored, its prompt logits kept, and freed before DST
    loads), so the peak is the larger model, not the sum. progress: say on stderr what is being
    loaded and scored (a bar over the held-out windows).
    """
    import gc
    import sys

    if seq_len < 2 or max_tokens < seq_len:
        raise ValueError(f"--seq-len {seq_len} / --max-tokens {max_tokens}: need 2 <= seq-len <= max-tokens")
    text = read_text(text_file) if text_file is not None else None  # a bad --text fails before any load

    def say(line: str) -> None:
        if progress:
            print(f"verify: {line}", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    say(f"loading {src} (source, float32)")
    model, tok = load_causal_lm(src)
    vocab = model.config.vocab_size
    if tok is not None:
        prompt = tokenize(tok, FIXED_PROMPT)[None]
        ids, text_name = heldout_ids(tok, text_file, text)
    else:  # no tokenizer (e.g. a synthetic checkpoint): fixed ids and fixed pseudo-text
        if text_file is not None:
            raise ValueError(f"{src} has no tokenizer, so --text cannot be tokenised")
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (1, 32), generator=g)
        ids, text_name = torch.randint(0, vocab, (max_tokens,), generator=g), "random token ids (no tokenizer)"
    batches = windows(ids, seq_len, max_tokens)
    src_layers, src_params = model.config.num_hidden_layers, sum(p.numel() for p in model.parameters())
    src_logits = prompt_logits(model, prompt)
    say(f"scoring {src} on {batches.numel()} held-out tokens")
    src_loss = mean_loss(model, batches, batch_size, progress=progress)
    del model
    gc.collect()  # the source's weights go before the upscaled model's arrive

    say(f"loading {dst} (upscaled, float32)")
    model, _ = load_causal_lm(dst)
    if model.config.vocab_size != vocab:
        raise ValueError(
            f"{dst}: vocab_size {model.config.vocab_size} differs from {src}'s {vocab}; "
            "verify compares two models of one tokenizer"
        )
    dst_logits = prompt_logits(model, prompt)
    if dst_logits.shape != src_logits.shape:
        raise ValueError(f"the models' logits differ in shape: {tuple(src_logits.shape)} vs {tuple(dst_logits.shape)}")
    say(f"scoring {dst} on {batches.numel()} held-out tokens")
    dst_loss = mean_loss(model, batches, batch_size, progress=progress)
    return VerifyReport(
        src_layers=src_layers,
        dst_layers=model.config.num_hidden_layers,
        src_params=src_params,
        dst_params=sum(p.numel() for p in model.parameters()),
        max_logit_diff=(src_logits - dst_logits).abs().max().item(),
        src_loss=src_loss,
        dst_loss=dst_loss,
        tokens=batches.numel(),
        text=text_name,
    )
