"""Training checkpoints: a Hugging Face model folder (alpha folded) plus what resume needs.

OUTPUT/step-000100/
  config.json, model.safetensors, tokenizer files   stock transformers loads this as is
  tli_provenance.json    the source's provenance, residual_scales = effective alpha after training
  tli_training.json      what was trained on, how, for how long, held-out losses
  training_state.pt      optimizer, scheduler, RNG, data position, alpha multipliers and the
                         unfolded o_proj/down_proj of layers with a learnable alpha (exact resume)
A checkpoint is written to step-N.tmp and renamed when complete; `latest_checkpoint` ignores the rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

STATE_FILE = "training_state.pt"
TRAINING_FILE = "tli_training.json"
PROVENANCE_FILE = "tli_provenance.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(output: str, step: int) -> str:
    return os.path.join(output, f"step-{step:06d}")


def latest_checkpoint(output: str) -> str | None:
    """The complete checkpoint with the most steps under output, or None."""
    if not os.path.isdir(output):
        return None
    best = None
    for name in os.listdir(output):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(output, name, STATE_FILE)):
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), name)
    return os.path.join(output, best[1]) if best else None


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from e


def write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def injected_layers(provenance: dict | None) -> list[int]:
    if not provenance:
        return []
    if provenance.get("injected_layers") is not None:
        return sorted(int(i) for i in provenance["injected_layers"])
    return [int(e["index"]) for e in provenance.get("layers", []) if e.get("role") == "injected"]


def base_scales(provenance: dict | None) -> dict[int, float]:
    """alpha already folded into each injected layer's weights (1.0 where the provenance says nothing)."""
    raw = (provenance or {}).get("residual_scales") or {}
    return {i: float(raw.get(str(i), 1.0)) for i in injected_layers(provenance)}


def write_checkpoint(
    path: str,
    *,
    lm,
    model_state: dict,
    tokenizer,
    provenance: dict | None,
    training: dict,
    state: dict,
) -> None:
    """Write the folder at path (via path.tmp, renamed when complete). model_state is already folded."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    lm.save_pretrained(tmp, state_dict=model_state)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if provenance is not None:
        write_json(os.path.join(tmp, PROVENANCE_FILE), provenance)
    write_json(os.path.join(tmp, TRAINING_FILE), training)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def read_state(path: str) -> dict:
    file = os.path.join(path, STATE_FILE)
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise RuntimeError(f"{file}: cannot read the training state ({e})") from e
