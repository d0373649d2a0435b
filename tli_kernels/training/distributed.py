"""Process group, device and FSDP2 wiring. One process without torchrun; under torchrun every
rank shards each decoder layer and the root with `torch.distributed.fsdp.fully_shard` (FSDP2),
NCCL on GPUs, gloo on CPUs (how the tests run it)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tli_kernels.training.residual import decoder_layers

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    owns_process_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks."""
        value = value.detach().float().reshape(1).to(self.device)
        if self.distributed:
            dist.all_reduce(value)
            value /= self.world
        return float(value.item())

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "auto") -> Runtime:
    """The device and (under torchrun, WORLD_SIZE > 1) the process group."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available to this torch")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(torch.device("cuda") if cuda else torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Runtime(dev, rank=dist.get_rank(), world=dist.get_world_size(), owns_process_group=owns)


def shard(trainee: nn.Module, runtime: Runtime, *, bf16: bool) -> None:
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, head, residual scales)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
    for layer in decoder_layers(trainee.lm):
        fully_shard(layer, **kwargs)
    fully_shard(trainee, **kwargs)


def full_state_dicts(trainee: nn.Module, optimizer, runtime: Runtime) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, whole and on the CPU, keyed by parameter name; collective under
    FSDP2 (only rank 0 receives them then)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    if not runtime.distributed:
        model = {k: v.detach().cpu() for k, v in trainee.state_dict().items()}
        return model, get_optimizer_state_dict(trainee, optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(trainee, options=options), get_optimizer_state_dict(trainee, optimizer, options=options)


def load_optimizer_state(trainee: nn.Module, optimizer, state: dict, runtime: Runtime) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True) if runtime.distributed else None
    set_optimizer_state_dict(trainee, optimizer, state, options=options)
