"""The model card every output gets: README.md with the YAML front matter the Hub reads.

Front matter: `base_model` (the Hub ids of the sources, where known: only ids are valid there),
`tags`, `library_name: transformers`. Body: how the model was made (the recipe, or the `tli upscale`
command and, when passthrough can express it, the equivalent mergekit recipe), the layer map, and
the alpha of every injected layer (folded into the weights; tli_provenance.json has it as data).
"""

from __future__ import annotations

import os
import shlex

from tli_kernels.checkpoint.plan import SurgeryPlan

CARD_NAME = "README.md"
_FLAGS = {"k": "--k", "init": "--init", "alpha": "--alpha", "m": "--m", "times": "--times", "layers": "--layers"}
_FLAGS.update({"experts": "--experts", "top_k": "--top-k"})
_METHOD_TEXT = {
    "tli": "Transformer Layer Injection (a new layer after every K layers)",
    "block-expansion": "LLaMA Pro block expansion (identity blocks after every K layers)",
    "dus": "SOLAR depth up-scaling",
    "stack": "stacking the decoder stack",
    "passthrough": "a passthrough layer list",
    "moe-upcycle": "sparse upcycling to a mixture of experts",
    "recipe": "a mergekit passthrough recipe",
}


def _sources(plan: SurgeryPlan) -> list[dict]:
    """One record per source model: name (Hub id or folder) and Hub id when known."""
    from tli_kernels.checkpoint.hub import hub_id_of_folder

    subs = plan.source.get("sources") or [plan.source]
    out = []
    for s in subs:
        origin = s.get("origin") or {}
        hub = origin.get("hub_id") or hub_id_of_folder(s.get("path", ""))
        out.append({"name": s.get("model") or hub or s.get("path", "?"), "hub_id": hub, "path": s.get("path")})
    return out


def command_line(plan: SurgeryPlan, src: str, dst: str) -> str:
    """The `tli upscale` command that makes this plan (flag form)."""
    words = ["tli", "upscale", src, dst, "--method", plan.method]
    for key, flag in _FLAGS.items():
        if key in plan.options:
            words += [
                flag,
                f"{plan.options[key]:g}" if isinstance(plan.options[key], float) else str(plan.options[key]),
            ]
    if plan.options.get("dtype", "keep") != "keep":
        words += ["--dtype", plan.options["dtype"]]
    if plan.options.get("seed", 0) and any(e.get("init") == "random" for e in plan.layers):
        words += ["--seed", str(plan.options["seed"])]
    return " ".join(shlex.quote(w) for w in words)


def model_card(plan: SurgeryPlan, layout, version: str) -> str:
    """The card's text. It does not name the output folder, so the same plan gives the same files wherever
    they are written (and an interrupted run resumed elsewhere, or a copy, compares equal)."""
    import yaml

    from tli_kernels.methods.recipe import plan_to_recipe, recipe_yaml

    sources = _sources(plan)
    hub_ids = list(dict.fromkeys(s["hub_id"] for s in sources if s["hub_id"]))
    extra = ["merge", "mergekit-recipe"] if plan.method == "recipe" else [plan.method]
    tags = list(dict.fromkeys(["tli", "depth-upscaling", *extra]))
    front = {"base_model": hub_ids or None, "tags": tags, "library_name": "transformers"}
    meta = yaml.safe_dump({k: v for k, v in front.items() if v}, sort_keys=False)
    src_names = ", ".join(f"`{s['name']}`" for s in sources)
    short = " + ".join(dict.fromkeys(os.path.basename(s["name"].rstrip("/")) for s in sources))
    lines = [
        "---",
        meta.rstrip(),
        "---",
        f"# {short}, {'merged' if plan.method == 'recipe' else 'upscaled'} with tli ({plan.method})",
        "",
        f"Made with tli {version} by {_METHOD_TEXT.get(plan.method, plan.method)} from {src_names}: "
        f"{len(plan.layers)} decoder layers, {plan.num_parameters / 1e6:.1f}M parameters. It loads in stock "
        "transformers (`AutoModelForCausalLM.from_pretrained`).",
        "",
        "## How it was made",
        "",
    ]
    if plan.method == "recipe":
        lines += ["`tli upscale RECIPE.yml OUT` with this mergekit passthrough recipe:", ""]
        lines += ["```yaml", recipe_yaml(plan.options["recipe"]).rstrip(), "```", ""]
    else:
        lines += ["```sh", command_line(plan, sources[0]["name"], "OUT"), "```", ""]
        try:
            recipe = plan_to_recipe(plan, layout)
        except ValueError:
            recipe = None
        if recipe is not None:
            lines += ["The same tensors (up to the sign of zero) from mergekit's passthrough recipe:", ""]
            lines += ["```yaml", recipe_yaml(recipe).rstrip(), "```", ""]
    lines += _layer_table(plan, multi=len(sources) > 1)
    scales = plan.residual_scales()
    if scales:
        lines += [
            "",
            "## Injected layers",
            "",
            "Both residual branches of each injected layer are scaled by alpha "
            "(x + alpha * Attn(norm x), then + alpha * MLP(norm .)); alpha is folded into the branch output "
            "weights, so the checkpoint is a plain model of its architecture. "
            "`tli_provenance.json` records it (`residual_scales`) for training with a learnable alpha.",
            "",
            "| layer | init | alpha |",
            "|--:|---|--:|",
        ]
        inits = {e["index"]: e.get("init", "") for e in plan.layers}
        lines += [f"| {j} | {inits.get(int(j), '')} | {a:g} |" for j, a in scales.items()]
    lines += ["", "Provenance (sources, options, plan digest): `tli_provenance.json`."]
    return "\n".join(lines) + "\n"


def _layer_table(plan: SurgeryPlan, multi: bool) -> list[str]:
    head = "| output layer | " + ("model | " if multi else "") + "source layer(s) | role | alpha / scale |"
    out = ["## Layer map", "", head, "|--:|" + ("---|" if multi else "") + "---|---|---|"]
    for e in plan.layers:
        src = ", ".join(str(s) for s in e.get("source", [])) or "random"
        if e.get("role") == "injected":
            extra = f"{e.get('init', '')} alpha={e.get('alpha', 1.0):g}"
        elif e.get("scale"):
            extra = ", ".join(f"{k}: {v:g}" for k, v in sorted(e["scale"].items()))
        else:
            extra = ""
        model = f"{e.get('model', '')} | " if multi else ""
        out.append(f"| {e['index']} | {model}{src} | {e.get('role', '')} | {extra} |")
    return out
