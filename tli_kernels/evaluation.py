"""Held-out loss and logit comparison: the numbers behind `tli verify` and the quality study."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from tli_kernels.checkpoint.output import check_complete_output

FIXED_PROMPT = "In the beginning God created the heaven and the earth. And the earth was without form, and void;"


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) from a finished model folder, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_complete_output(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json, not a model folder")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")) or os.path.isfile(os.path.join(path, "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


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
def mean_loss(model, batches: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) over all windows, every window weighted equally."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, batches.shape[0], batch_size):
        x = batches[i : i + batch_size].to(device)
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count


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


def heldout_ids(tokenizer, text_file: str | None) -> tuple[torch.Tensor, str]:
    if text_file is not None:
        try:
            with open(text_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise FileNotFoundError(f"--text {text_file}: cannot read ({e.strerror})") from e
        return tokenize(tokenizer, text), text_file
    from tli_kernels.builtin.text import kjv_split

    return tokenize(tokenizer, kjv_split()[1]), "the King James held-out split"


def verify(
    src: str, dst: str, *, text_file: str | None = None, seq_len: int = 256, max_tokens: int = 4096, batch_size: int = 8
) -> VerifyReport:
    """Load both models in float32; compare logits on a fixed prompt and held-out loss on a text."""
    if seq_len < 2 or max_tokens < seq_len:
        raise ValueError(f"--seq-len {seq_len} / --max-tokens {max_tokens}: need 2 <= seq-len <= max-tokens")
    torch.manual_seed(0)
    model_a, tok = load_causal_lm(src)
    model_b, _ = load_causal_lm(dst)
    if model_a.config.vocab_size != model_b.config.vocab_size:
        raise ValueError(f"vocabularies differ ({model_a.config.vocab_size} vs {model_b.config.vocab_size})")
    if tok is not None:
        prompt = tokenize(tok, FIXED_PROMPT)[None]
        ids, text_name = heldout_ids(tok, text_file)
    else:  # no tokenizer (e.g. a synthetic checkpoint): fixed ids and fixed pseudo-text
        if text_file is not None:
            raise ValueError(f"{src} has no tokenizer, so --text cannot be tokenised")
        g = torch.Generator().manual_seed(0)
        vocab = model_a.config.vocab_size
        prompt = torch.randint(0, vocab, (1, 32), generator=g)
        ids, text_name = torch.randint(0, vocab, (max_tokens,), generator=g), "random token ids (no tokenizer)"
    batches = windows(ids, seq_len, max_tokens)
    return VerifyReport(
        src_layers=model_a.config.num_hidden_layers,
        dst_layers=model_b.config.num_hidden_layers,
        src_params=sum(p.numel() for p in model_a.parameters()),
        dst_params=sum(p.numel() for p in model_b.parameters()),
        max_logit_diff=max_logit_difference(model_a, model_b, prompt),
        src_loss=mean_loss(model_a, batches, batch_size),
        dst_loss=mean_loss(model_b, batches, batch_size),
        tokens=batches.numel(),
        text=text_name,
    )
