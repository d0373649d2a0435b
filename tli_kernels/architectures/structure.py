"""A checkpoint's decoder layers, found through its architecture: `DecoderStructure`.

Reads only names, dtypes and shapes. Layer indices are parsed strictly (ASCII digits, no sign, no
leading zero), so an alias such as `model.layers.01.*` or a non-ASCII digit beside `model.layers.1.*`
is an error rather than a silent replacement, and the layer count in config.json must match the
layers the weights hold (nothing is allocated per configured layer before that check).
"""

from __future__ import annotations

from dataclasses import dataclass

from tli_kernels.architectures.registry import BY_MODEL_TYPE
from tli_kernels.architectures.spec import Architecture, layer_name_regex, loose_layer_regex
from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.quant import plain_keys, same_storage


def architecture_names(config: dict) -> str:
    """config['architectures'] for a message, whatever type it has."""
    value = config.get("architectures")
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def check_not_quantized(config: dict, config_path: str) -> None:
    """Refuse a quantisation scheme tli cannot grow (FP8 ones are grown as such: checkpoint/quant.py)."""
    from tli_kernels.checkpoint.quant import parse_scheme

    parse_scheme(config, config_path)


def resolve_architecture(config: dict, tensor_names, config_path: str) -> Architecture:
    """The registry entry for config's model_type, or a generic rule proven on a tiny instance."""
    check_not_quantized(config, config_path)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(
            f"config.json has no model_type (got {model_type!r}): cannot tell the architecture", config_path
        )
    arch = BY_MODEL_TYPE.get(model_type)
    if arch is not None:
        return arch
    from tli_kernels.architectures.generic import generic_architecture

    return generic_architecture(config, list(tensor_names), config_path)


@dataclass
class DecoderStructure:
    architecture: Architecture
    prefix: str
    count_key: str
    layers: list[dict]  # per layer: suffix -> TensorEntry
    layer_names: frozenset[str]

    @classmethod
    def find(cls, layout) -> DecoderStructure:
        config, config_path = layout.config, layout.config_path
        arch = resolve_architecture(config, layout.tensors, config_path)
        return cls.from_tensors(arch, config, layout.tensors, config_path)

    @classmethod
    def from_tensors(cls, arch: Architecture, config: dict, tensors: dict, config_path: str) -> DecoderStructure:
        prefix = _pick_prefix(arch, tensors, config_path)
        strict, loose = layer_name_regex(prefix), loose_layer_regex(prefix)
        by_index: dict[int, dict] = {}
        names = set()
        count_key, n = _layer_count(arch, config, config_path)
        trailing = range(n, n + trailing_layers(config))  # DeepSeek's multi-token-prediction layers
        for name, t in tensors.items():
            m = strict.match(name)
            if m and int(m.group(1)) in trailing:
                continue  # not a decoder layer: carried outside the stack, renumbered after it
            if m:
                by_index.setdefault(int(m.group(1)), {})[m.group(2)] = t
                names.add(name)
            elif loose.match(name):
                index = loose.match(name).group(1)
                raise CheckpointError(
                    f"layer index {index!r} is not a plain decimal number (ASCII digits, no leading zero): "
                    f"it could alias another layer's tensor",
                    getattr(t, "file", None),
                    name,
                )
        present = sorted(by_index)
        if not present:
            raise CheckpointError(f"no decoder layer tensors ({prefix}.<i>.*) in the weights", config_path)
        if len(present) != n or present[-1] != n - 1:  # present is sorted and unique: 0..n-1 exactly
            extra = [i for i in present if i >= n]  # (multi-token-prediction layers were set aside above)
            if extra:
                what = f"layers {_ranges(extra)} lie beyond it"
            else:
                gaps = [i for i in range(present[-1]) if i not in by_index]
                what = f"layers {_ranges(gaps)} are missing" if gaps else f"layers {present[-1] + 1}.. are missing"
            raise CheckpointError(
                f"{count_key} is {n} but the weights hold layers {_ranges(present)} ({what})", config_path
            )
        return cls(arch, prefix, count_key, [by_index[i] for i in range(n)], frozenset(names))

    # ---- validation ---------------------------------------------------------------------------
    def check(self, layout) -> None:
        """Every layer has both branches' outputs (and declared post norms); tensors agree across layers."""
        arch, config_path = self.architecture, layout.config_path
        for key, bad, why in arch.refuse_if:
            if layout.config.get(key) == bad:
                raise CheckpointError(f"{arch.name} with {key}={bad!r} is not supported: {why}", config_path)
        for i, layer in enumerate(self.layers):
            for branch_name, branch in (("attention", arch.attn), ("MLP", arch.mlp)):
                if not any(branch.matches(s) for s in layer):
                    raise CheckpointError(
                        f"decoder layer {i} has no {branch_name} output tensor ({', '.join(branch.outputs)}) "
                        f"where the {arch.name} architecture puts it",
                        layout.path,
                        f"{self.prefix}.{i}.",
                    )
                if branch.post_norm and branch.post_norm not in layer:
                    where = f"{self.prefix}.{i}.{branch.post_norm}"
                    raise CheckpointError(f"decoder layer {i} lacks its {branch_name} post norm", layout.path, where)
        outside = [t for n, t in layout.tensors.items() if n not in self.layer_names]
        check_embeddings(arch, layout.config, outside, config_path)
        first = self.layers[0]
        seen: dict[str, tuple] = {}
        for i, layer in enumerate(self.layers):
            if arch.moe_layout is None and plain_keys(layer) != plain_keys(first):
                diff = sorted(plain_keys(first) ^ plain_keys(layer))
                raise CheckpointError(
                    f"layer {i} has different tensors than layer 0 (e.g. {diff[0]!r}); "
                    f"{arch.name} layers must all be alike",
                    layout.path,
                    f"{self.prefix}.{i}.{diff[0]}",
                )
            for suffix, t in layer.items():
                ref = seen.setdefault(suffix, (i, t.dtype, tuple(t.shape)))
                if tuple(t.shape) != ref[2] or not same_storage(t.dtype, ref[1]):
                    raise CheckpointError(
                        f"{t.dtype}{list(t.shape)} differs from layer {ref[0]}'s {ref[1]}{list(ref[2])}",
                        t.file,
                        t.name,
                    )

    def is_moe_layer(self, i: int) -> bool:
        return any(".experts." in s or s.endswith("experts.down_proj") for s in self.layers[i])


HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


def check_embeddings(arch: Architecture, config: dict, outside: list, config_path: str) -> None:
    """config.json must describe the embedding the weights hold (vocab_size x hidden size), and an
    untied model must carry its output head: otherwise transformers could not load the output, or
    would fill the head at random."""
    embeds = [t for t in outside if t.name.endswith(arch.embedding_names) and len(t.shape) == 2]
    if len(embeds) != 1:
        return  # an architecture tli cannot read this way: the instance check and loading decide
    embed = embeds[0]
    vocab = config.get("vocab_size")
    hidden = next((config[k] for k in HIDDEN_KEYS if k in config), None)
    for key, value, dim in (("vocab_size", vocab, 0), ("hidden size", hidden, 1)):
        if isinstance(value, int) and not isinstance(value, bool) and value != embed.shape[dim]:
            raise CheckpointError(
                f"{key} in config.json is {value} but the embedding {embed.name} is {list(embed.shape)}",
                config_path,
            )
    tied = config.get("tie_word_embeddings", True)
    if tied is False and not any(t.name.endswith(arch.head_names) for t in outside):
        raise CheckpointError(
            "tie_word_embeddings is false but the weights hold no output head (lm_head.weight): transformers "
            "would start it at random",
            config_path,
        )


def trailing_layers(config: dict) -> int:
    """Layers stored after the decoder stack under the same prefix: DeepSeek-V3 keeps its
    multi-token-prediction module at index num_hidden_layers (`num_nextn_predict_layers` of them)."""
    k = config.get("num_nextn_predict_layers", 0)
    return k if isinstance(k, int) and not isinstance(k, bool) and 0 < k < 64 else 0


def renumber_trailing(name: str, prefix: str, n_src: int, n_out: int, count: int) -> str:
    """`{prefix}.{n_src + k}.rest` -> `{prefix}.{n_out + k}.rest` for a trailing layer k < count."""
    head = prefix + "."
    if count and name.startswith(head):
        index, dot, rest = name[len(head) :].partition(".")
        if dot and index.isascii() and index.isdigit() and n_src <= int(index) < n_src + count:
            return f"{head}{int(index) - n_src + n_out}.{rest}"
    return name


def _pick_prefix(arch: Architecture, tensors: dict, config_path: str) -> str:
    for prefix in arch.layer_prefixes:
        rx = loose_layer_regex(prefix)
        if any(rx.match(n) for n in tensors):
            return prefix
    raise CheckpointError(
        f"no tensor named {' or '.join(p + '.<i>.*' for p in arch.layer_prefixes)}: the weights do not "
        f"look like a {arch.name} checkpoint",
        config_path,
    )


def _layer_count(arch: Architecture, config: dict, config_path: str) -> tuple[str, int]:
    for key in arch.count_keys:
        if key in config:
            n = config[key]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise CheckpointError(f"{key} is {n!r}, not a positive integer", config_path)
            return key, n
    raise CheckpointError(
        f"config.json has none of {', '.join(arch.count_keys)} (the layer count of {arch.name})", config_path
    )


def _ranges(indices: list[int]) -> str:
    if not indices:
        return "none"
    out, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if i is not None:
            start = prev = i
    text = ", ".join(out[:4])
    return text + (", ..." if len(out) > 4 else "")
