"""CPU cost of calling the tli ops: one decode step of a patched decoder layer against the stock one,
and what one call of each dispatch mechanism costs.

Why on CPU: in `generate()` every step runs each layer on one token, so the GPU work per op is a few
microseconds and the Python and dispatcher work around it decides the speed. This measures that work
on the CPU, where the ops take tli's PyTorch reference path (TRITON_INTERPRET unset; the interpreter
would time itself, not the dispatch): the number to read is the patched layer against the stock one
in the same run, not the absolute time.

    PYTHONPATH=. python benchmarks/bench_dispatch.py [--reps 2000] [--json OUT.json]

Rows:
  * decoder layer, one token with a KV cache (no grad, as in generate): stock transformers; tli as it
    dispatches in eager (autograd.Function or a direct call, the custom ops only under torch.compile);
    tli with every op forced through its torch.library custom op (how eager calls went before);
  * one call of a trivial op through each mechanism: a plain function, an autograd.Function, a
    torch.library.custom_op (with autograd registered), a torch.library.triton_op.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("bench_dispatch.py: unset TRITON_INTERPRET (the interpreter would be timed, not the dispatch)")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import describe_environment, environment, markdown_table, time_fn  # noqa: E402

# A tiny block, whose GEMMs cost next to nothing on the CPU: what is left is the per-op Python and
# dispatcher work, which is what a GPU decode step spends its CPU time on (there the GPU reads the
# weights in microseconds). SmolLM2-135M's block as a second case, where a one-token GEMV reading 14 MB
# of float32 weights dominates on a CPU.
SHAPES = {
    "tiny (hidden 64, 4/2 heads)": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16),
    "SmolLM2-135M block (hidden 576, 9/3 heads)": dict(hidden_size=576, intermediate_size=1536,
                                                        num_attention_heads=9, num_key_value_heads=3, head_dim=64),
}  # fmt: skip
PAST = 32  # tokens already in the KV cache


def _layer_step(layer, config, cache_cls):
    """A function running one decode step of `layer`, and a setup that keeps the cache at PAST tokens."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from tli_kernels.modules._swap import cache_kwarg, original_class

    torch.manual_seed(0)
    rotary = LlamaRotaryEmbedding(config)
    cache = cache_cls(config=config)
    kwargs = {cache_kwarg(original_class(layer)): cache, "use_cache": True, "attention_mask": None}
    with torch.no_grad():
        prefill = torch.randn(1, PAST, config.hidden_size)
        positions = torch.arange(PAST)[None]
        layer(prefill, position_embeddings=rotary(prefill, positions), position_ids=positions, **kwargs)
    x = torch.randn(1, 1, config.hidden_size)
    position = torch.tensor([[PAST]])
    rope = rotary(x, position)

    def step():
        with torch.no_grad():
            return layer(x, position_embeddings=rope, position_ids=position, **kwargs)

    def keep_length():
        extra = cache.get_seq_length() - PAST
        try:  # transformers >= 5.2x counts the tokens to remove (negative); earlier ones take the length to keep
            cache.crop(-extra)
        except ValueError:
            cache.crop(PAST)

    return step, keep_length


def layer_rows(reps: int, rounds: int) -> list[dict]:
    """Each configuration timed in `rounds` interleaved rounds of reps/rounds calls (drift on a shared
    CPU hits all of them alike); the median of the per-round medians is reported."""
    import contextlib

    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tli_kernels import ops
    from tli_kernels.modules import patch_decoder_layer

    rows = []
    for shape_name, shape in SHAPES.items():
        config = LlamaConfig(**shape, num_hidden_layers=1, vocab_size=256, rms_norm_eps=1e-5)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        stock = LlamaDecoderLayer(config, layer_idx=0).eval()
        patched = copy.deepcopy(stock)
        patch_decoder_layer(patched)
        configs = [("stock transformers", stock, contextlib.nullcontext),
                   ("tli, eager dispatch", patched, contextlib.nullcontext)]  # fmt: skip
        forced = getattr(ops, "custom_op_dispatch", None)
        if forced is not None:
            configs.append(("tli, every op through its custom op (the old eager path)", patched, forced))
        steps = [_layer_step(layer, config, DynamicCache) for _, layer, _ in configs]
        medians: list[list[float]] = [[] for _ in configs]
        with ops.ops_backend("reference"):
            for _ in range(rounds):
                for i, (_, _, context) in enumerate(configs):
                    step, setup = steps[i]
                    with context():
                        timing = time_fn(step, setup=setup, warmup=10, reps=max(1, reps // rounds))
                    medians[i].append(timing["median_ms"] * 1e3)
            counts = []
            for (_, _, context), (step, setup) in zip(configs, steps, strict=True):
                setup()
                with context(), _CountOps() as counter:
                    step()
                counts.append(counter)
        base = statistics.median(medians[0])
        for (name, _, _), samples, counter in zip(configs, medians, counts, strict=True):
            us = statistics.median(samples)
            rows.append({"case": f"decoder layer, {shape_name}, 1 token, KV cache of {PAST}, no grad",
                         "path": name, "us_per_call": us, "vs_stock": us / base, "round_medians_us": samples,
                         "aten_ops": counter.aten, "tli_custom_ops": counter.tli})  # fmt: skip
    return rows


class _CountOps:
    """Counts the operators one call dispatches (ATen ops, and tli custom ops as the dispatcher sees them)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "tli":
                    counter.tli += 1
                else:
                    counter.aten += 1
                return func(*args, **(kwargs or {}))

        self.aten = self.tli = 0
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


# ------------------------------------------------------------------------------ dispatch mechanisms
def _identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def mechanism_rows(reps: int) -> list[dict]:
    @torch.library.custom_op("tli_bench::identity", mutates_args=())
    def custom(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    custom.register_fake(lambda x: torch.empty_like(x))
    custom.register_autograd(lambda ctx, grad: grad)

    @torch.library.triton_op("tli_bench::identity_triton", mutates_args=())
    def triton_op(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    triton_op.register_autograd(lambda ctx, grad: grad)

    x = torch.randn(8, 8)
    x_grad = x.clone().requires_grad_(True)
    cases = [
        ("plain function (the eager path without grad)", lambda: _identity(x)),
        ("autograd.Function.apply, input needs grad", lambda: _Identity.apply(x_grad)),
        ("torch.library.custom_op, no grad", lambda: custom(x)),
        ("torch.library.custom_op, input needs grad", lambda: custom(x_grad)),
        ("torch.library.triton_op, no grad", lambda: triton_op(x)),
        ("torch.library.triton_op, input needs grad", lambda: triton_op(x_grad)),
    ]
    rows = []
    for name, fn in cases:
        timing = time_fn(fn, warmup=200, reps=reps)
        rows.append({"case": "one call of a trivial op (x.clone() of 8x8)", "path": name,
                     "us_per_call": timing["median_ms"] * 1e3, "timing": timing})  # fmt: skip
    base = rows[0]["us_per_call"]
    for row in rows:
        row["vs_stock"] = row["us_per_call"] / base
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2000, help="calls per configuration")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds the calls are split into")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady timings on a shared CPU)")
    parser.add_argument("--json", help="write the rows and the environment here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(torch_threads=args.threads)
    rows = layer_rows(args.reps, args.rounds) + mechanism_rows(args.reps)
    print(describe_environment(env))
    print(
        f"Layer cases: {args.reps} calls per configuration in {args.rounds} interleaved rounds, median of the "
        f"round medians; trivial ops: median of {args.reps} calls. perf_counter, ratio against the first row "
        "of each case (the stock layer; the plain function).\n"
    )
    table = [[r["case"], r["path"], f"{r['us_per_call']:.1f}", f"{r['vs_stock']:.2f}x",
              r.get("aten_ops", ""), r.get("tli_custom_ops", "")] for r in rows]  # fmt: skip
    print(markdown_table(["case", "path", "us per call", "vs first row", "ATen ops per call",
                          "tli custom ops per call"], table))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
