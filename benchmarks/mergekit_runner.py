"""Run mergekit recipes in one process (so its start-up is paid once), each into its own folder.

    python benchmarks/mergekit_runner.py JOBS.json

JOBS.json: [[recipe.yml, out_dir], ...]. Prints one JSON line per job: {"out", "seconds", "error"}.
Run it with a Python that has mergekit (it pins its own dependencies; a separate venv keeps them
apart). It imports nothing from tli. Used by tests/methods/test_recipe_mergekit.py.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def main(jobs_path: str) -> int:
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    with open(jobs_path, encoding="utf-8") as f:
        jobs = json.load(f)
    for recipe, out in jobs:
        t0 = time.perf_counter()
        error = None
        try:
            with open(recipe, encoding="utf-8") as f:
                config = MergeConfiguration.model_validate(yaml.safe_load(f))
            run_merge(config, out, options)
        except Exception as e:  # noqa: BLE001 - reported per job; the caller decides
            error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            traceback.print_exc(file=sys.stderr)
        print(json.dumps({"out": out, "seconds": time.perf_counter() - t0, "error": error}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
