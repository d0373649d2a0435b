"""tli_kernels/ops/_triton.py: how a call reaches its kernel. Eager calls go through an autograd.Function
(or straight to the kernel without grad), never through the torch.library custom ops, whose dispatcher
round trip costs several times as much (benchmarks/bench_dispatch.py); torch.compile sees the custom ops.
Counted with a TorchDispatchMode, not timed. Also: the device guard at every launch, one dW program
per SM, and kernels built for the interpreter refused on CUDA tensors."""

import copy
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from tests.ops.tolerance import DEVICE, assert_close
from tli_kernels import ops
from tli_kernels.modules import patch_decoder_layer
from tli_kernels.ops import _triton
from tli_kernels.ops.rms_norm import _rms_norm_fwd_kernel

F32 = torch.float32


class CountOps(TorchDispatchMode):
    """Operators as the dispatcher sees them: a tli custom op shows up as `tli::<name>`."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))

    def tli(self):
        return [n for n in self.names if n.startswith("tli::")]


def _layer(learnable=True):
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_hidden_layers=1, vocab_size=32, rms_norm_eps=1e-5)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    stock = LlamaDecoderLayer(config, layer_idx=0).to(DEVICE)
    layer = copy.deepcopy(stock)
    patch_decoder_layer(layer, residual_scale=0.5, learnable=learnable)
    x = torch.randn(2, 6, 64, device=DEVICE, requires_grad=True)
    positions = torch.arange(6, device=DEVICE)[None]
    rope = LlamaRotaryEmbedding(config).to(DEVICE)(x, positions)
    return layer, x, {"position_embeddings": rope, "position_ids": positions, "attention_mask": None}


def test_eager_calls_dispatch_no_custom_op():
    layer, x, kwargs = _layer()
    with CountOps() as training:
        layer(x, **kwargs).square().sum().backward()
    with torch.no_grad(), CountOps() as inference:
        layer(x, **kwargs)
    assert training.tli() == [] and inference.tli() == []
    assert len(training.names) > 20  # the mode did see the layer's ATen ops
    # The same counter does see the custom ops when they are used (what torch.compile gets):
    with ops.custom_op_dispatch(), CountOps() as forced:
        layer(x, **kwargs).square().sum().backward()
    assert {"tli::rms_norm", "tli::add_rms_norm", "tli::rope", "tli::swiglu", "tli::scaled_add",
            "tli::rms_norm_backward", "tli::scaled_add_backward"} <= set(forced.tli())  # fmt: skip


def test_eager_and_custom_op_paths_compute_the_same():
    layer, x, kwargs = _layer()
    results = []
    for context in (torch.enable_grad, ops.custom_op_dispatch):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with context():
            out = layer(x, **kwargs)
            out.square().sum().backward()
        results.append([out, x.grad, *(p.grad for p in layer.parameters())])
    for got, want in zip(*results, strict=True):
        assert_close(got, want, F32, "eager vs custom op")


def test_compiled_layer_calls_the_custom_ops():
    layer, x, kwargs = _layer()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: layer(x, **kwargs), backend=backend, fullgraph=True)
    compiled(x).sum().backward()
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert {t for t in targets if t.startswith("tli.")} >= {"tli.rms_norm.default", "tli.add_rms_norm.default",
                                                             "tli.scaled_add.default", "tli.rope.default"}  # fmt: skip


# ---------------------------------------------------------------------------------- device guard
def test_device_guard_selects_the_tensor_device_only_with_several_gpus(monkeypatch):
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    monkeypatch.setattr(_triton, "_cuda_device_count", lambda: 1)
    assert _triton.device_guard(on_gpu1).__class__.__name__ == "nullcontext"  # free on one GPU
    monkeypatch.setattr(_triton, "_cuda_device_count", lambda: 2)
    guard = _triton.device_guard(on_gpu1)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert _triton.device_guard(torch.zeros(1)).__class__.__name__ == "nullcontext"  # CPU


def test_every_kernel_launch_is_inside_the_device_guard(monkeypatch, require_triton):
    x = torch.randn(4, 16, device=DEVICE)
    require_triton(_rms_norm_fwd_kernel, x)
    kernel_class = type(_rms_norm_fwd_kernel)  # the interpreter's kernels on CPU, compiled ones on a GPU
    active, launches = [False], []

    class Guard:
        def __enter__(self):
            active[0] = True

        def __exit__(self, *exc):
            active[0] = False

    original = kernel_class.__getitem__

    def getitem(kernel, grid):
        launches.append((kernel.fn.__name__, active[0]))
        return original(kernel, grid)

    monkeypatch.setattr(kernel_class, "__getitem__", getitem)
    for name in ("rms_norm", "rope", "swiglu", "scaled_add"):
        import importlib

        monkeypatch.setattr(importlib.import_module(f"tli_kernels.ops.{name}"), "device_guard", lambda t: Guard())
    layer, x, kwargs = _layer()
    layer(x, **kwargs).square().sum().backward()
    with torch.no_grad():
        layer(x, **kwargs)
        ops.swiglu_packed(torch.randn(3, 8, device=DEVICE))
    kernels = {name for name, _ in launches}
    assert kernels >= {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel",
                       "_swiglu_bwd_kernel", "_scaled_add_fwd_kernel", "_scaled_add_bwd_kernel"}, kernels  # fmt: skip
    assert all(guarded for _, guarded in launches), [name for name, guarded in launches if not guarded]


# ------------------------------------------------------------------------------- launch sizes
def test_dw_partials_use_two_programs_per_sm(monkeypatch):
    monkeypatch.setattr(_triton, "_sm_count", lambda index: 132)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert _triton.reduction_programs(on_gpu, 8192) == 264  # an H200: 2 x 132 partial rows (measured best)
    assert _triton.reduction_programs(on_gpu, 10) == 10
    assert _triton.reduction_programs(torch.zeros(1), 8192) == _triton.INTERPRETER_REDUCTION_PROGRAMS


def test_interpreter_kernels_are_refused_on_cuda_tensors():
    interpreted = type("InterpretedFunction", (), {})()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set"):
        _triton.use_triton(interpreted, types.SimpleNamespace(device=torch.device("cuda", 0)))
