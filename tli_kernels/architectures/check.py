"""Prove a branch rule on a real (tiny, random) instance of the architecture, treating its decoder
layer as a black box.

For one decoder layer L with input x (captured from a forward pass of the whole model, so masks,
position embeddings and caches are the model's own), and the rule applied to copies of L:

  identity   both branches' outputs zeroed: L(x) == x exactly (bit for bit, in float32).
  attention  MLP outputs zeroed, attention scaled by a: L(x) - x == a * (same with a = 1), non-zero.
  MLP        attention outputs zeroed, MLP scaled by a: likewise.
  block      both scaled by a: L(x) equals the composition the block's residual structure implies,
             sequential  x -> x + a*Attn -> (.) + a*MLP, i.e. MLP-only_a(Attn-only_a(x)),
             parallel    x + a*Attn(x) + a*MLP(x),
             and the unmodified L(x) equals the same composition at a = 1.

That is exactly the definition of alpha on the block, so a rule that names the wrong tensor (gate_proj
for down_proj, q_proj for o_proj, a projection in front of a post norm) fails here. Used by the tests to
prove every registry entry and at run time for a generic rule on an unknown model type.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from tli_kernels.architectures.spec import Architecture

ALPHA = 0.375  # exact in every float format; far from 0 and 1


class RuleCheckFailed(ValueError):
    """The rule does not do what it must on this instance; the message says what did not hold."""


@dataclass
class RuleReport:
    architecture: str
    layer: int
    residual: str  # "sequential" or "parallel", as observed
    max_error: float

    def to_json(self) -> dict:
        return {"architecture": self.architecture, "layer": self.layer, "residual": self.residual,
                "max_error": self.max_error}  # fmt: skip


def decoder_layers(model, arch: Architecture):
    """The ModuleList of decoder layers of an in-memory model, found through the rule's prefixes."""
    for prefix in arch.layer_prefixes:
        try:
            return model.get_submodule(prefix)
        except AttributeError:
            continue
    raise RuleCheckFailed(f"the model has no module at {' or '.join(arch.layer_prefixes)}")


def apply_rule(layer, arch: Architecture, *, zero: tuple[str, ...] = (), alpha: dict | None = None) -> None:
    """Edit a decoder layer in place: zero the outputs of the branches in `zero`, scale the others by
    alpha[branch] (through the post norm where the branch has one)."""
    import torch

    alpha = alpha or {}
    with torch.no_grad():
        for name, p in layer.named_parameters():
            branch = arch.branch_of(name)
            target = arch.alpha_target(name)
            if branch is not None and branch in zero:
                p.zero_()
            elif target is not None and target[0] in alpha and target[1] == "scale":
                p.mul_(alpha[target[0]])
            elif target is not None and target[0] in alpha:  # a post norm
                off = arch.norm_offset
                p.copy_((p + off) * alpha[target[0]] - off)


def check_rule(model, arch: Architecture, *, layer: int = 1, seed: int = 0) -> RuleReport:
    """Check the rule on layer `layer` of an in-memory float32 model (see the module docstring).
    Raises RuleCheckFailed naming the property that did not hold."""
    import torch

    model = model.float().eval()
    layers = decoder_layers(model, arch)
    layer = min(layer, len(layers) - 1)
    target = layers[layer]
    _check_names(target, arch)
    captured: dict = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, dict(kwargs)

    handle = target.register_forward_pre_hook(grab, with_kwargs=True)
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    if "args" not in captured:
        raise RuleCheckFailed(f"decoder layer {layer} was not called by the model's forward")
    args, kwargs = captured["args"], captured["kwargs"]
    x = args[0] if args else kwargs["hidden_states"]

    def run(module, h):
        with torch.no_grad():
            if args:
                out = module(h, *args[1:], **kwargs)
            else:
                out = module(**{**kwargs, "hidden_states": h})
        return out[0] if isinstance(out, tuple) else out

    def variant(**edit):
        m = copy.deepcopy(target)
        apply_rule(m, arch, **edit)
        return m

    name = arch.name
    both_zero = run(variant(zero=("attn", "mlp")), x)
    if not torch.equal(both_zero, x):
        diff = (both_zero - x).abs().max().item()
        raise RuleCheckFailed(
            f"{name}: zeroing {arch.describe()} does not make decoder layer {layer} the identity "
            f"(max |out - in| = {diff:.3g})"
        )
    worst = 0.0
    deltas = {}
    for branch, other in (("attn", "mlp"), ("mlp", "attn")):
        one = run(variant(zero=(other,)), x) - x
        scaled = run(variant(zero=(other,), alpha={branch: ALPHA}), x) - x
        size = one.abs().max().item()
        if size == 0.0:
            raise RuleCheckFailed(f"{name}: the {branch} branch of layer {layer} is zero with the other branch zeroed")
        err = (scaled - ALPHA * one).abs().max().item() / size
        if err > 1e-4:
            raise RuleCheckFailed(
                f"{name}: scaling {branch} by {ALPHA} per the rule does not scale that branch of layer {layer} "
                f"(relative error {err:.3g}): the rule names a tensor that is not the branch's last linear map"
            )
        worst = max(worst, err)
        deltas[branch] = one

    alpha = {"attn": ALPHA, "mlp": ALPHA}
    full = run(variant(alpha=alpha), x)
    full_one = run(target, x)
    attn_a = run(variant(zero=("mlp",), alpha=alpha), x)
    sequential = run(variant(zero=("attn",), alpha=alpha), attn_a)
    sequential_one = run(variant(zero=("attn",)), run(variant(zero=("mlp",)), x))
    parallel = attn_a + (run(variant(zero=("attn",), alpha=alpha), x) - x)
    parallel_one = x + deltas["attn"] + deltas["mlp"]
    scale = full_one.abs().max().item() or 1.0
    for kind, a, one in (("sequential", sequential, sequential_one), ("parallel", parallel, parallel_one)):
        err_one = (full_one - one).abs().max().item() / scale
        err_a = (full - a).abs().max().item() / scale
        if err_one <= 1e-5 and err_a <= 1e-5:
            return RuleReport(name, layer, kind, max(worst, err_a))
    raise RuleCheckFailed(
        f"{name}: layer {layer} is neither x + a*Attn then + a*MLP nor x + a*(Attn + MLP) with the rule's "
        f"alpha applied (a = {ALPHA})"
    )


def _check_names(layer, arch: Architecture) -> None:
    names = [n for n, _ in layer.named_parameters()]
    for label, branch in (("attention", arch.attn), ("MLP", arch.mlp)):
        if not any(branch.matches(n) for n in names):
            raise RuleCheckFailed(
                f"{arch.name}: no parameter of the decoder layer matches the {label} rule ({', '.join(branch.outputs)})"
            )
        if branch.post_norm and branch.post_norm not in names:
            raise RuleCheckFailed(f"{arch.name}: the decoder layer has no {branch.post_norm}")
