"""Process group, device and FSDP2 wiring. One process without torchrun; under torchrun every
rank shards each decoder layer and the root with `torch.distributed.fsdp.fully_shard` (FSDP2),
NCCL on GPUs, gloo on CPUs (how the tests run it)."""

from __future__ import annotations

import contextlib
import os
import warnings
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

    def close(self, *, ok: bool = False) -> None:
        """Tear the process group down. After a successful run (`ok`) every rank first waits for the
        others: a rank whose peer has already torn down can abort in gloo's threads ("terminate called
        without an active exception"). After an error no rank waits, as a peer may never arrive."""
        if self.owns_process_group and dist.is_initialized():
            try:
                if ok and self.distributed:
                    dist.barrier()
            finally:
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


def agree(runtime: Runtime, fn, *args, **kwargs):
    """Run fn on every rank, then make every rank fail if any did (with the first rank's message).

    Without this a rank that fails alone (a file it cannot read, a full disk) would leave the others
    waiting forever in the next collective.
    """
    error: BaseException | None = None
    result = None
    try:
        result = fn(*args, **kwargs)
    except (ValueError, RuntimeError, OSError) as e:
        error = e
    if runtime.distributed:
        message = None if error is None else f"{type(error).__name__}\t{one_line(error)}"
        messages: list = [None] * runtime.world
        dist.all_gather_object(messages, message)
        failed = [(r, m) for r, m in enumerate(messages) if m]
        if failed and error is None:
            rank, text = failed[0]
            kind, _, what = text.partition("\t")
            raise (ValueError if kind == "ValueError" else RuntimeError)(f"rank {rank}: {what}")
    if error is not None:
        raise error
    return result


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


# ------------------------------------------------------------------ DCP (sharded training state)
def save_state(trainee: nn.Module, optimizer, path: str) -> None:
    """Each rank writes its shards of the model and optimizer state into the folder path (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(trainee, optimizer)
    try:
        with _single_process_is_fine():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        raise RuntimeError(f"cannot write the training state to {path}: {_first_failure(e)}") from None


def load_state(trainee: nn.Module, optimizer, path: str, files: set[str]) -> None:
    """Fill the (sharded) model and optimizer from a DCP folder, resharding to this world size.

    `files`: the names in path the checkpoint's manifest lists; DCP may read only those, and nothing
    in them is unpickled beyond DCP's metadata classes and plain data (safe_dcp)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from tli_kernels.training.safe_dcp import ListedFilesReader, WeightsOnlyLoadPlanner

    model_state, optim_state = get_state_dict(trainee, optimizer)
    state = {"model": model_state, "optim": optim_state}
    reader = ListedFilesReader(path, files)  # reads and checks the metadata: raises ValueError naming it
    try:
        with _single_process_is_fine():
            dcp.load(state, storage_reader=reader, planner=WeightsOnlyLoadPlanner())
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        unsafe = _unsafe(e)
        if unsafe is not None:
            raise ValueError(f"the training state in {path} is refused: {one_line(unsafe)}") from None
        raise RuntimeError(f"cannot read the training state in {path}: {_first_failure(e)}") from None
    set_state_dict(trainee, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


@contextlib.contextmanager
def _single_process_is_fine():
    """DCP warns that it 'assumes' a single process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        yield


def _unsafe(e: BaseException) -> BaseException | None:
    """The safe_dcp refusal inside e (DCP wraps each rank's exception in a CheckpointException), if any."""
    from tli_kernels.training.safe_dcp import UnsafeCheckpointError

    if isinstance(e, (UnsafeCheckpointError, ValueError)):
        return e
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for _, inner in sorted(failures.items()):
            inner = inner[0] if isinstance(inner, tuple) else inner
            if isinstance(inner, ValueError):
                return inner
    return None


def _first_failure(e: BaseException) -> str:
    failures = getattr(e, "failures", None)  # CheckpointException: {rank: exception}
    if isinstance(failures, dict) and failures:
        rank, inner = sorted(failures.items())[0]
        inner = inner[0] if isinstance(inner, tuple) else inner
        return f"rank {rank}: {one_line(inner) if isinstance(inner, BaseException) else inner}"
    return one_line(e)
