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
    # moe-upcycle target: the sibling MoE model_type this dense family upcycles into.
    moe_sibling: str | None = None
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
    b = arch.attn if branch == "attn" else arch.mlp
    if b.post_norm:
        return b.post_norm.rsplit(".", 1)[0]
    return b.outputs[0].split(".", 1)[0]
