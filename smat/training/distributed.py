"""The process group of a data-parallel `smat train` started by torchrun (METHOD §11).

torchrun starts N processes with RANK, LOCAL_RANK and WORLD_SIZE in their environment; `process_group` joins
them: NCCL on CUDA with one GPU per process (cuda:LOCAL_RANK), gloo on the CPU. Without WORLD_SIZE (or with 1)
the run is one process that joins no group, and every helper below is then a no-op, so the training loop has
one code path for any number of processes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from smat.device import resolve_device
from smat.io import SmatError

# The torchrun launcher (agent) whose group this process joined; None in one process or a caller's group.
_launcher_pid: int | None = None

# Rank 0 writes checkpoints (a large resume state takes minutes on a slow disk) while the other processes wait
# in the next collective: more headroom than NCCL's default of 10 minutes.
TIMEOUT = datetime.timedelta(minutes=30)


def launched_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE); 1 for a plain command."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise SmatError(f"WORLD_SIZE={value!r}: expected a positive number of processes (torchrun sets it)")
    return int(value)


def process_device(name: str, world: int) -> torch.device:
    """This process's device: `name` for one process; with N processes one GPU each (cuda:LOCAL_RANK) for
    `auto` and `cuda`, or the CPU."""
    if world == 1:
        return resolve_device(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise SmatError(f"--device {name}: one device for {world} processes; use --device cuda (one GPU per "
                        "process, cuda:LOCAL_RANK) or --device cpu")
    resolve_device("cuda")                                      # a clear error where CUDA is missing
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= gpus:
        raise SmatError(f"LOCAL_RANK={local_rank}: this node has {gpus} GPU(s); start at most that many processes "
                        "on it (torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[torch.device]:
    """Join torchrun's processes for the block (when there are several) and yield this process's device.

    A group that already exists (a caller's, e.g. a test running several trainings in one group) is used and
    left to its owner."""
    world = launched_world_size()
    device = process_device(device_name, world)
    if world == 1 or dist.is_initialized():
        yield device
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT, device_id=device if cuda else None)
    global _launcher_pid
    _launcher_pid = os.getppid()
    try:
        yield device
        dist.barrier()                  # no process leaves while another still needs the group
    finally:
        _launcher_pid = None
        dist.destroy_process_group()


def launcher_gone() -> bool:
    """Whether the torchrun launcher of this process has died. torchrun starts its processes in sessions of
    their own, so `kill -9` of torchrun leaves them running; the training loop then stops them all alike."""
    return _launcher_pid is not None and os.getppid() != _launcher_pid


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the only process that writes files."""
    return rank() == 0


def my_share(n: int) -> range:
    """This process's contiguous block of `n` items (n divisible by the number of processes)."""
    per = n // world_size()
    return range(rank() * per, (rank() + 1) * per)


def all_reduce_gradients(params: list[nn.Parameter]) -> None:
    """Sum each parameter's gradient over the processes (METHOD §11).

    A parameter without a gradient on every process keeps none: SGD's momentum and weight decay treat a zero
    gradient differently from a missing one. A gradient on some processes only is summed with zeros from the
    others, and then present on all. The sum is computed once and sent to every process, so every process holds
    the same bits: gradient clipping and the GradScaler's inf check (an inf anywhere is in the sum) agree."""
    if world_size() == 1 or not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    pending = []
    for param, anywhere in zip(params, present.tolist()):
        if not anywhere:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        pending.append(dist.all_reduce(param.grad, async_op=True))
    for work in pending:
        work.wait()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in rank order."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
