"""Training memory at scale-out: peak RSS per rank when loading a model for FSDP2 training on 2 and 4
gloo ranks (CPU, torchrun), the sharded loader against the old full-load path, in one run.

The model: a Llama-shaped checkpoint with random bf16 weights (tli_kernels.checkpoint.synthetic),
upscaled with TLI K=2 so its float32 size is >= 1 GB (default: hidden 1024, intermediate 4096, 12 ->
18 layers, vocab 32000: 339M parameters, 1.36 GB in float32). Jobs, each a torchrun of this file's
worker on N ranks, every rank reporting its own peak RSS (VmHWM) and wall seconds:

- baseline:  import torch + transformers, process group, the model built on the meta device and
             sharded (fully_shard): everything but the weights. The fixed cost of a rank.
- sharded:   the same, then `materialize` + `fill_from_plan` straight from the *source* checkpoint
             through the SurgeryPlan (upscale on load): each rank allocates and reads only its rows.
- full:      the old `tli train` path: every rank loads the whole upscaled checkpoint in float32
             (from_pretrained, from the upscaled folder on disk), then shards it with fully_shard.
- train:     the whole `tli train` run on the sharded path (2 steps at 1 x 32 tokens, a DCP
             checkpoint and the streamed Hugging Face export), for the training state's cost
             (gradients and AdamW moments add 3 float32 copies of the rank's share).

Budget claim checked per rank: sharded peak <= share + budget, where share = float32 model bytes /
N and budget = the baseline job's peak + 64 MiB (the loader's bounded op buffers: 1M elements of
numpy temporaries). Reported next to the full path's peak.

    PYTHONPATH=. python benchmarks/bench_training_memory.py --workdir /work/bench12 --out docs/bench_training_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
BUFFER_BUDGET = 64 * MIB


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ------------------------------------------------------------------------------------- the worker
def worker(mode: str, src: str, upscaled: str, out: str, report: str, data: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    started = time.perf_counter()
    rank = int(os.environ.get("RANK", "0"))
    result: dict = {"rank": rank, "mode": mode}
    if mode == "train":
        from tli_kernels.training.trainer import TrainConfig, train

        cfg = TrainConfig(model=src, method="tli", method_options={"k": 2, "init": "zero"}, output=out,
                          data_file=data, eval_tokens=0, seq_len=32, micro_batch=1, steps=2, warmup=0,
                          progress=False, threads=1, device="cpu")  # fmt: skip
        train(cfg)
    else:
        from tli_kernels.training import distributed
        from tli_kernels.training.residual import Trainee
        from tli_kernels.training.sharded_load import build_meta_model, fill_from_plan, materialize, open_source

        runtime = distributed.setup("cpu")
        if mode == "full":
            from transformers import AutoModelForCausalLM

            lm = AutoModelForCausalLM.from_pretrained(upscaled, dtype=torch.float32)
            trainee = Trainee(lm)
            distributed.shard(trainee, runtime, bf16=False)
        else:
            source = open_source(src, "tli", {"k": 2, "init": "zero"})
            trainee = Trainee(build_meta_model(source.config))
            distributed.shard(trainee, runtime, bf16=False)
            if mode == "sharded":
                materialize(trainee)
                result["bytes_read"] = fill_from_plan(trainee.lm, source)
        local = sum(p.to_local().numel() * 4 for p in trainee.parameters() if hasattr(p, "to_local"))
        result["local_param_bytes"] = local
        dist.barrier()
        runtime.close()
    result["peak_rss"] = vm_hwm()
    result["seconds"] = round(time.perf_counter() - started, 2)
    with open(f"{report}.{rank}.json", "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------------- the driver
def make_models(workdir: str, layers: int, hidden: int, inter: int, vocab: int) -> tuple[str, str, int]:
    from tli_kernels.checkpoint.synthetic import llama_config, write_checkpoint
    from tli_kernels.upscale import upscale

    src, up = os.path.join(workdir, "train-src"), os.path.join(workdir, "train-src-tli")
    config = llama_config("llama-3.2-1b", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=16, num_key_value_heads=4, head_dim=hidden // 16, vocab_size=vocab,
                          tie_word_embeddings=False)  # fmt: skip
    stamp = os.path.join(workdir, "train-src.json")
    if not (os.path.isfile(stamp) and json.load(open(stamp)) == config):
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(up, ignore_errors=True)
        write_checkpoint(src, config, num_shards=2)
        upscale(src, up, "tli", options={"k": 2, "init": "zero"})
        json.dump(config, open(stamp, "w"))
    from tli_kernels.checkpoint.layout import CheckpointLayout

    params = CheckpointLayout.open(up).num_parameters
    return src, up, params


def run_job(mode: str, ranks: int, src: str, up: str, workdir: str, data: str) -> list[dict]:
    report = os.path.join(workdir, f"mem-{mode}-{ranks}")
    out = os.path.join(workdir, f"train-out-{ranks}")
    shutil.rmtree(out, ignore_errors=True)
    for r in range(ranks):
        if os.path.exists(f"{report}.{r}.json"):
            os.unlink(f"{report}.{r}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           os.path.abspath(__file__), "--worker", mode, "--src", src, "--upscaled", up, "--train-out", out,
           "--report", report, "--data", data]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} x {ranks} failed:\n{done.stderr[-3000:]}")
    rows = [json.load(open(f"{report}.{r}.json")) for r in range(ranks)]
    for row in rows:
        row["job_wall_s"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--upscaled", help=argparse.SUPPRESS)
    p.add_argument("--train-out", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="build/bench-training")
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--jobs", default="baseline,sharded,full,train")
    p.add_argument("--out", default=None, help="markdown file (and .json next to it)")
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.src, args.upscaled, args.train_out, args.report, args.data)
        return 0

    import numpy as np
    from harness import describe_environment, environment, markdown_table

    os.makedirs(args.workdir, exist_ok=True)
    env = environment()
    src, up, params = make_models(args.workdir, args.layers, args.hidden, args.intermediate, args.vocab)
    data = os.path.join(args.workdir, "train-ids.npy")
    np.save(data, np.random.default_rng(0).integers(0, args.vocab, 4096, dtype=np.int64))
    full_bytes = params * 4
    results: dict = {"environment": env, "parameters": params, "fp32_bytes": full_bytes, "runs": {}}
    for ranks in [int(x) for x in args.ranks.split(",")]:
        for mode in args.jobs.split(","):
            print(f"[{time.strftime('%H:%M:%S')}] {mode} x {ranks} ranks ...", flush=True)
            results["runs"][f"{mode}/{ranks}"] = run_job(mode, ranks, src, up, args.workdir, data)

    headers = ["ranks", "job", "peak RSS per rank (MiB)", "share of the fp32 model (MiB)",
               "peak - share (MiB)", "within share + budget", "source bytes read per rank", "job wall s"]  # fmt: skip
    rows = []
    for ranks in [int(x) for x in args.ranks.split(",")]:
        share = full_bytes / ranks
        base = results["runs"].get(f"baseline/{ranks}")
        budget = max(r["peak_rss"] for r in base) + BUFFER_BUDGET if base else None
        for mode in args.jobs.split(","):
            run = results["runs"][f"{mode}/{ranks}"]
            peaks = [r["peak_rss"] for r in run]
            within = ""
            if mode == "sharded" and budget is not None:
                within = "yes" if all(pk <= share + budget for pk in peaks) else "NO"
                results[f"budget/{ranks}"] = budget
            reads = [r.get("bytes_read") for r in run]
            rows.append([
                ranks, mode, " / ".join(f"{pk / MIB:.0f}" for pk in peaks), f"{share / MIB:.0f}",
                " / ".join(f"{(pk - share) / MIB:.0f}" for pk in peaks), within,
                " / ".join(f"{x / MIB:.0f} MiB" for x in reads) if all(reads) else "",
                f"{run[0]['job_wall_s']:.1f}",
            ])  # fmt: skip
    text = "\n".join([
        "# Training memory per rank: sharded load (upscale on load) vs the full-load path",
        "",
        describe_environment(env),
        "",
        f"Model: TLI K=2 (--init zero) of a {args.layers}-layer Llama-shaped bf16 checkpoint (hidden {args.hidden}, "
        f"intermediate {args.intermediate}, vocab {args.vocab}), {params / 1e6:.0f}M parameters, "
        f"{full_bytes / MIB:.0f} MiB in float32. Budget = the baseline job's largest peak + 64 MiB of loader "
        "buffers; 'peak - share' should stay within it for the sharded loader.",
        "",
        markdown_table(headers, rows),
        "",
    ])  # fmt: skip
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
