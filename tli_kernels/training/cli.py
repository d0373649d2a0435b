"""Argument parsing for `tli train` and `tli study`; the work is done by library calls."""

from __future__ import annotations

import argparse
import os
import sys

# The trainer imports torch; the parser must not (it is built for every `tli` command, and
# `tli upscale` should start in a fraction of a second with a small footprint).
TRAIN_CHOICES = ("all", "injected")  # the same as trainer.TRAIN_CHOICES (checked by a test)

TRAIN_DESCRIPTION = """\
Continued pretraining of a model: an upscaled folder, or a source folder upscaled on load
(--method tli --k 2 ...: the same plan as tli upscale, nothing written first). The model is built on
the meta device and each rank reads only its own shards' bytes. Data: --text FILE, --data FILE.npy|.pt
of token ids, or --data with .txt / .jsonl / .parquet files or a datasets folder (tokenised on the fly,
each rank reading its own part); by default the built-in King James train split. Checkpoints in
OUTPUT/step-NNNNNN: sharded training state (torch.distributed.checkpoint, sha256-checked on --resume)
plus, at the end of a run, a Hugging Face export (alpha folded). --resume continues the newest one
with the same loss curve, also on another world size (keep --global-batch).
Multi-GPU: torchrun --nproc-per-node 8 -m tli_kernels.cli.main train ... (FSDP2).
--dry-run --world-size N: per-rank memory and bytes read, nothing loaded.
"""
METHODS = ("tli", "dus", "block-expansion", "stack", "passthrough", "moe-upcycle")  # = methods.METHODS (tested)
METHOD_FLAGS = ("k", "init", "alpha", "m", "times", "layers", "experts", "top_k")
STUDY_PRESETS = ("cpu", "gpu", "gpu-window", "gpu-window-smoke")  # = study.PRESETS (tested)


def add_training_parsers(sub: argparse._SubParsersAction) -> None:
    """Register training subcommands; each sets `handler` to a function(args) -> exit code."""
    t = sub.add_parser(
        "train",
        help="continued pretraining of an upscaled model",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("model", metavar="MODEL", help="model folder (e.g. the output of tli upscale)")
    t.add_argument(
        "--output", "-o", metavar="DIR", help="checkpoint folder (without it nothing is saved: a warning says so)"
    )
    u = t.add_argument_group("upscale on load (MODEL is the source; as tli upscale, nothing written)")
    u.add_argument("--method", choices=METHODS, help="upscaling method applied while loading")
    u.add_argument("--k", type=int, help="tli / block-expansion: inject one layer after every K layers")
    u.add_argument("--init", choices=["copy", "average", "zero", "random"], help="tli: injected layer weights")
    u.add_argument("--alpha", type=float, help="tli: residual-branch scale of the injected layers")
    u.add_argument("--m", type=int, help="dus: layers [0, N-m) then [m, N)")
    u.add_argument("--times", type=int, help="stack: repeat the whole stack T times")
    u.add_argument("--layers", help="passthrough: layer list such as 0-15,8-23")
    u.add_argument("--experts", type=int, help="moe-upcycle: experts per layer")
    u.add_argument("--top-k", dest="top_k", type=int, help="moe-upcycle: experts per token")
    u.add_argument(
        "--allow-shrink", action="store_true", help="dus: train a model with fewer layers than MODEL (m > N/2)"
    )
    u.add_argument("--init-seed", type=int, metavar="N", default=0, help="seed of random initialisations (default 0)")
    d = t.add_argument_group("data")
    d.add_argument("--text", dest="text_file", metavar="FILE", help="training text (default: King James train split)")
    d.add_argument(
        "--data",
        dest="data_file",
        metavar="PATH",
        help="token ids (.npy / .pt), or documents: .txt, .jsonl, .parquet, a folder of them, or a datasets folder",
    )
    d.add_argument("--text-field", default="text", help="JSONL / Parquet / datasets field of the text (default text)")
    d.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.01,
        metavar="X",
        help="share of --data documents held out for evaluation (its end; default 0.01)",
    )
    d.add_argument("--eval-text", dest="eval_text_file", metavar="FILE", help="held-out text")
    d.add_argument("--eval-data", dest="eval_data_file", metavar="FILE", help="held-out token ids (.npy / .pt)")
    d.add_argument("--seq-len", type=int, metavar="N", default=256, help="tokens per window (default 256)")
    d.add_argument("--seed", type=int, metavar="N", default=0, help="data order seed (default 0)")
    o = t.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, metavar="N", default=100, help="optimizer steps (default 100)")
    o.add_argument(
        "--micro-batch", type=int, metavar="N", default=4, help="windows per forward per process (default 4)"
    )
    o.add_argument("--accum", type=int, metavar="N", default=1, help="gradient accumulation micro-steps (default 1)")
    o.add_argument(
        "--global-batch",
        type=int,
        metavar="N",
        help="windows per optimizer step; sets --accum to N / (micro-batch x world size), which must divide",
    )
    o.add_argument("--lr", type=float, metavar="X", default=1e-4, help="peak learning rate (default 1e-4)")
    o.add_argument("--warmup", type=int, metavar="N", default=10, help="linear warm-up steps (default 10)")
    o.add_argument(
        "--min-lr-ratio", type=float, metavar="X", default=0.1, help="cosine floor as a fraction of --lr (default 0.1)"
    )
    o.add_argument(
        "--weight-decay", type=float, metavar="X", default=0.1, help="AdamW weight decay on matrices (default 0.1)"
    )
    o.add_argument(
        "--max-grad-norm", type=float, metavar="X", default=1.0, help="gradient clipping, 0 for none (default 1)"
    )
    o.add_argument(
        "--train", choices=TRAIN_CHOICES, default="all", help="all layers, or only the injected ones (LLaMA Pro style)"
    )
    o.add_argument("--learnable-alpha", action="store_true", help="learn a residual scale per injected layer")
    o.add_argument(
        "--alpha-lr", type=float, metavar="X", help="learning rate of the residual scales (default 100 x --lr)"
    )
    o.add_argument("--beta1", type=float, metavar="X", default=0.9, help="AdamW beta1 (default 0.9)")
    o.add_argument("--beta2", type=float, metavar="X", default=0.95, help="AdamW beta2 (default 0.95)")
    o.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each layer in backward (saves memory)"
    )
    r = t.add_argument_group("evaluation and checkpoints")
    r.add_argument(
        "--eval-every", type=int, metavar="N", default=50, help="held-out loss every N steps (default 50; 0: ends)"
    )
    r.add_argument("--eval-tokens", type=int, metavar="N", default=8192, help="held-out tokens scored (default 8192)")
    r.add_argument("--eval-batch", type=int, metavar="N", default=8, help="windows per held-out forward (default 8)")
    r.add_argument(
        "--save-every", type=int, metavar="N", default=0, help="checkpoint every N steps (default: at the end only)"
    )
    r.add_argument("--stop-after", type=int, metavar="STEP", help="stop (and save) after STEP; finish with --resume")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    r.add_argument(
        "--extend-to",
        type=int,
        metavar="N",
        help="with --resume: train a finished (or stopped) run on to step N; the learning rate decays on a cosine "
        "from where it stands to the floor at N (a finished run stands at the floor and stays there)",
    )
    r.add_argument(
        "--export",
        choices=["final", "every", "none"],
        default="final",
        help="Hugging Face export into the checkpoint: at the end of each run (default), at every save, or never",
    )
    r.add_argument(
        "--save-dtype", choices=["keep", "fp32", "bf16", "fp16"], default="keep", help="dtype of the exported weights"
    )
    h = t.add_argument_group("hardware")
    h.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    h.add_argument("--kernels", action="store_true", help="use the tli Triton kernels (GPU)")
    h.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    h.add_argument("--quiet", action="store_true", help="no progress bars")
    h.add_argument("--dry-run", action="store_true", help="print per-rank memory and bytes read; load nothing")
    h.add_argument("--world-size", type=int, metavar="N", help="--dry-run: ranks to plan for (default: this run's)")
    t.set_defaults(handler=cmd_train)

    s = sub.add_parser(
        "study",
        help="the quality study: methods x settings, held-out loss before and after training",
        description="Upscale the built-in SmolLM2-135M with every method, train each the same number of steps "
        "on the King James train split and compare held-out loss; writes a markdown table, JSON and a plot.",
    )
    s.add_argument(
        "--preset",
        choices=STUDY_PRESETS,
        default="cpu",
        help="size of the study (default cpu); gpu-window: a base Llama made in the run, for a few GPU minutes "
        "(with --budget-s); gpu-window-smoke: the same on the CPU in under a minute",
    )
    s.add_argument("--workdir", default="build/study", help="models and per-run results (default build/study)")
    s.add_argument("--out", default="docs", help="where the table, JSON and plot go (default docs)")
    s.add_argument("--source", help="source model folder (default: the built-in SmolLM2-135M in WORKDIR)")
    s.add_argument("--runs", help="comma-separated run names to do (default: all of the preset)")
    s.add_argument("--steps", type=int, metavar="N", help="override the preset's training steps")
    s.add_argument("--lr", type=float, metavar="X", help="override the preset's peak learning rate")
    s.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--kernels", action="store_true", help="train with the tli Triton kernels (GPU)")
    s.add_argument("--initial-only", action="store_true", help="only the step-0 losses, no training")
    s.add_argument("--keep-models", action="store_true", help="keep the upscaled models in WORKDIR/models")
    s.add_argument(
        "--budget-s",
        type=float,
        metavar="SECONDS",
        help="time from the start of the command: a run whose estimate does not fit in what is left is skipped "
        "(and recorded); exits 0",
    )
    s.add_argument("--no-plots", action="store_true", help="no PNG plots (the JSON is enough to draw them later)")
    s.set_defaults(handler=cmd_study)


def method_options(args: argparse.Namespace) -> dict:
    """The method's own options given on the command line; a stray one is refused by make_plan."""
    return {k: getattr(args, k) for k in METHOD_FLAGS if getattr(args, k, None) is not None}


def cmd_train(args: argparse.Namespace) -> int:
    if args.quiet:  # before transformers is imported: its bars and hub downloads stay silent
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from tli_kernels.training.trainer import TrainConfig, train

    fields = {f for f in TrainConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    cfg = TrainConfig(**values, method_options=method_options(args), progress=not args.quiet)
    if args.world_size is not None and not args.dry_run:
        raise ValueError("--world-size is for --dry-run (a real run takes its world size from torchrun)")
    if args.dry_run:
        from tli_kernels.training.dry_run import dry_run

        print(dry_run(cfg, world=args.world_size).text())
        return 0
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 speaks
    if not cfg.output and main_rank:
        print(
            f"tli train: no -o/--output, so nothing will be saved: {cfg.steps} steps, then the trained weights are "
            "dropped (Ctrl-C now and add -o DIR to keep them)",
            file=sys.stderr,
        )
    result = train(cfg)
    if not result.main_process:
        return 0
    evals = result.evals
    if evals:
        first, last = evals[0], evals[-1]
        print(
            f"held-out loss {first['heldout_loss']:.4f} at step {first['step']} -> {last['heldout_loss']:.4f} "
            f"at step {last['step']} ({last['tokens']:,} tokens)"
        )
    if result.alphas:
        print("alpha multipliers " + " ".join(f"{i}:{a:.3f}" for i, a in result.alphas.items()))
    if result.checkpoint:
        print(f"checkpoint {result.checkpoint}")
        if evals and cfg.export != "none":
            print("(the held-out loss is of the float32 weights in training; the export, in its saved dtype, "
                  "scores slightly differently: README.md in the checkpoint)")  # fmt: skip
    elif not cfg.output:
        print("nothing was saved (no -o/--output): the trained weights are gone", file=sys.stderr)
    return 0


def cmd_study(
    args: argparse.Namespace, command: str | None = None, environment: dict | None = None, environment_text: str = ""
) -> int:
    import logging
    import shlex
    import sys
    import time

    from tli_kernels.training.study import process_elapsed, run_study

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    doc = run_study(
        preset=args.preset,
        workdir=args.workdir,
        out=args.out,
        source=args.source,
        runs=args.runs.split(",") if args.runs else None,
        steps=args.steps,
        lr=args.lr,
        threads=args.threads,
        device=args.device,
        kernels=args.kernels,
        initial_only=args.initial_only,
        keep_models=args.keep_models,
        command=command or "tli " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        environment=environment,
        environment_text=environment_text or None,
        budget_s=args.budget_s,
        plots=not args.no_plots,
        started=time.monotonic() - process_elapsed(),
    )
    plots = "" if args.no_plots else " and plots"
    print(f"wrote {args.out}/quality_results.md, .json{plots} ({len(doc['trained_order'])} trained runs, "
          f"{len(doc['skipped'])} skipped, {len(doc['failures'])} failed, {len(doc['check_failures'])} failed checks; "
          f"{doc['elapsed_s']:.0f} s)")  # fmt: skip
    return 1 if doc["failures"] or doc["check_failures"] else 0
