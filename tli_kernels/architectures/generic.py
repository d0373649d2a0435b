"""A rule for a model type the registry does not know: guessed from tensor names, then proven.

The guess: the decoder layers are the `<prefix>.<i>.` group of tensor names whose indices run 0..N-1
with N a layer count in config.json; the branch outputs are the layer tensors named like the last
linear map of an attention block (o_proj, out_proj, dense, c_proj, wo under self_attn/attn/attention/
self_attention) and of an MLP (down_proj, c_proj, dense_4h_to_h, fc2, w2, fc_out, wo under mlp/
feed_forward/ffn, every expert's too); norms named post_* are tried as post-branch norms, with and
without Gemma's (1 + w) offset.

No guess is used before `check.check_rule` has proven it on a tiny random instance of the same
model_type, built by transformers from the source config with shrunk sizes. The verdict is cached per
model type, transformers version and layer signature (in $TLI_CACHE_DIR, default ~/.cache/tli), so
only the first conversion of a new architecture pays for the check (a few seconds on a CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

from tli_kernels.architectures.spec import Architecture, Branch
from tli_kernels.checkpoint.errors import CheckpointError

COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
ATTN_PARENTS = ("self_attn", "attn", "attention", "self_attention")
ATTN_OUTPUTS = ("o_proj", "out_proj", "dense", "c_proj", "wo")
MLP_PARENTS = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
MLP_OUTPUTS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out", "wo", "output_linear")
MLP_TOP_LEVEL = ("fc2",)  # OPT-style blocks keep the MLP's linear maps directly on the layer
_LAYERED = re.compile(r"^(.+?)\.(0|[1-9][0-9]*)\.(.+)$", re.ASCII)
_EXPERT = re.compile(r"\.experts\.(0|[1-9][0-9]*)\.", re.ASCII)
CHECK_VERSION = 1  # bump when check.py changes what it proves


def _cache_path() -> str:
    root = os.environ.get("TLI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tli"
    )
    return os.path.join(root, "architecture-checks.json")


def _layer_prefix(tensor_names: list[str]) -> tuple[str, dict[int, set[str]]] | None:
    groups: dict[str, dict[int, set[str]]] = {}
    for name in tensor_names:
        m = _LAYERED.match(name)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), set()).add(m.group(3))
    if not groups:
        return None
    prefix = max(groups, key=lambda p: (len(groups[p]), -len(p)))
    return prefix, groups[prefix]


def _generalise(suffix: str) -> str:
    return _EXPERT.sub(".experts.*.", suffix)


def candidates(suffixes: set[str]) -> list[Architecture]:
    """Rules worth trying for a layer with these tensor names, most plausible first."""
    general = sorted({_generalise(s) for s in suffixes})

    def outputs(parents, names, top_level=()):
        found = []
        for s in general:
            parts = s.split(".")
            if parts[-1] not in ("weight", "bias"):
                continue
            if len(parts) >= 3 and parts[-2] in names and parts[0] in parents:
                found.append(s)
                if parts[-3] == "*" and parts[-4] == "experts":  # transformers' fused in-memory experts
                    found.append(".".join(parts[:-3] + [parts[-2]]))
            elif len(parts) == 2 and parts[0] in top_level:
                found.append(s)
        return tuple(dict.fromkeys(found))

    attn, mlp = outputs(ATTN_PARENTS, ATTN_OUTPUTS), outputs(MLP_PARENTS, MLP_OUTPUTS, MLP_TOP_LEVEL)
    if not attn or not mlp:
        return []
    post = sorted(s for s in general if s.startswith("post_") and "norm" in s and s.endswith(".weight"))
    options = [(None, None, 0.0)]
    if len(post) == 2:
        a_post = next((p for p in post if "attn" in p or "attention" in p), None)
        m_post = next((p for p in post if p != a_post), None)
        if a_post and m_post:
            options += [(a_post, m_post, 0.0), (a_post, m_post, 1.0)]
    options.append((None, None, 1.0))
    out = []
    for a_post, m_post, offset in options:
        out.append(
            Architecture(
                name="generic",
                model_types=(),
                attn=Branch(attn, post_norm=a_post),
                mlp=Branch(mlp, post_norm=m_post),
                norm_offset=offset,
                proven_by="instance check",
            )
        )
    return out


def tiny_config(config: dict, count_key: str, layers: int = 2) -> dict:
    """The source config with its sizes shrunk for a CPU instance (same structure, same flags)."""
    small = {k: v for k, v in config.items() if k not in ("transformers_version", "architectures")}
    heads = config.get("num_attention_heads", config.get("n_head"))
    kv = config.get("num_key_value_heads")
    head_dim = 16
    n_heads = 4
    if isinstance(kv, int) and isinstance(heads, int) and heads:
        n_kv = max(1, n_heads * kv // heads) if kv < heads else n_heads
    else:
        n_kv = None
    for key in ("hidden_size", "n_embd", "d_model"):
        if key in small:
            small[key] = n_heads * head_dim
    for key in ("num_attention_heads", "n_head"):
        if key in small:
            small[key] = n_heads
    if n_kv is not None:
        small["num_key_value_heads"] = n_kv
    if "head_dim" in small:
        small["head_dim"] = head_dim
    for key in ("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if isinstance(small.get(key), int):
            small[key] = 96
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(small.get(key), int):
            small[key] = min(small[key], 4)
    if isinstance(small.get("num_experts_per_tok"), int):
        small["num_experts_per_tok"] = min(small["num_experts_per_tok"], 2)
    small["vocab_size"] = 128
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(small.get(key), int) and small[key] >= 128:
            small[key] = None
    small[count_key] = layers
    for key, value in config.items():
        if isinstance(value, list) and len(value) == config.get(count_key):
            small[key] = value[:layers]
    small.pop("quantization_config", None)
    return small


def generic_architecture(config: dict, tensor_names: list[str], config_path: str) -> Architecture:
    model_type = config["model_type"]
    found = _layer_prefix(tensor_names)
    count_key = next((k for k in COUNT_KEYS if isinstance(config.get(k), int)), None)
    where = f"unsupported architecture model_type={model_type!r}"
    if found is None or count_key is None:
        raise CheckpointError(f"{where}: no numbered decoder layers or no layer count in config.json", config_path)
    prefix, by_index = found
    suffixes = by_index[min(by_index)]
    options = candidates(suffixes)
    if not options:
        raise CheckpointError(
            f"{where}: tli has no entry for it and cannot tell which tensors end the attention and MLP branches",
            config_path,
        )
    import transformers

    signature = hashlib.sha256(
        json.dumps([sorted(_generalise(s) for s in suffixes), prefix, count_key, CHECK_VERSION]).encode()
    ).hexdigest()[:16]
    key = f"{model_type}|{transformers.__version__}|{signature}"
    cache = _read_cache()
    verdict = cache.get(key)
    if verdict is None:
        verdict = _prove(config, count_key, prefix, suffixes, options)
        cache[key] = verdict
        _write_cache(cache)
    if "error" in verdict:
        raise CheckpointError(f"{where}: {verdict['error']}", config_path)
    chosen = options[verdict["option"]]
    return Architecture(
        name=f"{model_type} (generic rule)",
        model_types=(model_type,),
        attn=chosen.attn,
        mlp=chosen.mlp,
        layer_prefixes=(prefix,),
        count_keys=(count_key,),
        norm_offset=chosen.norm_offset,
        parallel=verdict.get("residual", "sequential"),
        proven_by="instance check",
    )


def _prove(config: dict, count_key: str, prefix: str, suffixes: set[str], options: list[Architecture]) -> dict:
    from tli_kernels.architectures.check import RuleCheckFailed, check_rule

    try:
        model = _tiny_instance(config, count_key)
    except Exception as e:  # noqa: BLE001 - any failure to build means the rule cannot be proven
        return {"error": f"could not build a tiny instance to prove a rule ({type(e).__name__}: {e})"[:400]}
    names = _saved_layer_names(model, prefix)
    if {_generalise(s) for s in names} != {_generalise(s) for s in suffixes}:
        odd = sorted({_generalise(s) for s in names} ^ {_generalise(s) for s in suffixes})
        return {"error": f"a transformers instance of it names its layer tensors differently (e.g. {odd[0]!r})"}
    failures = []
    for i, option in enumerate(options):
        option = dataclasses.replace(option, layer_prefixes=(prefix,))
        try:
            report = check_rule(model, option)
        except RuleCheckFailed as e:
            failures.append(str(e))
            continue
        except Exception as e:  # noqa: BLE001 - the instance did not run with the rule applied
            failures.append(f"the tiny instance failed to run ({type(e).__name__}: {e})"[:300])
            continue
        return {"option": i, "residual": report.residual}
    return {"error": "no branch rule held on a tiny random instance: " + failures[0]}


def _saved_layer_names(model, prefix: str) -> set[str]:
    """Layer 0's tensor names as transformers writes them (its on-disk names may differ from the
    module's, e.g. per-expert tensors for fused expert modules)."""
    import tempfile

    from safetensors import safe_open

    with tempfile.TemporaryDirectory(prefix="tli-arch-") as tmp:
        model.save_pretrained(tmp)
        names = set()
        for f in os.listdir(tmp):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(tmp, f), "pt") as h:
                    names.update(h.keys())
    head = f"{prefix}.0."
    return {n[len(head) :] for n in names if n.startswith(head)}


def _tiny_instance(config: dict, count_key: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    small = tiny_config(config, count_key)
    cfg = AutoConfig.for_model(**small)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # a random model with non-trivial norms and biases
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5) if "bias" in name else p.add_(torch.empty_like(p).uniform_(0.5, 1.0))
    return model


def _read_cache() -> dict:
    try:
        with open(_cache_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs the check again next time
