"""Upscaling methods: pure functions from a source layout and options to a SurgeryPlan."""

from __future__ import annotations

from tli_kernels.checkpoint.layout import CheckpointLayout
from tli_kernels.checkpoint.plan import SurgeryPlan
from tli_kernels.methods import block_expansion, dus, moe_upcycle, passthrough, stack, tli
from tli_kernels.methods.common import CommonOptions

METHODS = {
    "tli": tli.plan,
    "dus": dus.plan,
    "block-expansion": block_expansion.plan,
    "stack": stack.plan,
    "passthrough": passthrough.plan,
    "moe-upcycle": moe_upcycle.plan,
}


def make_plan(layout: CheckpointLayout, method: str, common: CommonOptions | None = None, **options) -> SurgeryPlan:
    """Plan `method` on `layout`; options are the method's own (k, init, alpha, m, times, layers, ...)."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[method](layout, common or CommonOptions(), **options)


def plan_source(src: str, method: str | None, common: CommonOptions | None = None, options: dict | None = None):
    """(layout, plan) for SRC as `tli upscale` and `tli plan` take it: a model folder, a Hub id
    (org/name[@revision]) with --method, or a mergekit passthrough recipe file (.yml/.yaml) without."""
    from tli_kernels.checkpoint.hub import open_source
    from tli_kernels.methods.recipe import METHOD, is_recipe_path, plan_recipe_file

    if is_recipe_path(src):
        if method not in (None, METHOD):
            raise ValueError(f"--method {method} does not apply to a recipe ({src} says what to do)")
        if options:
            flag = "--" + sorted(options)[0].replace("_", "-")
            raise ValueError(f"{flag} does not apply to a recipe ({src} says what to do)")
        return plan_recipe_file(src, common)
    if method is None:
        raise ValueError("--method is required (or give a mergekit passthrough recipe, RECIPE.yml, as SRC)")
    layout = open_source(src)
    return layout, make_plan(layout, method, common, **(options or {}))


__all__ = ["METHODS", "CommonOptions", "make_plan", "plan_source"]
