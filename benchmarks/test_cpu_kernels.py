"""The kernels at tiny shapes on CPU: each op and the decoder layer, forward and forward+backward, as
stock transformers runs them, through tli's PyTorch reference, and through the Triton kernels in
Triton's interpreter. Inputs rotate over several sets (benchmarks/harness.py). The interpreter's times
show the kernels run end to end here; GPU speed comes from benchmarks/gpu_suite.py."""

from __future__ import annotations

import contextlib
import itertools

import gpu_kernels as gk
import pytest
import torch
from harness import rotation_sets

from tli_kernels import ops

CASE = gk.Case("smoke", batch=1, seq=64)
DTYPE = torch.float32  # the interpreter cannot do bf16 arithmetic (docs/kernels.md)
DEVICE = torch.device("cpu")
IMPLS = {"stock": None, "tli reference": "reference", "tli Triton interpreter": "triton"}
ROUNDS = {"stock": 50, "tli reference": 50, "tli Triton interpreter": 3}
DIRECTIONS = ("forward", "forward+backward")
SHAPE = f"{CASE.model} (hidden {CASE.dims['hidden']}, intermediate {CASE.dims['intermediate']}), {CASE.seq} tokens"


def _backend(impl: str):
    name = IMPLS[impl]
    return contextlib.nullcontext() if name is None else ops.ops_backend(name)


def _run(benchmark, impl: str, step, sets: list) -> None:
    """Time `step(*set)` cycling over the sets, under the impl's ops backend."""
    cycle = itertools.cycle(sets)
    with _backend(impl):
        try:
            step(*sets[0])  # builds the kernels; fails here (not in the timing) where Triton cannot run
        except RuntimeError as error:
            if IMPLS[impl] == "triton":
                pytest.skip(f"Triton cannot run here: {error}")
            raise
        benchmark.pedantic(lambda: step(*next(cycle)), rounds=ROUNDS[impl], warmup_rounds=1)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("op", gk.KERNELS)
def test_kernel(benchmark, record, op, impl, direction):
    torch.manual_seed(0)
    kc = next(k for k in gk.kernel_cases(CASE, DEVICE, DTYPE) if k.name == op)
    fn = kc.eager if impl == "stock" else kc.tli
    sets = []
    for _ in range(rotation_sets(kc.set_bytes, DEVICE, maximum=4)):
        inputs = kc.make_inputs()
        grads = [torch.randn_like(o) for o in gk.as_tuple(kc.eager(*inputs))]
        sets.append((inputs, grads))

    def forward(inputs, grads):  # a training forward (autograd records), as the GPU benchmark times it
        return fn(*inputs)

    def forward_backward(inputs, grads):
        return torch.autograd.grad(gk.as_tuple(fn(*inputs)), inputs, grads)

    benchmark.group = f"kernel {op} {direction}"
    _run(benchmark, impl, forward if direction == "forward" else forward_backward, sets)
    record(benchmark, "kernels", f"{op} {direction}", impl, shape=SHAPE)


@pytest.fixture(scope="module")
def layers():
    bench = gk.Bench(None, device=DEVICE, dtype=DTYPE, warmup=0, reps=1)
    return gk.Layers(bench, CASE.model)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_decoder_layer(benchmark, record, layers, impl, direction):
    layer = layers.stock if impl == "stock" else layers.tli
    inputs = layers.inputs(CASE, sets=2)
    kwargs = dict(inputs["kwargs"], position_embeddings=inputs["rope"])
    sets = [(x.detach().requires_grad_(True), g) for x, g in zip(inputs["xs"], inputs["grads"], strict=True)]
    params = [p for p in layer.parameters() if p.requires_grad]

    def forward(x, g):
        return layer(x, **kwargs)

    def forward_backward(x, g):
        return torch.autograd.grad(layer(x, **kwargs), [x, *params], g)

    benchmark.group = f"decoder layer {direction}"
    _run(benchmark, impl, forward if direction == "forward" else forward_backward, sets)
    record(benchmark, "kernels", f"decoder layer {direction}", impl, shape=SHAPE)
