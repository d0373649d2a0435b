"""`tli train` as a library call: continued pretraining of an (upscaled) Hugging Face causal LM.

AdamW (decay on matrices only) with linear warm-up and cosine decay to `min_lr_ratio`, gradient
accumulation, gradient clipping, bf16 autocast on GPU (fp32 master weights), optional learnable
residual scales on the injected layers, held-out loss every `eval_every` steps, checkpoints in HF
format with alpha folded, exact resume. Under torchrun the model is sharded with FSDP2; a step of
A accumulated micro-batches on one process sees the same windows as A ranks without accumulation.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tli_kernels import __version__
from tli_kernels.checkpoint.outdir import OutputDir
from tli_kernels.checkpoint.validate import is_number
from tli_kernels.training import checkpoints, distributed
from tli_kernels.training.distributed import agree
from tli_kernels.training.export import export_model
from tli_kernels.training.residual import Trainee, alpha_parameters, decoder_layers, scalar
from tli_kernels.training.sharded_load import ModelSource, build_meta_model, fill_from_plan, materialize, open_source

logger = logging.getLogger(__name__)

TRAIN_CHOICES = ("all", "injected")
STATE_FORMAT = 2
# Fields that fix the loss curve: a resumed run must keep them (the rest may change between runs).
TRAJECTORY_FIELDS = (
    "seq_len", "global_batch", "steps", "lr", "min_lr_ratio", "warmup", "weight_decay", "beta1", "beta2",
    "max_grad_norm", "train", "learnable_alpha", "alpha_lr", "seed", "text_file", "data_file", "text_field",
    "heldout_fraction", "method", "method_options", "init_seed",
)  # fmt: skip
EXPORT_CHOICES = ("final", "every", "none")


@dataclass
class TrainConfig:
    model: str
    output: str | None = None  # checkpoints go to OUTPUT/step-NNNNNN; None: train and keep nothing
    method: str | None = None  # upscale MODEL on load with this method (tli, dus, ...); None: load as is
    method_options: dict = field(default_factory=dict)  # the method's options (k, init, alpha, m, ...)
    init_seed: int = 0  # seed of the method's random initialisations (tli upscale --seed)
    allow_shrink: bool = False  # --method dus with m > N/2 makes fewer layers than MODEL: refused unless True
    text_file: str | None = None  # training text (default: the King James train split)
    data_file: str | None = None  # or token ids (.npy / .pt), or documents (.txt/.jsonl/.parquet/datasets dir)
    text_field: str = "text"  # the text column of JSONL / Parquet / datasets documents
    heldout_fraction: float = 0.01  # documents held out of --data when no --eval-* is given
    eval_text_file: str | None = None  # held-out text (default: the King James held-out split)
    eval_data_file: str | None = None
    seq_len: int = 256
    micro_batch: int = 4
    accum: int = 1
    global_batch: int | None = None  # windows per step; sets accum = global / (micro_batch x world)
    steps: int = 100
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 1.0  # 0: no clipping
    train: str = "all"  # all | injected (LLaMA Pro style: only the injected layers learn)
    learnable_alpha: bool = False
    alpha_lr: float | None = None  # default: 100 x lr
    activation_checkpointing: bool = False  # recompute each layer in backward (needed at 405B)
    eval_every: int = 50  # 0: evaluate only at the start and the end
    eval_tokens: int = 8192
    eval_batch: int = 8
    save_every: int = 0  # 0: save only at the end
    export: str = "final"  # Hugging Face export: at the end of each run, at every save, or never
    save_dtype: str = "keep"  # dtype of the exported weights (keep: the checkpoint's own)
    stop_after: int | None = None  # end this run after this step (a later --resume finishes)
    resume: bool = False
    extend_to: int | None = None  # with resume: continue past the planned steps to this step (see extended_schedule)
    seed: int = 0
    kernels: bool = False
    device: str = "auto"
    threads: int | None = None
    progress: bool = True

    def check(self, world: int = 1) -> None:
        """Every option checked before anything is loaded: a one-line error naming the option."""
        ints = {"seq_len": 2, "micro_batch": 1, "accum": 1, "steps": 1, "eval_batch": 1,
                "warmup": 0, "eval_every": 0, "save_every": 0, "eval_tokens": 0, "seed": 0, "init_seed": 0}  # fmt: skip
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"--{_flag(name)} {value!r}: must be an integer")
            if value < low:
                raise ValueError(f"--{_flag(name)} {value}: must be at least {low}")
        for name in ("threads", "global_batch", "stop_after", "extend_to"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{_flag(name)} {value!r}: must be an integer of at least 1")
        _check_float("lr", self.lr, low=0.0, low_open=True)
        if self.alpha_lr is not None:
            _check_float("alpha-lr", self.alpha_lr, low=0.0, low_open=True)
        _check_float("min-lr-ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _check_float("weight-decay", self.weight_decay, low=0.0)
        _check_float("max-grad-norm", self.max_grad_norm, low=0.0)
        _check_float("beta1", self.beta1, low=0.0, high=1.0, high_open=True)
        _check_float("beta2", self.beta2, low=0.0, high=1.0, high_open=True)
        _check_float("heldout-fraction", self.heldout_fraction, low=0.0, high=0.5, low_open=True)
        if self.train not in TRAIN_CHOICES:
            raise ValueError(f"--train {self.train!r}: choose one of {', '.join(TRAIN_CHOICES)}")
        if self.export not in EXPORT_CHOICES:
            raise ValueError(f"--export {self.export!r}: choose one of {', '.join(EXPORT_CHOICES)}")
        from tli_kernels.training.export import SAVE_DTYPES

        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"--save-dtype {self.save_dtype!r}: choose one of {', '.join(SAVE_DTYPES)}")
        if self.extend_to is not None and not self.resume:
            raise ValueError(f"--extend-to {self.extend_to}: continues a saved run, so it needs --resume and --output")
        end, end_flag = (self.extend_to, "--extend-to") if self.extend_to is not None else (self.steps, "--steps")
        if self.stop_after is not None and self.stop_after > end:
            raise ValueError(f"--stop-after {self.stop_after}: must be between 1 and {end_flag} {end}")
        if self.resume and not self.output:
            raise ValueError("--resume needs --output (where the checkpoints are)")
        if self.eval_tokens and self.eval_tokens < self.seq_len:
            raise ValueError(f"--eval-tokens {self.eval_tokens}: less than one window of --seq-len {self.seq_len}")
        if self.method_options and not self.method:
            raise ValueError(f"{', '.join('--' + _flag(k) for k in self.method_options)}: give --method as well")
        if self.method is not None:
            from tli_kernels.cli.main import METHOD_OPTIONS

            if self.method not in METHOD_OPTIONS:
                raise ValueError(f"--method {self.method!r}: choose one of {', '.join(METHOD_OPTIONS)}")
            stray = [k for k in self.method_options if k not in METHOD_OPTIONS[self.method]]
            if stray:
                allowed = ", ".join("--" + _flag(o) for o in METHOD_OPTIONS[self.method])
                raise ValueError(f"--{_flag(stray[0])} does not apply to --method {self.method} (it takes: {allowed})")
            if self.method_options.get("alpha") is not None:  # as tli upscale: refused up front, whatever --init
                _check_float("alpha", self.method_options["alpha"])
            if self.method == "tli":
                from tli_kernels.cli.main import check_alpha_applies

                check_alpha_applies(self.method_options)
        inputs = [("--text", self.text_file, False), ("--eval-text", self.eval_text_file, False),
                  ("--data", self.data_file, True), ("--eval-data", self.eval_data_file, True)]  # fmt: skip
        for flag, path, folder_ok in inputs:
            if path is not None:
                _check_input_file(flag, path, folder_ok)
        if self.global_batch is not None and self.global_batch % (self.micro_batch * world):
            raise ValueError(
                f"--global-batch {self.global_batch}: not divisible by --micro-batch {self.micro_batch} x world size "
                f"{world}; choose a world size and micro-batch whose product divides it"
            )

    def accumulation(self, world: int) -> int:
        """Micro-steps per optimizer step on this world size."""
        if self.global_batch is None:
            return self.accum
        return self.global_batch // (self.micro_batch * world)

    def trajectory(self, world: int) -> dict:
        values = dataclasses.asdict(self)
        values["global_batch"] = self.micro_batch * self.accumulation(world) * world
        values["alpha_lr"] = self.effective_alpha_lr
        return {k: values[k] for k in TRAJECTORY_FIELDS}

    @property
    def effective_alpha_lr(self) -> float:
        return self.alpha_lr if self.alpha_lr is not None else 100 * self.lr


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_input_file(flag: str, path: str, folder_ok: bool) -> None:
    """A data or text path must be a regular file (or, for --data, a folder): a FIFO would block the
    run for ever and /dev/zero never end. Refused up front, before anything is loaded."""
    import stat

    from tli_kernels.checkpoint.validate import file_kind

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: no such file{' or folder' if folder_ok else ''}") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
        return
    raise ValueError(f"{flag} {path}: is {file_kind(st.st_mode)}, not a regular file; tli reads only regular files")


def _check_float(flag: str, value, *, low=None, high=None, low_open=False, high_open=False) -> None:
    """Finite, in range, and still finite once float32 (the optimizer's arithmetic)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"--{flag} {value!r}: must be a number")
    with np.errstate(over="ignore"):
        as_float32 = float(np.float32(value))
    if not math.isfinite(value) or not math.isfinite(as_float32):
        raise ValueError(f"--{flag} {value}: must be a finite number (float32)")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"--{flag} {value}: must be {'greater than' if low_open else 'at least'} {low:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"--{flag} {value}: must be {'less than' if high_open else 'at most'} {high:g}")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # {"step", "tokens", "loss", "lr", ...} per step
    evals: list[dict] = field(default_factory=list)  # {"step", "tokens", "heldout_loss"}
    checkpoint: str | None = None
    alphas: dict[int, float] = field(default_factory=dict)  # learnt multipliers (1 = unchanged)
    steps_done: int = 0
    seconds: float = 0.0
    main_process: bool = True  # False on ranks other than 0 of a distributed run
    bytes_read: int = 0  # source bytes this rank read to fill its shards (0 on resume)

    @property
    def final_heldout(self) -> float | None:
        return self.evals[-1]["heldout_loss"] if self.evals else None


def lr_factor(step: int, *, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to min_ratio at `steps`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_factor(step: int, schedule: dict, *, warmup: int, min_ratio: float) -> float:
    """The learning-rate factor of a run that may have been extended (--extend-to).

    schedule = {"steps": the first plan's steps, "extensions": [{"start", "end", "factor"}, ...]}.
    Before the first extension the first plan's warm-up and cosine hold; from an extension's start
    the factor decays on a cosine from where it stood then (`factor`) to min_ratio at its end. A
    finished run stood at the floor, so its extension trains at the floor; a run stopped early
    (--stop-after) has the rest of its decay stretched to the new end.
    """
    for ext in reversed(schedule["extensions"]):
        if step >= ext["start"]:
            progress = min(1.0, (step - ext["start"]) / max(1, ext["end"] - ext["start"]))
            return min_ratio + (ext["factor"] - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr_factor(step, steps=schedule["steps"], warmup=warmup, min_ratio=min_ratio)


def _is_extension(e) -> bool:
    ints = isinstance(e, dict) and all(type(e.get(k)) is int and e[k] >= 0 for k in ("start", "end"))
    return ints and type(e.get("factor")) in (int, float) and math.isfinite(e["factor"]) and e["start"] <= e["end"]


def extended_schedule(cfg: TrainConfig, state: dict, path: str) -> tuple[TrainConfig, dict]:
    """(config, schedule) of a resumed run: as saved, or extended to cfg.extend_to from the saved step."""
    saved_steps = state["trajectory"].get("steps")
    schedule = state.get("schedule") or {"steps": saved_steps, "extensions": []}
    if not (
        isinstance(schedule, dict)
        and isinstance(schedule.get("steps"), int)
        and isinstance(schedule.get("extensions"), list)
        and all(_is_extension(e) for e in schedule["extensions"])
    ):
        raise ValueError(f"{path}: the saved learning-rate schedule is not a tli schedule")
    if cfg.extend_to is None:
        return cfg, schedule
    if not isinstance(saved_steps, int) or cfg.extend_to < saved_steps:
        raise ValueError(
            f"--extend-to {cfg.extend_to}: the run in {path} is planned for {saved_steps} steps; extend it past that"
        )
    if cfg.extend_to > saved_steps:  # == saved_steps: this extension was made before (an interrupted one resumes)
        step = state["step"]
        factor = schedule_factor(step, schedule, warmup=cfg.warmup, min_ratio=cfg.min_lr_ratio)
        extension = {"start": step, "end": cfg.extend_to, "factor": factor}
        schedule = {**schedule, "extensions": [*schedule["extensions"], extension]}
    return dataclasses.replace(cfg, steps=cfg.extend_to), schedule


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, T, V] against ids [B, T], in fp32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# ----------------------------------------------------------------------------------- building
def _apply_kernels(lm, layers: list[int], learnable: bool) -> None:
    try:
        from tli_kernels.integrations.hf import apply_tli_kernels
    except ImportError as e:
        raise RuntimeError(f"--kernels: the tli kernels are not available in this install ({e})") from e
    apply_tli_kernels(lm, residual_scales={i: 1.0 for i in layers}, learnable_alpha=learnable)


def _freeze(trainee: Trainee, train: str, injected: list[int]) -> None:
    if train == "all":
        return
    layers = decoder_layers(trainee.lm)
    for p in trainee.parameters():
        p.requires_grad_(False)
    for i in injected:
        for p in layers[i].parameters():
            p.requires_grad_(True)
    for p in alpha_parameters(trainee).values():
        p.requires_grad_(True)


def _optimizer(trainee: Trainee, cfg: TrainConfig) -> torch.optim.Optimizer:
    alphas = {id(p) for p in alpha_parameters(trainee).values()}
    decay, no_decay, alpha = [], [], []
    for p in trainee.parameters():
        if not p.requires_grad:
            continue
        (alpha if id(p) in alphas else decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
        {"params": alpha, "weight_decay": 0.0, "lr": cfg.effective_alpha_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), foreach=True)


def _rng_state() -> dict:
    """RNG states as JSON (base64 bytes): nothing is unpickled on resume."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [name, base64.b64encode(keys.astype("<u4").tobytes()).decode(), pos, has_gauss, gauss],
    }


def _decode_rng_state(state: dict) -> tuple:
    """(torch, cuda, python, numpy) states from _rng_state's JSON, each checked as its setter needs
    it (so an edited file is refused naming it, before anything is restored)."""
    if not isinstance(state, dict):
        raise TypeError("not a mapping")
    cpu = _unb64(state["torch"])
    if cpu.numel() != torch.get_rng_state().numel():
        raise ValueError(f"torch state of {cpu.numel()} bytes")
    cuda = [_unb64(s) for s in state["cuda"]]
    version, internal, gauss_next = state["python"]
    python = (version, tuple(internal), gauss_next)
    random.Random().setstate(python)  # checks it without touching the global generator
    name, keys, pos, has_gauss, gauss = state["numpy"]
    numpy_state = (name, np.frombuffer(base64.b64decode(keys, validate=True), dtype="<u4").copy(), pos, has_gauss,
                   gauss)  # fmt: skip
    np.random.RandomState().set_state(numpy_state)
    return cpu, cuda, python, numpy_state


def _set_rng_state(state: dict) -> None:
    cpu, cuda, python, numpy_state = _decode_rng_state(state)
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    np.random.set_state(numpy_state)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    raw = base64.b64decode(text, validate=True)
    if not raw:
        raise ValueError("an empty state")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


# --------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def heldout_loss(trainee: Trainee, windows: torch.Tensor, runtime: distributed.Runtime, batch: int, autocast) -> float:
    """Mean next-token loss over all windows; ranks split the windows and run the same number of
    forwards (FSDP2 gathers weights collectively), a rank short of windows scoring none."""
    trainee.eval()
    mine = windows[runtime.rank :: runtime.world]
    rounds = math.ceil(math.ceil(windows.shape[0] / runtime.world) / batch)
    total, count = 0.0, 0
    for r in range(rounds):
        x = mine[r * batch : (r + 1) * batch]
        real = x.shape[0] > 0
        x = (x if real else windows[:1]).to(runtime.device)
        with autocast():
            logits = trainee(x)
        if real:
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum").item()
            count += x[:, 1:].numel()
    total, count = runtime.sum([total, float(count)])
    trainee.train()
    return total / count


# ------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) continued pretraining; see the module docstring."""
    runtime = distributed.setup(cfg.device)
    ok = False
    try:
        with contextlib.ExitStack() as held:
            result = _train(cfg, runtime, held)
        ok = True
        return result
    finally:
        runtime.close(ok=ok)


def _lock_output(output: str, runtime: distributed.Runtime, held: contextlib.ExitStack) -> None:
    """One run per output folder (rank 0 holds a flock on it until the run ends): a second `tli train
    -o` of the same folder, or a second --resume of it, is refused at once, naming the holder."""
    if runtime.main:
        folder = OutputDir(output)
        held.callback(folder.close)
        folder.lock()


def _train(cfg: TrainConfig, runtime: distributed.Runtime, held: contextlib.ExitStack) -> TrainResult:
    cfg.check(runtime.world)
    if not os.path.isdir(cfg.model):
        raise FileNotFoundError(f"MODEL {cfg.model}: no such folder")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.progress:
        _quiet_transformers()
    started = time.perf_counter()
    cuda = runtime.device.type == "cuda"
    if cfg.kernels and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"--kernels: the tli Triton kernels need a CUDA device, and this run is on {runtime.device.type} (on a "
            "CPU they run only in Triton's interpreter, TRITON_INTERPRET=1, which is for tests: very slow)"
        )
    if cfg.output:
        agree(runtime, lambda: checkpoints.check_output_writable(cfg.output) if runtime.main else None)
        agree(runtime, _lock_output, cfg.output, runtime, held)
        agree(runtime, _check_output_shared, cfg.output, runtime)

    # Everything about the model comes from its plan (headers only): nothing is read yet.
    source = agree(runtime, open_source, cfg.model, cfg.method, cfg.method_options, seed=cfg.init_seed)
    _check_same_plan(source, runtime)
    if cfg.method == "dus" and not cfg.allow_shrink:
        from tli_kernels.cli.main import shrink_note

        shrink = shrink_note(source.plan, source.layout, cfg.method)
        if shrink:
            raise ValueError(f"{shrink}; pass --allow-shrink if that is what you want")
    resume_from = checkpoints.latest_checkpoint(cfg.output) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise ValueError(f"--resume: no complete checkpoint (step-NNNNNN/{checkpoints.MANIFEST_FILE}) in {cfg.output}")
    state = agree(runtime, _verified_state, resume_from, runtime) if resume_from else None
    schedule = {"steps": cfg.steps, "extensions": []}
    if state is not None:
        extending = cfg.extend_to is not None
        cfg, schedule = extended_schedule(cfg, state, resume_from)
        _check_resumable(cfg, state, runtime.world, resume_from, source, extending=extending)

    provenance = source.provenance
    injected = checkpoints.injected_layers(provenance)
    if (cfg.train == "injected" or cfg.learnable_alpha) and not injected:
        what = "--train injected" if cfg.train == "injected" else "--learnable-alpha"
        raise ValueError(f"{what}: {cfg.model} has no injected layers (its {checkpoints.PROVENANCE_FILE} lists none)")

    tokenizer = None if _only_token_ids(cfg) else _tokenizer(source)
    accum = cfg.accumulation(runtime.world)
    data = agree(runtime, _training_data, cfg, tokenizer, runtime, source)

    lm = build_meta_model(source.config)
    learnable = injected if cfg.learnable_alpha else []
    if cfg.kernels:
        _apply_kernels(lm, learnable, bool(learnable))
    if cfg.activation_checkpointing:
        enable_checkpointing(lm)
    trainee = Trainee(lm, [] if cfg.kernels else learnable)
    _freeze(trainee, cfg.train, injected)
    if runtime.distributed:
        distributed.shard(trainee, runtime, bf16=cuda)
    materialize(trainee, runtime.device)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and not runtime.distributed else (_no_autocast)
    )

    optimizer = _optimizer(trainee, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: schedule_factor(s, schedule, warmup=cfg.warmup, min_ratio=cfg.min_lr_ratio),
    )
    result = TrainResult(main_process=runtime.main)
    start = 0
    bytes_read = 0
    if state is not None:
        state_files = {n[len(checkpoints.STATE_DIR) + 1 :] for n in state["_listed"]
                       if n.startswith(checkpoints.STATE_DIR + "/")}  # fmt: skip
        distributed.load_state(trainee, optimizer, os.path.join(resume_from, checkpoints.STATE_DIR), state_files)
        _set_alphas(trainee, {int(i): a for i, a in state["alphas"].items()})
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = state["step"]
        result.history, result.evals = list(state["history"]), list(state["evals"])
        data.restore(state.get("data"))
    else:
        bytes_read = agree(runtime, fill_from_plan, trainee.lm, source)
        _set_alphas(trainee, {i: 1.0 for i in alpha_parameters(trainee)})

    heldout = data.heldout
    global_batch = cfg.micro_batch * accum * runtime.world
    tokens_per_step = global_batch * cfg.seq_len
    end = cfg.stop_after or cfg.steps
    trainable = [p for p in trainee.parameters() if p.requires_grad]
    described = {
        "train_data": data.name,
        "train_windows": data.num_windows,
        "heldout_data": data.heldout_name if heldout is not None else None,
        "heldout_tokens": int(heldout.numel()) if heldout is not None else 0,
        "data_split": data.split,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "tokens_per_step": tokens_per_step,
        "upscaled_on_load": source.method is not None,
    }
    if runtime.main:
        logger.info("training %s: %s (read %d source bytes on rank 0)", cfg.model, described, bytes_read)

    def evaluate(step: int) -> None:
        if heldout is None:
            return
        loss = heldout_loss(trainee, heldout, runtime, cfg.eval_batch, autocast)
        result.evals.append({"step": step, "tokens": step * tokens_per_step, "heldout_loss": loss})

    def save(step: int, final: bool) -> None:
        export = cfg.export == "every" or (cfg.export == "final" and final)
        result.checkpoint = _save(cfg, runtime, trainee, optimizer, scheduler, source, data, result, step,
                                  described, export, schedule)  # fmt: skip

    trainee.train()
    if start == 0:
        evaluate(0)
    bar = _bar(cfg, runtime, start, end)
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            losses = []
            for micro in range(accum):
                if runtime.distributed:
                    trainee.set_requires_gradient_sync(micro == accum - 1)
                x = data.batch(step, micro, micro_batch=cfg.micro_batch, accum=accum,
                               rank=runtime.rank, world=runtime.world).to(runtime.device)  # fmt: skip
                with autocast():
                    logits = trainee(x)
                loss = lm_loss(logits, x)
                (loss / accum).backward()
                losses.append(loss.detach())
            grad_norm = _clip(trainable, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            entry = {
                "step": done,
                "tokens": done * tokens_per_step,
                "loss": runtime.mean(torch.stack(losses).mean()),
                "lr": lr,
                "grad_norm": grad_norm,
                "seconds": time.perf_counter() - t0,
            }
            if not math.isfinite(entry["loss"]):
                raise RuntimeError(f"step {done}: the training loss is {entry['loss']}; stopping (nothing saved)")
            result.history.append(entry)
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                evaluate(done)
            if bar is not None:
                post = {"loss": f"{entry['loss']:.3f}", "tok/s": f"{tokens_per_step / entry['seconds']:.0f}"}
                if result.evals and result.evals[-1]["step"] == done:
                    post["heldout"] = f"{result.evals[-1]['heldout_loss']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if cfg.output and ((cfg.save_every and done % cfg.save_every == 0) or done == end):
                save(done, final=done == end)
    finally:
        if bar is not None:
            bar.close()
    result.alphas = {i: scalar(p) for i, p in alpha_parameters(trainee).items()}
    result.steps_done = end
    result.seconds = time.perf_counter() - started
    result.bytes_read = bytes_read
    return result


def enable_checkpointing(lm) -> None:
    """Recompute each decoder layer in backward (non-reentrant, which FSDP2 and hooks work with)."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def _quiet_transformers() -> None:
    """--quiet: no progress bars or info lines from transformers / huggingface_hub either."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _check_output_shared(output: str, runtime: distributed.Runtime) -> None:
    """Every rank must see OUTPUT (DCP and the export write one folder from all ranks)."""
    if not runtime.distributed:
        return
    token = os.path.join(output, ".tli-shared-check")
    if runtime.main:
        checkpoints.write_json(token, {"pid": os.getpid()})
    runtime.barrier()
    seen = os.path.isfile(token)
    runtime.barrier()
    if runtime.main:
        os.unlink(token)
    if not seen:
        raise ValueError(f"--output {output}: not visible from rank {runtime.rank}; it must be on a shared file system")


def _check_same_plan(source: ModelSource, runtime: distributed.Runtime) -> None:
    if not runtime.distributed:
        return
    digests: list = [None] * runtime.world
    dist.all_gather_object(digests, source.digest())
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"the ranks read different checkpoints at {source.path} (plan digests {sorted(set(digests))})"
        )


def _tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    folder = source.layout.path
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(folder)


def _only_token_ids(cfg: TrainConfig) -> bool:
    """Training and held-out data are both token ids: no tokenizer needed (a folder may have none)."""
    from tli_kernels.training.data import is_token_file

    return is_token_file(cfg.data_file) and (not cfg.eval_tokens or is_token_file(cfg.eval_data_file))


def _training_data(cfg: TrainConfig, tokenizer, runtime: distributed.Runtime, source: ModelSource):
    from tli_kernels.training.data import TrainingData

    return TrainingData.open(
        tokenizer,
        text_file=cfg.text_file,
        data_file=cfg.data_file,
        eval_text_file=cfg.eval_text_file,
        eval_data_file=cfg.eval_data_file,
        text_field=cfg.text_field,
        heldout_fraction=cfg.heldout_fraction,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        eval_tokens=cfg.eval_tokens,
        global_batch=cfg.micro_batch * cfg.accumulation(runtime.world) * runtime.world,
        vocab_size=int(source.config.get("vocab_size") or 0),
        rank=runtime.rank,
        world=runtime.world,
        micro_batch=cfg.micro_batch,
    )


def _clip(params: list[torch.Tensor], max_norm: float) -> float | None:
    if not max_norm:
        return None
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm.item())


def _bar(cfg: TrainConfig, runtime: distributed.Runtime, start: int, end: int):
    if not (cfg.progress and runtime.main):
        return None
    from tqdm import tqdm

    return tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _set_alphas(trainee: Trainee, values: dict[int, float]) -> None:
    """Give every learnable alpha its value (1 at the start: the checkpoint already holds the old alpha)."""
    params = alpha_parameters(trainee)
    if set(values) != set(params):
        raise ValueError(f"the checkpoint has learnable alpha on layers {sorted(values)}, this run on {sorted(params)}")
    with torch.no_grad():
        for i, p in params.items():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.fill_(float(values[i]))


def _verified_state(path: str, runtime: distributed.Runtime) -> dict:
    """The checkpoint's state after every file's sha256 matched its manifest (ranks split the files)."""
    manifest = checkpoints.read_manifest(path)
    names = sorted(manifest["files"])
    checkpoints.check_listed(path, manifest)
    checkpoints.verify_files(path, manifest, names[runtime.rank :: runtime.world])
    if checkpoints.STATE_FILE not in manifest["files"]:
        raise ValueError(f"{path}: the manifest lists no {checkpoints.STATE_FILE}")
    state_path = os.path.join(path, checkpoints.STATE_FILE)
    state = checkpoints.read_json(state_path)
    required = {"format": int, "step": int, "trajectory": dict, "scheduler": dict, "rng": dict, "alphas": dict,
                "history": list, "evals": list, "plan_sha256": str}  # fmt: skip
    for key, kind in required.items():
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{state_path}: {key!r} missing or not a {kind.__name__}; not a tli training state")
    if state["format"] != STATE_FORMAT:
        raise ValueError(f"{state_path}: format {state['format']}, this tli reads {STATE_FORMAT}")
    if manifest.get("plan_sha256") != state["plan_sha256"]:
        raise ValueError(f"{state_path}: its plan differs from the one its manifest records; not saved together")
    saved_at = int(os.path.basename(os.path.normpath(path)).partition("-")[2] or -1)
    if state["step"] < 1 or state["step"] != manifest.get("step") or state["step"] != saved_at:
        raise ValueError(
            f"{state_path}: step {state['step']}, but the checkpoint is {os.path.basename(path)} (manifest step "
            f"{manifest.get('step')}); not the state tli saved there"
        )
    bad = [k for k, v in state["alphas"].items() if not k.isdigit() or not is_number(v) or not math.isfinite(v)]
    if bad:
        raise ValueError(f"{state_path}: alphas entry {bad[0][:40]!r} is not a layer index with a finite number")
    sched = state["scheduler"]
    if sched.get("last_epoch") != state["step"] or not (
        isinstance(sched.get("base_lrs"), list) and sched["base_lrs"] and all(is_number(x) for x in sched["base_lrs"])
    ):
        raise ValueError(
            f"{state_path}: 'scheduler' is not the learning-rate schedule tli saves at step {state['step']}"
        )
    for key in ("history", "evals"):
        if not all(isinstance(e, dict) and is_number(e.get("step")) for e in state[key]):
            raise ValueError(f"{state_path}: {key!r} holds an entry that is not a step record")
    try:
        _decode_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, IndexError, binascii.Error) as e:
        raise ValueError(
            f"{state_path}: 'rng' is not the random-number state tli saves ({type(e).__name__}: {str(e)[:80]})"
        ) from None
    state["_listed"] = names
    return state


def _check_resumable(
    cfg: TrainConfig, state: dict, world: int, path: str, source: ModelSource, extending: bool = False
) -> None:
    saved, now = state["trajectory"], cfg.trajectory(world)
    fields = [k for k in TRAJECTORY_FIELDS if not (extending and k == "steps")]  # the one thing --extend-to changes
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in fields if saved.get(k) != now[k]]
    if changed:
        hint = ""
        if any(c.startswith("global_batch") for c in changed):
            hint = " (on another world size keep the global batch: --global-batch, or --accum x world x --micro-batch)"
        steps = saved.get("steps")
        if any(c.startswith("steps") for c in changed) and isinstance(steps, int) and now["steps"] > steps:
            hint += (
                f" (to continue a run past its {steps} planned steps: --resume --extend-to {now['steps']}, without "
                f"--steps; the learning rate then decays from where it stands to the floor at step {now['steps']})"
            )
        raise ValueError(
            f"--resume from {path}: these settings differ from the run being resumed, which would change "
            f"its loss curve: {'; '.join(changed)}{hint}"
        )
    if state["plan_sha256"] != source.digest():
        raise ValueError(
            f"--resume from {path}: MODEL {cfg.model} (with its method options) is not the model this run started "
            f"from (plan {state['plan_sha256'][:12]}, now {source.digest()[:12]})"
        )
    if state["step"] >= (cfg.stop_after or cfg.steps):
        raise ValueError(
            f"--resume from {path}: it has already done {state['step']} of {cfg.stop_after or cfg.steps} steps "
            f"(to train on: --resume --extend-to N)"
        )


def _save(cfg, runtime, trainee, optimizer, scheduler, source, data, result, step, described, export, schedule) -> str:
    """Write OUTPUT/step-N (via step-N.tmp): DCP state from every rank, the JSON state, optionally the
    HF export, and last the manifest with every file's sha256. Nothing is renamed into place unless
    all of it was written, so --resume never sees a half-written checkpoint."""
    params = alpha_parameters(trainee)
    alphas = {i: scalar(p) for i, p in params.items()}  # collective under FSDP2: every rank calls it
    final = checkpoints.step_dir(cfg.output, step)
    tmp = final + checkpoints.TMP_SUFFIX
    provenance = source.provenance
    base = checkpoints.base_scales(provenance)

    def prepare() -> None:
        if runtime.main:
            checkpoints.remove_quietly(tmp)
            os.makedirs(tmp)

    agree(runtime, prepare)
    try:
        distributed.save_state(trainee, optimizer, os.path.join(tmp, checkpoints.STATE_DIR))
        training = {
            "tool": "tli_kernels",
            "version": __version__,
            "base_model": os.path.abspath(cfg.model),
            "method": cfg.method,
            "method_options": cfg.method_options,
            "step": step,
            "tokens": step * described["tokens_per_step"],
            "config": dataclasses.asdict(cfg),
            "world_size": runtime.world,
            **described,
            "alpha_multipliers": {str(i): a for i, a in alphas.items()},
            "evals": result.evals,
            "last_loss": result.history[-1]["loss"] if result.history else None,
        }
        if export:
            new_provenance = None
            if provenance is not None:
                effective = {i: base.get(i, 1.0) * alphas.get(i, 1.0) for i in checkpoints.injected_layers(provenance)}
                new_provenance = {
                    **provenance,
                    "residual_scales": {str(i): a for i, a in effective.items()},
                    "alpha_folded": True,
                    "trained_steps": step,
                }
            export_model(trainee.lm, source, tmp, runtime, scales=alphas, provenance=new_provenance,
                         extra_json={checkpoints.TRAINING_FILE: training}, dtype=cfg.save_dtype,
                         training=training)  # fmt: skip
        data_state = data.state(step)

        def finish() -> None:
            if not runtime.main:
                return
            state = {
                "format": STATE_FORMAT,
                "step": step,
                "trajectory": cfg.trajectory(runtime.world),
                "plan_sha256": source.digest(),
                "scheduler": scheduler.state_dict(),
                "schedule": schedule,
                "rng": _rng_state(),
                "data": data_state,
                "alphas": {str(i): a for i, a in alphas.items()},
                "history": result.history,
                "evals": result.evals,
                "exported": bool(export),
            }
            checkpoints.write_json(os.path.join(tmp, checkpoints.STATE_FILE), state)
            if not export:
                checkpoints.write_json(os.path.join(tmp, checkpoints.TRAINING_FILE), training)
            names = [os.path.relpath(os.path.join(r, f), tmp) for r, _, fs in os.walk(tmp) for f in fs]
            files = checkpoints.describe_files(tmp, sorted(names))
            checkpoints.write_manifest(tmp, step, files, source.digest())
            checkpoints.replace_dir(tmp, final)
            checkpoints.write_json(
                os.path.join(cfg.output, "history.json"), {"steps": result.history, "evals": result.evals}
            )

        agree(runtime, finish)
    except BaseException:
        if runtime.main:
            checkpoints.remove_quietly(tmp)
        raise
    return final
