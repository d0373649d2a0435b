"""An independent reference for mergekit passthrough recipes: the output tensors computed with torch
from the source tensors (read with the safetensors library) and the YAML, the way mergekit 0.1.5 does
it (mergekit/plan.py, config.py, merge_methods/passthrough.py there): each tensor is cast to `dtype`,
multiplied by its `scale`, cast to `out_dtype`. Nothing here imports tli.

Also the comparison the recipe tests use: names and dtypes equal, values bit for bit, with the two
documented differences allowed where asked (-0.0 against +0.0 for scale 0; one unit in the last
place where a tensor is cast to a narrower dtype and scaled).
"""

from __future__ import annotations

import glob
import os
import re

import torch
from safetensors import safe_open

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def read_folder(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _evaluate(setting, name: str, t: float):
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, int | float | str):
        return float(setting)
    if not setting:
        return None
    if all(not isinstance(e, dict) for e in setting):
        vals = [float(v) for v in setting]
        scaled = t * (len(vals) - 1)
        i0 = int(scaled)
        i1 = min(len(vals) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * vals[i0] + frac * vals[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in name:
            return _evaluate(cond["value"], name, t)
    return None


def _scale(scopes, name: str, t: float):
    for scope in scopes:
        if scope and "scale" in scope:
            v = _evaluate(scope["scale"], name, t)
            if v is not None:
                return v
    return None


def reference_merge(recipe: dict, folders: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors mergekit writes for `recipe`; `folders` maps model names to local folders."""
    folders = folders or {}
    cache: dict[str, dict] = {}

    def model(name):
        if name not in cache:
            cache[name] = read_folder(folders.get(name, name))
        return cache[name]

    if "models" in recipe:
        m = recipe["models"][0]
        n = max(int(LAYER.match(k).group(1)) for k in model(m["model"]) if LAYER.match(k)) + 1
        slices = [{"sources": [{"model": m["model"], "layer_range": [0, n], "parameters": m.get("parameters")}]}]
    else:
        slices = recipe["slices"]
    dtype = DTYPES.get(recipe.get("dtype"))
    out_dtype = DTYPES.get(recipe.get("out_dtype"))
    top = recipe.get("parameters")

    def make(x: torch.Tensor, scale) -> torch.Tensor:
        if dtype is not None:
            x = x.to(dtype)
        if scale is not None:
            x = x * scale
        return x.to(out_dtype) if out_dtype is not None else x

    out = {}
    first, last = slices[0], slices[-1]
    for sl, pick in ((first, lambda k: "embed" in k), (last, lambda k: "embed" not in k)):
        src = sl["sources"][0]
        scopes = [src.get("parameters"), sl.get("parameters"), top]
        for k, v in model(src["model"]).items():
            if not LAYER.match(k) and pick(k):
                out[k] = make(v, _scale(scopes, k, 0.0))
    j = 0
    for sl in slices:
        src = sl["sources"][0]
        a, b = src["layer_range"]
        scopes = [src.get("parameters"), sl.get("parameters"), top]
        tensors = model(src["model"])
        for idx, i in enumerate(range(a, b)):
            t = idx / (b - a - 1) if b - a > 1 else 1.0
            for k, v in tensors.items():
                m = LAYER.match(k)
                if m and int(m.group(1)) == i:
                    out[f"model.layers.{j}.{m.group(2)}"] = make(v, _scale(scopes, k, t))
            j += 1
    return out


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, ulp_ok: set[str] = frozenset()):
    """Assert got == want bit for bit, but for -0.0 vs +0.0 and, in `ulp_ok`, one unit in the last
    place. Returns {tensor: what differed} for the allowed differences."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    allowed = {}
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, w.dtype, g.shape, w.shape)
        if torch.equal(_bits(g), _bits(w)):
            continue
        diff = _bits(g) != _bits(w)
        zero_sign = (g[diff] == 0) & (w[diff] == 0) & ~torch.signbit(g[diff]) & torch.signbit(w[diff])
        if bool(zero_sign.all()):
            allowed[k] = f"sign of zero ({int(diff.sum())} elements)"
            continue
        assert k in ulp_ok, f"{k}: {int(diff.sum())} of {g.numel()} elements differ"
        steps = (_bits(g).long() - _bits(w).long()).abs()[diff]
        assert int(steps.max()) == 1, f"{k}: differs by {int(steps.max())} units in the last place"
        allowed[k] = f"1 ulp ({int(diff.sum())} of {g.numel()} elements)"
    return allowed
