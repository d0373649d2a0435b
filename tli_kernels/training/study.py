"""The quality study (SPEC section 7): does TLI beat DUS, LLaMA Pro and MoE upcycling?

On the built-in SmolLM2-135M and the King James text: upscale with every method (TLI at several
K / init / alpha, block expansion = LLaMA Pro, DUS = SOLAR, stacking, MoE upcycling, random-init
injection), score held-out loss right after upscaling, then train a chosen set of them (and the
source itself) for the same steps on the same tokens in the same order and score again. The
held-out windows are a fixed prefix of the King James held-out split, never trained on.

Every run's result is cached under WORKDIR/results keyed by its settings, so an interrupted study
continues where it stopped. Outputs: OUT/quality_results.{json,md}, OUT/quality_loss.png,
OUT/quality_init.png.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch

from tli_kernels.training.checkpoints import read_json, write_json

logger = logging.getLogger(__name__)

# Identity-preserving upscalings must score the source's loss at step 0 (fp32 evaluation).
IDENTITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Variant:
    name: str
    method: str | None  # None: the source model as it is
    options: dict = field(default_factory=dict)
    learnable_alpha: bool = False
    train: str = "all"  # all | injected
    identity: bool = False  # must equal the source at step 0
    lr: float | None = None  # None: the preset's
    seed: int | None = None  # data order; None: the preset's

    def describe(self) -> str:
        if self.method is None:
            text = "source model (no upscaling)"
        else:
            opts = " ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                            for k, v in self.options.items())  # fmt: skip
            text = f"{self.method} {opts}".strip()
        if self.learnable_alpha:
            text += ", learnable alpha"
        if self.train != "all":
            text += f", train {self.train} only"
        if self.lr is not None:
            text += f", lr {self.lr:.2g}"
        if self.seed is not None:
            text += f", data seed {self.seed}"
        return text


def tli(k: int, init: str, alpha: float, **kw) -> Variant:
    return Variant(f"tli-k{k}-{init}" + ("" if init == "zero" else f"-a{alpha:g}"), "tli",
                   {"k": k, "init": init, "alpha": alpha}, identity=init == "zero", **kw)  # fmt: skip


@dataclass(frozen=True)
class Preset:
    seq_len: int
    micro_batch: int
    accum: int
    steps: int
    lr: float
    warmup: int
    eval_every: int
    eval_tokens: int
    eval_batch: int
    grid_ks: tuple[int, ...]
    grid_alphas: tuple[float, ...]
    moe: tuple[tuple[int, int], ...]  # (experts, top-k) of each MoE-upcycling run
    min_lr_ratio: float = 0.1
    seed: int = 0
    extra_seeds: tuple[int, ...] = ()
    source_lr_factors: tuple[float, ...] = (3.0, 1 / 3)

    def train_variants(self, num_layers: int) -> list[Variant]:
        runs = self._train_variants(num_layers)
        # A second data order for the runs the defaults hinge on, to see how much of a gap is noise.
        again = ("source", "block-expansion-k2", "block-expansion-k2-injected", "tli-k2-copy-a0.1-learn",
                 "tli-k2-copy-a0.1-injected")  # fmt: skip
        return runs + [
            dataclasses.replace(v, name=f"{v.name}-seed{s}", seed=s)
            for s in self.extra_seeds
            for v in runs
            if v.name in again
        ]

    def _train_variants(self, num_layers: int) -> list[Variant]:
        m = max(1, num_layers // 4)
        learn = {"learnable_alpha": True}
        injected = {"train": "injected"}
        return [
            Variant("source", None),
            # The learning rate check: is the preset's lr a fair one for the baseline everything must beat?
            *(Variant(f"source-lr{self.lr * f:.2g}", None, lr=self.lr * f) for f in self.source_lr_factors),
            tli(2, "copy", 1.0),
            tli(2, "copy", 0.1),
            Variant("tli-k2-copy-a0.1-learn", "tli", {"k": 2, "init": "copy", "alpha": 0.1}, **learn),
            tli(2, "average", 0.1),
            tli(2, "random", 1.0),
            Variant("block-expansion-k2", "block-expansion", {"k": 2}, identity=True),
            Variant("block-expansion-k2-injected", "block-expansion", {"k": 2}, identity=True, **injected),
            Variant("tli-k2-copy-a0.1-injected", "tli", {"k": 2, "init": "copy", "alpha": 0.1}, **injected),
            Variant(f"dus-m{m}", "dus", {"m": m}),
            Variant("stack-x2", "stack", {"times": 2}),
            *(
                Variant(f"moe-e{e}-top{k}", "moe-upcycle", {"experts": e, "top_k": k}, identity=True)
                for e, k in self.moe
            ),
        ]

    def init_variants(self) -> list[Variant]:
        out = []
        for k in self.grid_ks:
            for init in ("copy", "average", "random"):
                out.extend(tli(k, init, a) for a in self.grid_alphas)
            out.append(tli(k, "zero", 1.0))
        return out


PRESETS = {
    # 512 tokens per step, 40 steps (20k tokens), 4096 held-out tokens: about 7 s a step and 2.5 hours in
    # all on 2 shared CPU cores. lr 1e-4: of 3e-5, 1e-4 and 3e-4 the best for the source model.
    "cpu": Preset(
        seq_len=128, micro_batch=4, accum=1, steps=40, lr=1e-4, warmup=4, eval_every=10, eval_tokens=4096,
        eval_batch=8, grid_ks=(1, 2, 3), grid_alphas=(1.0, 0.5, 0.25, 0.1), moe=((2, 2), (4, 2)), extra_seeds=(1,),
    ),
    # One GPU (H100 class), kernels on: 8k tokens per step, 250 steps = 2M tokens (about two passes over
    # the 1M-token train split), the whole held-out split (52k tokens).
    "gpu": Preset(
        seq_len=512, micro_batch=16, accum=1, steps=250, lr=3e-4, warmup=25, eval_every=25, eval_tokens=65536,
        eval_batch=16, grid_ks=(1, 2, 3, 5), grid_alphas=(1.0, 0.5, 0.25, 0.1, 0.05),
        moe=((2, 2), (8, 2)), extra_seeds=(1, 2),
    ),
}  # fmt: skip


def _variant_key(v: Variant) -> dict:
    # Fields left at None stay out of the cache key, so adding such a field keeps earlier results valid.
    return {k: val for k, val in dataclasses.asdict(v).items() if val is not None or k not in ("lr", "seed")}


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def machine_description(threads: int | None, device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import transformers

    gpu = torch.cuda.get_device_name(0) if device != "cpu" and torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


class Study:
    def __init__(self, preset: Preset, workdir: str, source: str, device: str, kernels: bool, threads: int | None):
        self.preset, self.workdir, self.source = preset, workdir, source
        self.device, self.kernels, self.threads = device, kernels, threads
        self.results_dir = os.path.join(workdir, "results")
        self.models_dir = os.path.join(workdir, "models")
        os.makedirs(self.results_dir, exist_ok=True)
        os.makedirs(self.models_dir, exist_ok=True)
        self._heldout = None

    # ---------------------------------------------------------------------------- models
    def model_folder(self, v: Variant) -> str:
        if v.method is None:
            return self.source
        from tli_kernels.methods import CommonOptions
        from tli_kernels.upscale import upscale

        path = os.path.join(self.models_dir, v.name)
        stamp = os.path.join(path, "study-variant.json")
        want = {"method": v.method, "options": v.options, "source": os.path.abspath(self.source)}
        if read_json(stamp) != want:
            upscale(self.source, path, v.method, common=CommonOptions(), options=v.options, overwrite=True)
            write_json(stamp, want)
        return path

    def drop_model(self, v: Variant) -> None:
        if v.method is not None:
            shutil.rmtree(os.path.join(self.models_dir, v.name), ignore_errors=True)

    def heldout(self, tokenizer) -> torch.Tensor:
        if self._heldout is None:
            from tli_kernels.evaluation import windows
            from tli_kernels.training.data import heldout_ids

            ids, _ = heldout_ids(tokenizer)
            self._heldout = windows(ids, self.preset.seq_len, self.preset.eval_tokens)
        return self._heldout

    # ---------------------------------------------------------------------------- step 0
    def initial(self, v: Variant) -> dict:
        key = {"kind": "initial", "variant": _variant_key(v), "seq_len": self.preset.seq_len,
               "eval_tokens": self.preset.eval_tokens, "source": os.path.abspath(self.source)}  # fmt: skip
        cache = os.path.join(self.results_dir, f"initial-{v.name}.json")
        cached = read_json(cache)
        if cached and cached.get("key_digest") == _digest(key):
            return cached
        from tli_kernels.evaluation import load_causal_lm, mean_loss

        t0 = time.perf_counter()
        folder = self.model_folder(v)
        model, tokenizer = load_causal_lm(folder)
        loss = mean_loss(model, self.heldout(tokenizer), self.preset.eval_batch)
        out = {
            "key_digest": _digest(key),
            "name": v.name,
            "describe": v.describe(),
            "layers": model.config.num_hidden_layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "heldout_loss": loss,
            "seconds": time.perf_counter() - t0,
        }
        del model
        gc.collect()
        write_json(cache, out)
        logger.info("step 0  %-30s %.4f", v.name, loss)
        return out

    # ---------------------------------------------------------------------------- training
    def trained(self, v: Variant, steps: int) -> dict:
        from tli_kernels.training.trainer import TrainConfig, train

        p = self.preset
        cfg = TrainConfig(
            model="",
            seq_len=p.seq_len, micro_batch=p.micro_batch, accum=p.accum, steps=steps, lr=v.lr or p.lr, warmup=p.warmup,
            min_lr_ratio=p.min_lr_ratio, eval_every=p.eval_every, eval_tokens=p.eval_tokens, eval_batch=p.eval_batch,
            train=v.train, learnable_alpha=v.learnable_alpha, seed=p.seed if v.seed is None else v.seed,
            kernels=self.kernels, device=self.device,
            threads=self.threads, progress=sys.stderr.isatty(),
        )  # fmt: skip
        settings = {k: val for k, val in dataclasses.asdict(cfg).items() if k not in ("progress", "threads")}
        key = {"kind": "trained", "variant": _variant_key(v), "config": settings,
               "source": os.path.abspath(self.source)}  # fmt: skip
        cache = os.path.join(self.results_dir, f"trained-{v.name}.json")
        cached = read_json(cache)
        if cached and cached.get("key_digest") == _digest(key):
            return cached
        cfg.model = self.model_folder(v)
        logger.info("training %s for %d steps", v.name, steps)
        result = train(cfg)
        out = {
            "key_digest": _digest(key),
            "name": v.name,
            "evals": result.evals,
            "losses": [h["loss"] for h in result.history],
            "alphas": {str(i): a for i, a in result.alphas.items()},
            "seconds": result.seconds,
            "seconds_per_step": sum(h["seconds"] for h in result.history) / max(1, len(result.history)),
        }
        gc.collect()
        write_json(cache, out)
        return out


def run_study(
    *,
    preset: str | Preset = "cpu",
    workdir: str = "build/study",
    out: str = "docs",
    source: str | None = None,
    runs: list[str] | None = None,
    steps: int | None = None,
    lr: float | None = None,
    threads: int | None = None,
    device: str = "auto",
    kernels: bool = False,
    initial_only: bool = False,
    keep_models: bool = False,
    command: str | None = None,
    environment: dict | None = None,
    environment_text: str | None = None,
) -> dict:
    """Run (or continue) the study and write its table, JSON and plots; returns the JSON document."""
    if isinstance(preset, Preset):
        p, preset = preset, "custom"
    elif preset in PRESETS:
        p = PRESETS[preset]
    else:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if steps is not None:
        p = dataclasses.replace(p, steps=steps)
    if lr is not None:
        p = dataclasses.replace(p, lr=lr)
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(workdir, exist_ok=True)
    if source is None:
        from tli_kernels.builtin.smollm2 import materialize

        source = materialize(os.path.join(workdir, "smollm2-135m"))
    study = Study(p, workdir, source, device, kernels, threads)
    num_layers = json.load(open(os.path.join(source, "config.json"), encoding="utf-8"))["num_hidden_layers"]

    trained_variants = p.train_variants(num_layers)
    if runs is not None:
        known = {v.name for v in trained_variants}
        unknown = [r for r in runs if r not in known]
        if unknown:
            raise ValueError(f"--runs {','.join(unknown)}: unknown; the preset's runs are {', '.join(sorted(known))}")
        trained_variants = [v for v in trained_variants if v.name in runs]
    seen, initial_variants = set(), []
    for v in [Variant("source", None)] + trained_variants + p.init_variants():
        if v.name not in seen:
            seen.add(v.name)
            initial_variants.append(v)

    initial = {}
    trained_names = {v.name for v in trained_variants}
    for v in initial_variants:
        initial[v.name] = study.initial(v)
        if not keep_models and v.name not in trained_names:
            study.drop_model(v)
    source_loss = initial["source"]["heldout_loss"]
    for v in initial_variants:
        if v.identity and abs(initial[v.name]["heldout_loss"] - source_loss) > IDENTITY_TOLERANCE:
            raise RuntimeError(
                f"{v.name} should preserve the source's function, but its held-out loss at step 0 is "
                f"{initial[v.name]['heldout_loss']:.6f} against the source's {source_loss:.6f}"
            )

    trained = {}
    if not initial_only:
        for v in trained_variants:
            trained[v.name] = study.trained(v, p.steps)
            start = trained[v.name]["evals"][0]["heldout_loss"]
            if abs(start - initial[v.name]["heldout_loss"]) > IDENTITY_TOLERANCE:
                raise RuntimeError(f"{v.name}: the trainer's step-0 loss {start:.6f} differs from the study's "
                                   f"{initial[v.name]['heldout_loss']:.6f}")  # fmt: skip
            if not keep_models:
                study.drop_model(v)

    doc = {
        "command": command or f"tli study --preset {preset}",
        "preset_name": preset,
        "preset": dataclasses.asdict(p),
        "machine": machine_description(threads, device),
        "environment": environment,  # benchmarks/harness.py's record (git commit, load) when run from there
        "environment_text": environment_text,
        "source": os.path.abspath(source),
        "identity_tolerance": IDENTITY_TOLERANCE,
        "runs": [
            {
                "name": v.name,
                "describe": v.describe(),
                "method": v.method,
                "options": v.options,
                "learnable_alpha": v.learnable_alpha,
                "train": v.train,
                "identity": v.identity,
                **{k: initial[v.name][k] for k in ("layers", "parameters")},
                "initial_loss": initial[v.name]["heldout_loss"],
                "trained": trained.get(v.name),
            }
            for v in initial_variants
        ],
        "trained_order": [v.name for v in trained_variants if v.name in trained],
    }
    from tli_kernels.training import report

    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "quality_results.json"), doc)
    with open(os.path.join(out, "quality_results.md"), "w", encoding="utf-8") as f:
        f.write(report.markdown(doc))
    report.plots(doc, out)
    return doc
