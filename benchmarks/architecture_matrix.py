"""The README's table of architectures x methods x kernels, produced by running them.

For every family in tests/architectures/models.py (the registry's, plus model types tli has no entry
for, which go through the generic rule), a tiny random model is saved by transformers, every method
runs through `tli upscale`, the output is loaded by stock transformers (no missing or unexpected keys)
and its logits are compared with the hook-based reference of the tests (layers deep-copied, branch
outputs scaled by forward hooks). The kernels column applies `apply_tli_kernels` to the source model,
checks its logits against stock (1e-5 relative where something was patched, bit for bit where
everything stayed stock) and prints the handle's report in brief: "patched", what stayed stock and why
("mlp stock (MoE block)"), or "stock (no kernels for this model type)".

    PYTHONPATH=. TRITON_INTERPRET=1 python benchmarks/architecture_matrix.py --out docs/architectures_matrix.md

and copy the table, as written, to the end of docs/architectures.md and under "Methods" in README.md.

A cell reads: "=" output logits equal the source's bit for bit (identity injection), "ok" matches the
reference to 1e-5 (random init: loads, finite, identity norms), "-" the method does not apply to the
family, "refused" a layer map the family's config cannot express (refused in one line, as the tests
expect), or the one-line error tli gave.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METHODS = {
    "tli zero": ("tli", dict(k=2, init="zero", alpha=1.0)),
    "tli copy a=0.5": ("tli", dict(k=3, init="copy", alpha=0.5)),
    "tli average": ("tli", dict(k=2, init="average", alpha=0.75)),
    "tli random": ("tli", dict(k=3, init="random", alpha=1.0)),
    "dus": ("dus", dict(m=2)),
    "stack": ("stack", dict(times=2)),
    "passthrough": ("passthrough", dict(layers="0-3,2-5")),
    "block-expansion": ("block-expansion", dict(k=3)),
    "moe-upcycle": ("moe-upcycle", dict(experts=4, top_k=2)),
}


def _spec(name: str):
    from tests.architectures.models import OutSpec
    from tests.architectures.test_upscale_by_architecture import CASES, tli_map

    key = {"tli zero": "tli-zero", "tli copy a=0.5": "tli-copy-alpha", "tli average": "tli-average"}.get(name, name)
    if key in CASES:
        return CASES[key][2]
    if name == "tli random":
        return tli_map(3, "copy", 1.0)
    return [OutSpec([i]) for i in range(6)]


def run_family(family, workdir: str) -> dict[str, str]:
    import torch

    from tests.architectures.models import (
        build_model,
        load,
        logits,
        per_layer_lists,
        reference_upscale,
        save_model,
    )
    from tli_kernels.upscale import upscale

    model = build_model(family)
    src = save_model(model, os.path.join(workdir, family.model_type, "src"), shard="100KB")
    source_logits = logits(model)
    row = {}
    for name, (method, options) in METHODS.items():
        dst = os.path.join(workdir, family.model_type, name.replace(" ", "_"))
        if method == "moe-upcycle" and not family.upcycle_to:
            row[name] = "-"
            continue
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                upscale(src, dst, method, options=options)
                out = load(dst)
            got = logits(out)
            if name == "tli random":
                ok = torch.isfinite(got).all().item()
                row[name] = "ok" if ok else "non-finite logits"
            elif method == "moe-upcycle":
                close = torch.allclose(got, source_logits, rtol=1e-5, atol=1e-5)
                row[name] = f"ok ({out.config.model_type})" if close else "differs from the source"
            else:
                want = logits(reference_upscale(model, family, _spec(name), per_layer_lists(model.config)))
                if name in ("tli zero", "block-expansion") and torch.equal(got, source_logits):
                    row[name] = "="
                else:
                    row[name] = "ok" if torch.allclose(got, want, rtol=1e-5, atol=1e-5) else "differs"
        except Exception as e:  # noqa: BLE001 - the table reports every failure as it is
            expected = family.refuses.get(name)
            if expected and re.search(expected, str(e)):
                row[name] = "refused (the config cannot express the map)"
            else:
                row[name] = f"error: {str(e).splitlines()[0][-90:]}"
    row["kernels"] = kernels_cell(model)
    return row


def kernels_cell(model) -> str:
    import copy

    import torch

    from tests.architectures.models import logits
    from tests.ops.tolerance import rel_error
    from tli_kernels.integrations import apply_tli_kernels

    stock = logits(model)
    patched = copy.deepcopy(model)
    handle = apply_tli_kernels(patched)
    got = logits(patched)
    handle.undo()
    report = handle.report
    same = rel_error(got, stock) < 1e-5 if report.anything_patched else torch.equal(got, stock)
    return report.brief() if same else f"DIFFERS from stock: {report.brief()}"


def main() -> int:
    from tests.architectures.models import FAMILIES
    from tests.architectures.test_generic_rule import UNKNOWN

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown table here (also printed)")
    parser.add_argument("--only", nargs="*", help="model types to run (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("TLI_CACHE_DIR", tempfile.mkdtemp(prefix="tli-matrix-cache-"))
    import logging

    logging.getLogger("tli_kernels.integrations").setLevel(logging.ERROR)  # the cells carry the reports

    from tli_kernels.architectures import BY_MODEL_TYPE

    families = {**FAMILIES, **UNKNOWN}
    if args.only:
        families = {k: v for k, v in families.items() if k in args.only}
    columns = list(METHODS) + ["kernels"]
    lines = [
        "| model_type | rule | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="tli-matrix-") as workdir:
        for model_type, family in families.items():
            row = run_family(family, workdir)
            rule = "registry" if model_type in BY_MODEL_TYPE else "generic (proven on an instance)"
            lines.append(f"| {model_type} | {rule} | " + " | ".join(row[c] for c in columns) + " |")
            print(lines[-1], flush=True)
    import torch
    import transformers

    footer = (
        f"\nProduced by `benchmarks/architecture_matrix.py` in {time.time() - start:.0f} s "
        f"(transformers {transformers.__version__}, torch {torch.__version__}, CPU)."
    )
    table = "\n".join(lines) + "\n" + footer + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
