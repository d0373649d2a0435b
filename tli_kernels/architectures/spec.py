"""What tli needs to know about a decoder architecture, as data: `Architecture`.

Surgery only needs three facts about a model family, and they fit in a few lines each:

- where the decoder layers live: the tensor-name prefix of layer i (`model.layers.{i}.`,
  `transformer.h.{i}.`, `gpt_neox.layers.{i}.`) and the config key holding their count;
- its *branch rule*: the tensors whose zeroing makes a residual branch vanish and whose scaling by
  alpha scales that branch (the output projection, its bias; every expert's, in an MoE block), and
  where a norm follows the branch (Gemma2/3's and OLMo2's post norms) the norm that takes alpha
  instead, since a norm after the projection would undo a scaled projection;
- the config entries that hold one value per layer (`layer_types`, `no_rope_layers`, MoE layouts).

alpha is defined on the block, not on weights: h = x + alpha * Attn(...), out = h + alpha * MLP(...)
(parallel blocks: x + alpha * (Attn + MLP)). Every registry entry is proven by the tests on a tiny
random instance; an unknown model type gets a generic rule only after `tli_kernels.architectures.check`
proves it on an instance built from the source config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A pattern is a layer-relative tensor name in which `*` stands for an expert index.
_WILDCARD = "*"

# The norms a decoder block holds, by layout (which of them follow a branch is each entry's post_norm).
NORM_LAYOUTS = {
    "pre-norm": ("input_layernorm", "post_attention_layernorm"),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    "post-norm": ("post_attention_layernorm", "post_feedforward_layernorm"),
}  # fmt: skip
# Tensors outside the layers: token embeddings and output heads (name endings), and the name parts that
# put a tensor before the layers in the output (token and position embeddings).
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight")
EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings")
# Config entries that must agree between the models of a recipe: they fix tensor shapes or what a layer
# computes. A family adds its own (MLA ranks, say) to its entry's `must_match`.
SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "hidden_act",
    "hidden_activation",
    "attention_bias",
    "mlp_bias",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "n_embd",
    "n_head",
    "n_inner",
    "parallel_attn",
    "use_parallel_residual",
    "new_decoder_architecture",
    "query_pre_attn_scalar",
)


def compile_pattern(pattern: str) -> re.Pattern:
    parts = [re.escape(p) for p in pattern.split(_WILDCARD)]
    return re.compile("(?:0|[1-9][0-9]*)".join(parts) + r"\Z", re.ASCII)


@dataclass(frozen=True)
class Branch:
    """One residual branch of a decoder block.

    outputs: patterns of the tensors whose zero makes the branch output zero and whose product with
      alpha scales it by alpha; the first names the tensor as the transformers module holds it (its
      first component is the branch's module, see `branch_module`), the others as files may name it
      (per-expert, legacy names). They cover the weight and bias of the branch's last linear map
      (every expert's and the shared expert's in an MoE block). A pattern that matches nothing in a
      layer is fine (a bias the model was built without), but every layer must match at least one
      pattern of each branch.
    post_norm: the norm applied to the branch output before the residual add, if any. alpha then
      goes into that norm's weight (a scaled projection would be normalised away).
    """

    outputs: tuple[str, ...]
    post_norm: str | None = None

    def matches(self, suffix: str) -> bool:
        return any(p.match(suffix) for p in self._compiled)

    @property
    def _compiled(self) -> tuple[re.Pattern, ...]:
        cached = self.__dict__.get("_patterns")
        if cached is None:
            cached = tuple(compile_pattern(p) for p in self.outputs)
            object.__setattr__(self, "_patterns", cached)
        return cached


@dataclass(frozen=True)
class MoeNames:
    """How an MoE family names its router and experts in a checkpoint (what transformers writes and reads),
    and the config a dense model upcycled into it (`moe-upcycle`) needs.

    router: layer-relative name of the router weight in files; in memory it is always `mlp.gate.weight`.
    expert: layer-relative name of an expert tensor: {e} the expert index, {w} its projection's name.
    names: dense MLP tensor -> the expert's projection name. transformers 5 stacks the per-expert
      matrices into `mlp.experts.gate_up_proj` [E, 2I, hidden] (gate rows first) and
      `mlp.experts.down_proj` [E, hidden, I] on load.
    """

    architecture: str  # the transformers class of the MoE model
    router: str
    expert: str
    names: dict
    config: dict = field(default_factory=dict)
    shared_expert: bool = False
    attention_bias: str = "none"  # "none": q/k/v/o without bias; "qkv": q/k/v biases; "config": attention_bias

    @property
    def experts_module(self) -> str:
        """The layer-relative module holding the per-expert tensors in files (`block_sparse_moe`, `mlp`)."""
        return self.expert.split(".experts.", 1)[0]

    def part_of(self, projection: str) -> str:
        """'gate', 'up' or 'down': which dense projection an expert's projection name stands for."""
        dense = next(d for d, w in self.names.items() if w == projection)
        return dense.split(".")[1].removesuffix("_proj")


@dataclass(frozen=True)
class Architecture:
    """A decoder family, described as data. `name` is the registry key (usually the model_type)."""

    name: str
    model_types: tuple[str, ...]
    attn: Branch
    mlp: Branch
    layer_prefixes: tuple[str, ...] = ("model.layers",)
    count_keys: tuple[str, ...] = ("num_hidden_layers",)
    # RMSNorm weight w means a scale of (w + norm_offset): 1 for Gemma's (1 + w), 0 elsewhere.
    norm_offset: float = 0.0
    # Config entries holding one value per decoder layer, remapped with the layers.
    per_layer_keys: tuple[str, ...] = ()
    # How the config says which layers are MoE, when layers may differ ("mlp_only_layers"); None: all alike.
    moe_layout: str | None = None
    # Config flags under which moving a layer changes what it computes: (key, bad value, why).
    refuse_if: tuple[tuple[str, object, str], ...] = ()
    # moe-upcycle target: the sibling MoE model_type this dense family upcycles into (an entry with `moe`).
    moe_sibling: str | None = None
    # An MoE family's file names for routers and experts (the target of moe-upcycle, the training loader's
    # map from files to transformers' stacked expert parameters).
    moe: MoeNames | None = None
    # Tensors outside the layers (see EMBEDDING_NAMES), and the config entries recipes' models must share.
    embedding_names: tuple[str, ...] = EMBEDDING_NAMES
    head_names: tuple[str, ...] = HEAD_NAMES
    must_match: tuple[str, ...] = SHAPE_KEYS
    # Layer-relative tensor names in files -> the name transformers gives the parameter on load, where they
    # differ by more than the stacking of per-expert tensors (`moe`): e.g. Granite-MoE's fused files.
    file_renames: tuple[tuple[str, str], ...] = ()
    # tli's kernels (integrations.hf) patch these model types: model_type -> what is particular about it.
    kernels: dict = field(default_factory=dict, compare=False)
    parallel: str = "sequential"  # "sequential", "parallel" or "config" (documentation and the checker)
    notes: str = ""
    proven_by: str = "tests/architectures"  # or "instance check" for a generic rule
    extra: dict = field(default_factory=dict, compare=False)

    # ---- tensors ----------------------------------------------------------------------------
    def branch_of(self, suffix: str) -> str | None:
        """'attn' / 'mlp' when `suffix` (layer-relative name) is a branch output, else None."""
        if self.attn.matches(suffix):
            return "attn"
        if self.mlp.matches(suffix):
            return "mlp"
        return None

    def alpha_target(self, suffix: str) -> tuple[str, str] | None:
        """(branch, how) when a branch's alpha goes into tensor `suffix` (layer-relative), else None.

        how = "scale": a branch output, multiplied by alpha; "norm": the post norm that follows the branch,
        whose weight w becomes (w + norm_offset) * alpha - norm_offset (a scaled projection in front of a
        norm would be normalised away, so there the outputs are left alone). The one rule every writer of
        alpha uses: the plan (methods), recipes, the instance check and the in-memory fold."""
        branch = self.branch_of(suffix)
        if branch is not None:
            return None if self.branch(branch).post_norm else (branch, "scale")
        for name, b in (("attn", self.attn), ("mlp", self.mlp)):
            if b.post_norm == suffix:
                return (name, "norm")
        return None

    def alpha_targets(self, suffixes) -> dict[str, tuple[str, str]]:
        """{suffix: (branch, how)} for the tensors among `suffixes` that take alpha (see alpha_target)."""
        out = {}
        for s in suffixes:
            target = self.alpha_target(s)
            if target is not None:
                out[s] = target
        return out

    def branch(self, name: str) -> Branch:
        return self.attn if name == "attn" else self.mlp

    def is_embedding(self, name: str) -> bool:
        """Whether a tensor outside the layers goes before them in the output (token/position embeddings)."""
        return any(h in name for h in EMBEDDING_HINTS)

    def post_norms(self) -> dict[str, str]:
        """layer-relative norm weight name -> branch, for branches followed by a norm."""
        return {b.post_norm: n for n, b in (("attn", self.attn), ("mlp", self.mlp)) if b.post_norm}

    @property
    def norm_identity(self) -> float:
        """The stored norm weight that means 'scale by 1'."""
        return 1.0 - self.norm_offset

    def describe(self) -> str:
        def side(b: Branch) -> str:
            text = " | ".join(b.outputs)
            return f"{text} (post norm {b.post_norm})" if b.post_norm else text

        return f"attention: {side(self.attn)}; MLP: {side(self.mlp)}"


_LAYER_RE_CACHE: dict[str, re.Pattern] = {}


def layer_name_regex(prefix: str) -> re.Pattern:
    """`{prefix}.{i}.{suffix}` with i canonical ASCII digits (no sign, no leading zero)."""
    rx = _LAYER_RE_CACHE.get(prefix)
    if rx is None:
        rx = re.compile(re.escape(prefix) + r"\.(0|[1-9][0-9]*)\.(.+)\Z", re.ASCII | re.DOTALL)
        _LAYER_RE_CACHE[prefix] = rx
    return rx


def loose_layer_regex(prefix: str) -> re.Pattern:
    """Anything that a reader might take for a layer of `prefix`: any digits (Unicode too), zeros."""
    return re.compile(re.escape(prefix) + r"\.(\w*\d\w*)\.(.+)\Z", re.DOTALL)


def branch_module(arch: Architecture, branch: str) -> str:
    """Path (within a decoder layer) of the module whose output is the branch as it joins the residual:
    the post norm where there is one, else the block the output tensors live in (self_attn, mlp, ...).
    Scaling that module's output by alpha is alpha's definition; the tests check it against the rule."""
    b = arch.branch(branch)
    if b.post_norm:
        return b.post_norm.rsplit(".", 1)[0]
    return b.outputs[0].split(".", 1)[0]
