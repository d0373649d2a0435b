"""`tli train` as a library call: continued pretraining of an (upscaled) Hugging Face causal LM.

AdamW (decay on matrices only) with linear warm-up and cosine decay to `min_lr_ratio`, gradient
accumulation, gradient clipping, bf16 autocast on GPU (fp32 master weights), optional learnable
residual scales on the injected layers, held-out loss every `eval_every` steps, checkpoints in HF
format with alpha folded, exact resume. Under torchrun the model is sharded with FSDP2; a step of
A accumulated micro-batches on one process sees the same windows as A ranks without accumulation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tli_kernels import __version__
from tli_kernels.training import checkpoints, distributed
from tli_kernels.training.data import WindowOrder, heldout_ids, training_ids
from tli_kernels.training.residual import (
    Trainee,
    alpha_parameters,
    branch_weights,
    decoder_layers,
    fold_into_state_dict,
    scalar,
)

logger = logging.getLogger(__name__)

TRAIN_CHOICES = ("all", "injected")
# Fields that fix the loss curve: a resumed run must keep them (the rest may change between runs).
TRAJECTORY_FIELDS = (
    "seq_len", "global_batch", "steps", "lr", "min_lr_ratio", "warmup", "weight_decay", "beta1", "beta2",
    "max_grad_norm", "train", "learnable_alpha", "alpha_lr", "seed", "text_file", "data_file",
)  # fmt: skip


@dataclass
class TrainConfig:
    model: str
    output: str | None = None  # checkpoints go to OUTPUT/step-NNNNNN; None: train and keep nothing
    text_file: str | None = None  # training text (default: the King James train split)
    data_file: str | None = None  # or pre-tokenised ids (.npy / .pt)
    eval_text_file: str | None = None  # held-out text (default: the King James held-out split)
    eval_data_file: str | None = None
    seq_len: int = 256
    micro_batch: int = 4
    accum: int = 1
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
    eval_every: int = 50  # 0: evaluate only at the start and the end
    eval_tokens: int = 8192
    eval_batch: int = 8
    save_every: int = 0  # 0: save only at the end
    stop_after: int | None = None  # end this run after this step (a later --resume finishes)
    resume: bool = False
    seed: int = 0
    kernels: bool = False
    device: str = "auto"
    threads: int | None = None
    progress: bool = True

    def check(self, world: int = 1) -> None:
        for name in ("seq_len", "micro_batch", "accum", "steps", "eval_batch"):
            if getattr(self, name) < (2 if name == "seq_len" else 1):
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: too small")
        for name in ("warmup", "eval_every", "save_every", "eval_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must not be negative")
        if not self.lr > 0 or (self.alpha_lr is not None and not self.alpha_lr > 0):
            raise ValueError(f"--lr {self.lr} / --alpha-lr {self.alpha_lr}: must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio {self.min_lr_ratio}: must be between 0 and 1")
        if self.train not in TRAIN_CHOICES:
            raise ValueError(f"--train {self.train!r}: choose one of {', '.join(TRAIN_CHOICES)}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(f"--stop-after {self.stop_after}: must be between 1 and --steps {self.steps}")
        if self.resume and not self.output:
            raise ValueError("--resume needs --output (where the checkpoints are)")
        if self.eval_tokens and self.eval_tokens < self.seq_len:
            raise ValueError(f"--eval-tokens {self.eval_tokens}: less than one window of --seq-len {self.seq_len}")

    def trajectory(self, world: int) -> dict:
        values = dataclasses.asdict(self)
        values["global_batch"] = self.micro_batch * self.accum * world
        values["alpha_lr"] = self.effective_alpha_lr
        return {k: values[k] for k in TRAJECTORY_FIELDS}

    @property
    def effective_alpha_lr(self) -> float:
        return self.alpha_lr if self.alpha_lr is not None else 100 * self.lr


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # {"step", "tokens", "loss", "lr", ...} per step
    evals: list[dict] = field(default_factory=list)  # {"step", "tokens", "heldout_loss"}
    checkpoint: str | None = None
    alphas: dict[int, float] = field(default_factory=dict)  # learnt multipliers (1 = unchanged)
    steps_done: int = 0
    seconds: float = 0.0
    main_process: bool = True  # False on ranks other than 0 of a distributed run

    @property
    def final_heldout(self) -> float | None:
        return self.evals[-1]["heldout_loss"] if self.evals else None


def lr_factor(step: int, *, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to min_ratio at `steps`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, T, V] against ids [B, T], in fp32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# ----------------------------------------------------------------------------------- building
def _load(path: str, runtime: distributed.Runtime):
    from tli_kernels.evaluation import load_causal_lm

    lm, tokenizer = load_causal_lm(path, dtype=torch.float32)
    return lm, tokenizer


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
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


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
    try:
        return _train(cfg, runtime)
    finally:
        runtime.close()


def _train(cfg: TrainConfig, runtime: distributed.Runtime) -> TrainResult:
    cfg.check(runtime.world)
    if not os.path.isdir(cfg.model):
        raise FileNotFoundError(f"MODEL {cfg.model}: no such folder")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    cuda = runtime.device.type == "cuda"

    resume_from = checkpoints.latest_checkpoint(cfg.output) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise ValueError(f"--resume: no complete checkpoint (step-NNNNNN/{checkpoints.STATE_FILE}) in {cfg.output}")
    state = checkpoints.read_state(resume_from) if resume_from else None
    if state is not None:
        _check_resumable(cfg, state, runtime.world, resume_from)

    provenance = (
        state["base_provenance"]
        if state
        else checkpoints.read_json(os.path.join(cfg.model, checkpoints.PROVENANCE_FILE))
    )
    injected = checkpoints.injected_layers(provenance)
    if (cfg.train == "injected" or cfg.learnable_alpha) and not injected:
        what = "--train injected" if cfg.train == "injected" else "--learnable-alpha"
        raise ValueError(f"{what}: {cfg.model} has no injected layers (its {checkpoints.PROVENANCE_FILE} lists none)")

    lm, tokenizer = _load(resume_from or cfg.model, runtime)
    learnable = injected if cfg.learnable_alpha else []
    if cfg.kernels:
        _apply_kernels(lm, learnable, bool(learnable))
    trainee = Trainee(lm, [] if cfg.kernels else learnable)
    if state is not None:
        _restore_alphas(trainee, state)
    _freeze(trainee, cfg.train, injected)
    trainee.to(runtime.device)
    if runtime.distributed:
        distributed.shard(trainee, runtime, bf16=cuda)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and not runtime.distributed else (_no_autocast)
    )

    optimizer = _optimizer(trainee, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, steps=cfg.steps, warmup=cfg.warmup, min_ratio=cfg.min_lr_ratio),
    )
    result = TrainResult(main_process=runtime.main)
    start = 0
    if state is not None:
        distributed.load_optimizer_state(trainee, optimizer, state["optimizer"], runtime)
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = state["step"]
        result.history, result.evals = list(state["history"]), list(state["evals"])

    train_ids, train_name = training_ids(tokenizer, text_file=cfg.text_file, data_file=cfg.data_file)
    order = WindowOrder(train_ids, cfg.seq_len, cfg.seed)
    heldout = None
    if cfg.eval_tokens:
        from tli_kernels.evaluation import windows

        ids, heldout_name = heldout_ids(tokenizer, text_file=cfg.eval_text_file, data_file=cfg.eval_data_file)
        heldout = windows(ids, cfg.seq_len, cfg.eval_tokens)
    global_batch = cfg.micro_batch * cfg.accum * runtime.world
    tokens_per_step = global_batch * cfg.seq_len
    end = cfg.stop_after or cfg.steps
    trainable = [p for p in trainee.parameters() if p.requires_grad]
    described = {
        "train_data": train_name,
        "train_windows": order.num_windows,
        "heldout_data": heldout_name if heldout is not None else None,
        "heldout_tokens": int(heldout.numel()) if heldout is not None else 0,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "tokens_per_step": tokens_per_step,
    }
    if runtime.main:
        logger.info("training %s: %s", cfg.model, described)

    def evaluate(step: int) -> None:
        if heldout is None:
            return
        loss = heldout_loss(trainee, heldout, runtime, cfg.eval_batch, autocast)
        result.evals.append({"step": step, "tokens": step * tokens_per_step, "heldout_loss": loss})

    def save(step: int) -> None:
        result.checkpoint = _save(cfg, runtime, trainee, optimizer, scheduler, tokenizer, provenance, result, step,
                                  described)  # fmt: skip

    trainee.train()
    if start == 0:
        evaluate(0)
    bar = _bar(cfg, runtime, start, end)
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            losses = []
            for micro in range(cfg.accum):
                if runtime.distributed:
                    trainee.set_requires_gradient_sync(micro == cfg.accum - 1)
                x = order.batch(step, micro, micro_batch=cfg.micro_batch, accum=cfg.accum,
                                rank=runtime.rank, world=runtime.world).to(runtime.device)  # fmt: skip
                with autocast():
                    logits = trainee(x)
                loss = lm_loss(logits, x)
                (loss / cfg.accum).backward()
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
                save(done)
    finally:
        if bar is not None:
            bar.close()
    result.alphas = {i: scalar(p) for i, p in alpha_parameters(trainee).items()}
    result.steps_done = end
    result.seconds = time.perf_counter() - started
    return result


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


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


def _restore_alphas(trainee: Trainee, state: dict) -> None:
    """Put back the multipliers and the unfolded branch weights of learnable-alpha layers."""
    params = alpha_parameters(trainee)
    saved = {int(i): a for i, a in state["alphas"].items()}
    if set(saved) != set(params):
        raise ValueError(f"the checkpoint has learnable alpha on layers {sorted(saved)}, this run on {sorted(params)}")
    with torch.no_grad():
        for i, p in params.items():
            p.fill_(saved[i])
        missing, unexpected = trainee.lm.load_state_dict(state["branch_weights"], strict=False)
        if unexpected:
            raise ValueError(f"the checkpoint's branch weights do not fit the model: {unexpected[:3]}")


def _check_resumable(cfg: TrainConfig, state: dict, world: int, path: str) -> None:
    saved, now = state["trajectory"], cfg.trajectory(world)
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in TRAJECTORY_FIELDS if saved.get(k) != now[k]]
    if changed:
        raise ValueError(
            f"--resume from {path}: these settings differ from the run being resumed, which would change "
            f"its loss curve: {'; '.join(changed)}"
        )
    if state["step"] >= (cfg.stop_after or cfg.steps):
        raise ValueError(
            f"--resume from {path}: it has already done {state['step']} of {cfg.stop_after or cfg.steps} steps"
        )


def _save(cfg, runtime, trainee, optimizer, scheduler, tokenizer, provenance, result, step, described) -> str:
    # The kernels' state-dict hook warns when alpha != 1 is left out of the state dict; here it is
    # folded into the copy below, so the warning would mislead.
    kernels_log = logging.getLogger("tli_kernels.modules.decoder_layer")
    level = kernels_log.level
    kernels_log.setLevel(logging.ERROR)
    try:
        model_state, optim_state = distributed.full_state_dicts(trainee, optimizer, runtime)
    finally:
        kernels_log.setLevel(level)
    params = alpha_parameters(trainee)
    alphas = {i: scalar(p) for i, p in params.items()}  # collective under FSDP2: every rank calls it
    path = checkpoints.step_dir(cfg.output, step)
    if runtime.main:
        lm_state = {
            k[len("lm.") :]: v for k, v in model_state.items() if k.startswith("lm.") and "residual_scale" not in k
        }
        base = checkpoints.base_scales(provenance)
        new_provenance = None
        if provenance is not None:
            effective = {i: base.get(i, 1.0) * alphas.get(i, 1.0) for i in checkpoints.injected_layers(provenance)}
            new_provenance = {
                **provenance,
                "residual_scales": {str(i): a for i, a in effective.items()},
                "alpha_folded": True,
                "trained_steps": step,
            }
        training = {
            "tool": "tli_kernels",
            "version": __version__,
            "base_model": os.path.abspath(cfg.model),
            "step": step,
            "tokens": step * described["tokens_per_step"],
            "config": dataclasses.asdict(cfg),
            "world_size": runtime.world,
            **described,
            "alpha_multipliers": {str(i): a for i, a in alphas.items()},
            "evals": result.evals,
            "last_loss": result.history[-1]["loss"] if result.history else None,
        }
        state = {
            "format": 1,
            "step": step,
            "trajectory": cfg.trajectory(runtime.world),
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "data": {"seed": cfg.seed, "position": step * cfg.micro_batch * cfg.accum * runtime.world},
            "alphas": {str(i): a for i, a in alphas.items()},
            "branch_weights": branch_weights(lm_state, list(params)),
            "base_provenance": provenance,
            "history": result.history,
            "evals": result.evals,
        }
        checkpoints.write_checkpoint(
            path,
            lm=trainee.lm,
            model_state=fold_into_state_dict(lm_state, alphas),
            tokenizer=tokenizer,
            provenance=new_provenance,
            training=training,
            state=state,
        )
        checkpoints.write_json(
            os.path.join(cfg.output, "history.json"), {"steps": result.history, "evals": result.evals}
        )
    runtime.barrier()
    return path
