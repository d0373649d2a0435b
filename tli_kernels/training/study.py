"""The quality study (SPEC section 7): does TLI beat DUS, LLaMA Pro and MoE upcycling?

On the built-in SmolLM2-135M and the King James text: upscale with every method (TLI at several
K / init / alpha, block expansion = LLaMA Pro, DUS = SOLAR, stacking, MoE upcycling, random-init
injection), score held-out loss right after upscaling, then train a chosen set of them (and the
source itself) for the same steps on the same tokens in the same order and score again. The
held-out windows are a fixed prefix of the King James held-out split, never trained on.

Every run's result is cached under WORKDIR/results keyed by its settings, so an interrupted study
continues where it stopped. Outputs: OUT/quality_results.{json,md} (rewritten after every run, so a
killed study leaves its finished runs), OUT/quality_loss.png, OUT/quality_init.png.

The gpu-window preset fits a short GPU loan: its base model is a small Llama made in the same run
(base_model.py) instead of SmolLM2-135M, its runs are ordered by importance, and a time budget
(--budget-s) skips the runs that would not fit, recording why.
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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tli_kernels.training.base_model import BaseSpec, build_base, cached_base
from tli_kernels.training.checkpoints import read_json, write_json

logger = logging.getLogger(__name__)

# Identity-preserving upscalings must score the source's loss at step 0 (fp32 evaluation).
IDENTITY_TOLERANCE = 1e-4
# The trainer's own step-0 loss against the study's fp32 one: equal on the CPU (fp32 both), within
# bf16 rounding on a GPU (the trainer evaluates under bf16 autocast).
AUTOCAST_TOLERANCE = 0.05
# A run is started only if the budget left covers its estimated seconds times this.
BUDGET_MARGIN = 1.2


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
    # The runs to train, most important first: names, or a prefix naming every run it starts
    # ("dus" -> dus-m2). None: the full list below.
    runs: tuple[str, ...] | None = None
    # The source model: None for the built-in SmolLM2-135M, or a small Llama made in the same run.
    base: BaseSpec | None = None
    # True: a failed check or run stops the study (an exception). False: it is recorded in the
    # results, the study goes on, and the command exits 1 at the end.
    strict: bool = True

    def train_variants(self, num_layers: int) -> list[Variant]:
        runs = self._train_variants(num_layers) if self.runs is None else self._chosen(num_layers)
        # A second data order for the runs the defaults hinge on, to see how much of a gap is noise.
        again = ("source", "block-expansion-k2", "block-expansion-k2-injected", "tli-k2-copy-a0.1-learn",
                 "tli-k2-copy-a0.1-injected", "tli-k2-zero")  # fmt: skip
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

    def _chosen(self, num_layers: int) -> list[Variant]:
        pool = self._train_variants(num_layers) + [tli(2, "zero", 1.0)]
        out: list[Variant] = []
        for entry in self.runs or ():
            found = [v for v in pool if v.name == entry] or [v for v in pool if v.name.startswith(entry)]
            if not found:
                raise ValueError(f"preset run {entry!r}: no such run (known: {', '.join(v.name for v in pool)})")
            out.extend(v for v in found if v not in out)
        return out

    def init_variants(self) -> list[Variant]:
        out = []
        for k in self.grid_ks:
            for init in ("copy", "average", "random"):
                out.extend(tli(k, init, a) for a in self.grid_alphas)
            out.append(tli(k, "zero", 1.0))
        return out


# Most important first: the source baseline, block expansion (= TLI --init zero, the tli default),
# TLI's scaled copy with fixed and learnable alpha (the paper's method as we read it), then the peer
# methods the paper claims to beat, then the known-bad settings (plain copy, stacking).
GPU_WINDOW_RUNS = ("source", "tli-k2-zero", "tli-k2-copy-a0.1", "tli-k2-copy-a0.1-learn", "dus", "moe-e4-top2",
                   "tli-k2-copy-a1", "stack-x2")  # fmt: skip

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
    # One GPU for a few minutes, nothing to carry but the working tree (and the KJV wheel): a 40M
    # Llama made here (12 layers; tokenizer + 240 pretraining steps of 16k tokens: ~4 passes over the
    # 0.94M-token train split, about where repeating data stops paying), then 8 runs of 120 steps of
    # 8k tokens (~1 more pass) each, most important first, then a second data order for three of
    # them; the rest of the step-0 grid (K = 2) last. Meant to be run with --budget-s.
    "gpu-window": Preset(
        seq_len=512, micro_batch=16, accum=1, steps=120, lr=3e-4, warmup=12, eval_every=12, eval_tokens=65536,
        eval_batch=32, grid_ks=(2,), grid_alphas=(1.0, 0.5, 0.25, 0.1), moe=((4, 2),), extra_seeds=(1,),
        runs=GPU_WINDOW_RUNS, base=BaseSpec(), strict=False,
    ),
    # The same code path at a size the 2-core CPU runs end to end in well under a minute (tests use it).
    "gpu-window-smoke": Preset(
        seq_len=64, micro_batch=4, accum=1, steps=4, lr=1e-3, warmup=1, eval_every=2, eval_tokens=512,
        eval_batch=8, grid_ks=(2,), grid_alphas=(1.0, 0.1), moe=((4, 2),), extra_seeds=(1,),
        runs=GPU_WINDOW_RUNS, strict=False,
        base=BaseSpec(vocab_size=512, text_chars=400_000, layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2,
                      max_positions=256, seq_len=64, micro_batch=16, steps=40, lr=3e-3, warmup=4, eval_every=20),
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


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Study:
    def __init__(self, preset: Preset, workdir: str, source: str, device: str, kernels: bool, threads: int | None,
                 data_files: tuple[str, str] | None = None):  # fmt: skip
        self.preset, self.workdir, self.source = preset, workdir, source
        self.device, self.kernels, self.threads = device, kernels, threads
        # (train ids, held-out ids) as .npy files; None: the KJV splits tokenised by the model's tokenizer
        self.train_file, self.heldout_file = data_files or (None, None)
        self.eval_device = resolve_device(device)  # step-0 scores: fp32, on the GPU when there is one
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
            from tli_kernels.training.data import heldout_ids, load_token_ids

            if self.heldout_file is not None:
                ids = load_token_ids(self.heldout_file)
            else:
                ids, _ = heldout_ids(tokenizer)
            self._heldout = windows(ids, self.preset.seq_len, self.preset.eval_tokens)
        return self._heldout

    # ---------------------------------------------------------------------------- step 0
    def _initial_key(self, v: Variant) -> tuple[dict, str]:
        key = {"kind": "initial", "variant": _variant_key(v), "seq_len": self.preset.seq_len,
               "eval_tokens": self.preset.eval_tokens, "source": os.path.abspath(self.source)}  # fmt: skip
        # Only when not the defaults, so the caches of earlier CPU studies stay valid.
        if self.eval_device != "cpu":
            key["eval_device"] = self.eval_device
        if self.heldout_file is not None:
            key["heldout_file"] = os.path.abspath(self.heldout_file)
        return key, os.path.join(self.results_dir, f"initial-{v.name}.json")

    def cached_initial(self, v: Variant) -> dict | None:
        key, cache = self._initial_key(v)
        cached = read_json(cache)
        return cached if cached and cached.get("key_digest") == _digest(key) else None

    def initial(self, v: Variant) -> dict:
        cached = self.cached_initial(v)
        if cached is not None:
            return cached
        key, cache = self._initial_key(v)
        from tli_kernels.evaluation import load_causal_lm, mean_loss

        t0 = time.perf_counter()
        folder = self.model_folder(v)
        model, tokenizer = load_causal_lm(folder)
        model.to(self.eval_device)
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
    def _train_config(self, v: Variant, steps: int):
        from tli_kernels.training.trainer import TrainConfig

        p = self.preset
        return TrainConfig(
            model="",
            seq_len=p.seq_len, micro_batch=p.micro_batch, accum=p.accum, steps=steps, lr=v.lr or p.lr, warmup=p.warmup,
            min_lr_ratio=p.min_lr_ratio, eval_every=p.eval_every, eval_tokens=p.eval_tokens, eval_batch=p.eval_batch,
            train=v.train, learnable_alpha=v.learnable_alpha, seed=p.seed if v.seed is None else v.seed,
            data_file=self.train_file, eval_data_file=self.heldout_file, kernels=self.kernels, device=self.device,
            threads=self.threads, progress=sys.stderr.isatty(),
        )  # fmt: skip

    def _trained_key(self, v: Variant, cfg) -> tuple[dict, str]:
        settings = {k: val for k, val in dataclasses.asdict(cfg).items() if k not in ("progress", "threads")}
        key = {"kind": "trained", "variant": _variant_key(v), "config": settings,
               "source": os.path.abspath(self.source)}  # fmt: skip
        return key, os.path.join(self.results_dir, f"trained-{v.name}.json")

    def cached_trained(self, v: Variant, steps: int) -> dict | None:
        key, cache = self._trained_key(v, self._train_config(v, steps))
        cached = read_json(cache)
        return cached if cached and cached.get("key_digest") == _digest(key) else None

    def trained(self, v: Variant, steps: int) -> dict:
        from tli_kernels.training.trainer import train

        cached = self.cached_trained(v, steps)
        if cached is not None:
            return cached
        cfg = self._train_config(v, steps)
        key, cache = self._trained_key(v, cfg)
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


class Budget:
    """Seconds allowed from `started` (None: no limit), and estimates of what a run will take from
    the runs measured so far (this process's or cached ones')."""

    def __init__(self, seconds: float | None, clock: Callable[[], float], started: float):
        self.seconds, self.clock, self.started = seconds, clock, started

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, estimate: float) -> bool:
        left = self.left()
        return left is None or (left > 0 and estimate * BUDGET_MARGIN <= left)

    @staticmethod
    def initial_estimate(initial: dict[str, dict]) -> float:
        return max((r.get("seconds", 0.0) for r in initial.values()), default=0.0)

    @staticmethod
    def trained_estimate(parameters: int, steps: int, tokens_per_step: int, trained: dict[str, dict],
                         initial: dict[str, dict], base: dict | None) -> float:  # fmt: skip
        """Seconds of a run of `parameters` for `steps`: the measured run of the nearest size, scaled
        by parameters and steps; before any, the base model's pretraining per token; else 0."""
        import math

        seen = [(initial[n]["parameters"], t["seconds"], len(t["losses"])) for n, t in trained.items() if n in initial]
        if seen:
            params, seconds, done = min(seen, key=lambda s: abs(math.log(parameters / s[0])))
            return seconds * (parameters / params) * (steps / max(1, done))
        if base and base.get("seconds_pretrain"):
            spec = base["spec"]
            per_token = base["seconds_pretrain"] / (spec["steps"] * base["tokens_per_step"])
            return per_token * steps * tokens_per_step * parameters / base["parameters"]
        return 0.0


def process_elapsed() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere): --budget-s counts from there."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


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
    budget_s: float | None = None,
    plots: bool = True,
    clock: Callable[[], float] = time.monotonic,
    started: float | None = None,
    on_write: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or continue) the study and write its table, JSON and plots; returns the JSON document.

    The JSON and markdown are rewritten after every run. budget_s: seconds from `started` (default:
    now, on `clock`); a run whose estimate does not fit in what is left is skipped and recorded
    as such (cached results are always used: they cost nothing)."""
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
    budget = Budget(budget_s, clock, clock() if started is None else started)
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    state = _State(p, preset, command, threads, device, kernels, environment, environment_text, budget_s)

    def write(status: str) -> dict:
        state.status, state.elapsed = status, budget.elapsed()
        doc = state.document()
        _write_results(doc, out)
        if on_write is not None:
            on_write(doc)
        return doc

    def check(ok: bool, name: str, message: str) -> None:
        if ok:
            return
        if p.strict:
            raise RuntimeError(message)
        logger.error("check failed: %s", message)
        state.check_failures.append({"name": name, "message": message})

    def attempt(name: str, stage: str, fn):
        """fn() (None on failure, recorded, when the preset is not strict)."""
        if p.strict:
            return fn()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - recorded in the results; the study goes on
            logger.exception("%s (%s) failed", name, stage)
            state.failures.append({"name": name, "stage": stage, "error": f"{type(e).__name__}: {e}"})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None

    data_files = None
    if source is None and p.base is not None:
        base_dir = os.path.join(workdir, "base")
        state.base = cached_base(base_dir, p.base)
        if state.base is None and not budget.allows(0.0):
            state.skip("base model", "base", f"budget of {budget_s:g} s spent before the base model was made")
            return write("complete")
        if state.base is None:
            state.base = attempt("base model", "base", lambda: build_base(
                base_dir, p.base, eval_tokens=p.eval_tokens, eval_batch=p.eval_batch, device=device, kernels=kernels,
                threads=threads))  # fmt: skip
            if state.base is None:
                return write("complete")
        source = state.base["model"]
        data_files = (state.base["train_ids"], state.base["heldout_ids"])
        state.source_description = state.base["describe"] + f", pretrained here for {p.base.steps} steps"
        state.source = os.path.abspath(source)
        write("running")  # the base model's record (its time), even if nothing after it finishes
    elif source is None:
        from tli_kernels.builtin.smollm2 import materialize

        source = materialize(os.path.join(workdir, "smollm2-135m"))
    state.source = os.path.abspath(source)
    study = Study(p, workdir, source, device, kernels, threads, data_files)
    state.precision = "fp32" if study.eval_device == "cpu" else "bf16 autocast, fp32 master weights"
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
    state.initial_variants, state.trained_variants = initial_variants, trained_variants
    trained_names = {v.name for v in trained_variants}

    def do_initial(v: Variant) -> bool:
        if study.cached_initial(v) is None and not budget.allows(Budget.initial_estimate(state.initial)):
            state.skip(v.name, "step 0", _budget_reason(budget, Budget.initial_estimate(state.initial)))
            return False
        result = attempt(v.name, "step 0", lambda: study.initial(v))
        if result is None:
            return False
        state.initial[v.name] = result
        if not keep_models and v.name not in trained_names:
            study.drop_model(v)
        if v.identity and "source" in state.initial:
            source_loss = state.initial["source"]["heldout_loss"]
            check(abs(result["heldout_loss"] - source_loss) <= IDENTITY_TOLERANCE, v.name,
                  f"{v.name} should preserve the source's function, but its held-out loss at step 0 is "
                  f"{result['heldout_loss']:.6f} against the source's {source_loss:.6f}")  # fmt: skip
        write("running")
        return True

    # Step 0 of the source and of every run to train, the runs, then the rest of the step-0 grid
    # (cheap, and not needed by anything else: last, so a short budget spends itself on training).
    if not do_initial(initial_variants[0]):
        for v in initial_variants[1:]:
            state.skip(v.name, "step 0", "the source's step-0 loss is missing")
        return write("complete")
    for v in trained_variants:
        if v.name in state.initial or v.name in {s["name"] for s in state.skipped}:
            continue
        do_initial(v)

    tolerance = IDENTITY_TOLERANCE if study.eval_device == "cpu" else AUTOCAST_TOLERANCE
    tokens_per_step = p.seq_len * p.micro_batch * p.accum
    for v in [] if initial_only else trained_variants:
        if v.name not in state.initial:
            state.skip(v.name, "training", "no step-0 loss (skipped or failed)")
            continue
        if study.cached_trained(v, p.steps) is None:
            estimate = Budget.trained_estimate(state.initial[v.name]["parameters"], p.steps, tokens_per_step,
                                               state.trained, state.initial, state.base)  # fmt: skip
            if not budget.allows(estimate):
                state.skip(v.name, "training", _budget_reason(budget, estimate))
                write("running")
                continue
        result = attempt(v.name, "training", lambda v=v: study.trained(v, p.steps))
        if result is not None:
            state.trained[v.name] = result
            start, initial = result["evals"][0]["heldout_loss"], state.initial[v.name]["heldout_loss"]
            check(abs(start - initial) <= tolerance, v.name,
                  f"{v.name}: the trainer's step-0 loss {start:.6f} differs from the study's {initial:.6f} "
                  f"by more than {tolerance:g}")  # fmt: skip
        if not keep_models:
            study.drop_model(v)
        write("running")

    for v in initial_variants:
        if v.name not in state.initial and v.name not in {s["name"] for s in state.skipped}:
            do_initial(v)

    doc = write("complete")
    if plots:
        from tli_kernels.training import report

        report.plots(doc, out)
    return doc


def _budget_reason(budget: Budget, estimate: float) -> str:
    left = budget.left()
    return (f"budget: {max(0.0, left):.0f} s of {budget.seconds:g} s left, estimated {estimate:.0f} s "
            f"(x{BUDGET_MARGIN:g} margin)")  # fmt: skip


def _write_results(doc: dict, out: str) -> None:
    from tli_kernels.training import report

    write_json(os.path.join(out, "quality_results.json"), doc)
    tmp = os.path.join(out, "quality_results.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(report.markdown(doc))
    os.replace(tmp, os.path.join(out, "quality_results.md"))


class _State:
    """What the study knows so far; document() is the JSON written after every run."""

    def __init__(self, p, preset_name, command, threads, device, kernels, environment, environment_text, budget_s):
        self.p, self.preset_name, self.command = p, preset_name, command
        self.threads, self.device, self.kernels = threads, device, kernels
        self.environment, self.environment_text, self.budget_s = environment, environment_text, budget_s
        self.base: dict | None = None
        self.source: str | None = None
        self.source_description: str | None = None
        self.precision = "fp32"
        self.initial_variants: list[Variant] = []
        self.trained_variants: list[Variant] = []
        self.initial: dict[str, dict] = {}
        self.trained: dict[str, dict] = {}
        self.skipped: list[dict] = []
        self.failures: list[dict] = []
        self.check_failures: list[dict] = []
        self.status, self.elapsed = "running", 0.0

    def skip(self, name: str, stage: str, reason: str) -> None:
        logger.warning("skipped %s (%s): %s", name, stage, reason)
        self.skipped.append({"name": name, "stage": stage, "reason": reason})

    def document(self) -> dict:
        p = self.p
        return {
            "command": self.command or f"tli study --preset {self.preset_name}",
            "preset_name": self.preset_name,
            "preset": dataclasses.asdict(p),
            "machine": machine_description(self.threads, self.device),
            "environment": self.environment,  # benchmarks/harness.py's record (git commit, load) when run from there
            "environment_text": self.environment_text,
            "source": self.source,
            "source_description": self.source_description,
            "base": self.base,  # the base model made for this study (None: SmolLM2-135M or --source)
            "kernels": self.kernels,
            "precision": self.precision,
            "identity_tolerance": IDENTITY_TOLERANCE,
            "status": self.status,  # running (a later run may be missing) | complete
            "elapsed_s": self.elapsed,
            "budget_s": self.budget_s,
            "runs": [
                {
                    "name": v.name,
                    "describe": v.describe(),
                    "method": v.method,
                    "options": v.options,
                    "learnable_alpha": v.learnable_alpha,
                    "train": v.train,
                    "identity": v.identity,
                    **{k: self.initial[v.name][k] for k in ("layers", "parameters")},
                    "initial_loss": self.initial[v.name]["heldout_loss"],
                    "initial_seconds": self.initial[v.name].get("seconds"),
                    "trained": self.trained.get(v.name),
                }
                for v in self.initial_variants
                if v.name in self.initial
            ],
            "trained_order": [v.name for v in self.trained_variants if v.name in self.trained],
            "skipped": self.skipped,
            "failures": self.failures,
            "check_failures": self.check_failures,
        }
