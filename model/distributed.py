"""Processes and devices: torchrun's ranks, each rank's tower devices, and the few
collectives the trainer needs (docs/design.md, "Training").

Every collective goes through `all_reduce`, whose tensors live on the CPU: the process
group is "cpu:gloo,cuda:nccl" on GPUs (gloo for these small host tensors, NCCL for DDP's
gradients), plain gloo on CPUs, so no collective can meet a backend that lacks its device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alexprep.imagenet_prep.devices import check_device, parse_device
from alexprep.imagenet_prep.errors import DataError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def process_group_backend(devices: tuple[str, ...], cuda_available: bool) -> str:
    """NCCL for CUDA tensors and gloo for CPU ones when the towers are on GPUs (plain
    "nccl" registers no CPU backend, and the trainer's counters are CPU tensors); gloo
    alone on CPUs."""
    on_gpu = cuda_available and any(str(d).startswith("cuda") or d == "auto" for d in devices)
    return "cpu:gloo,cuda:nccl" if on_gpu else "gloo"


def init_distributed(devices: tuple[str, ...]) -> Ranks:
    """torch.distributed from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(devices, torch.cuda.is_available()))
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve_devices(devices: tuple[str, ...], ranks: Ranks = Ranks()) -> tuple[torch.device, ...]:
    """The tower devices of this process, checked. "auto": two GPUs per process where there
    are enough, one GPU otherwise, else the CPU. Under torchrun with several ranks on a
    machine, "cuda" (no index) is GPU LOCAL_RANK, and explicit indices are refused: every
    rank would open the same GPU."""
    if tuple(devices) == ("auto",):
        n = torch.cuda.device_count()
        if n >= 2 * ranks.local_world_size:
            out = (torch.device(f"cuda:{2 * ranks.local_rank}"), torch.device(f"cuda:{2 * ranks.local_rank + 1}"))
        elif n >= 1:
            out = (torch.device(f"cuda:{ranks.local_rank % n}"),)
        else:
            out = (torch.device("cpu"),)
    else:
        names = []
        for d in devices:
            text = str(d)
            if text == "cuda" and ranks.local_world_size > 1:
                text = f"cuda:{ranks.local_rank}"
            elif text.startswith("cuda:") and ranks.local_world_size > 1:
                raise DataError(f"device {text} under torchrun with {ranks.local_world_size} ranks per machine "
                                f"would put every rank on one GPU: use --devices auto (or cuda), and each rank "
                                f"takes GPU LOCAL_RANK")
            names.append(text)
        if ranks.distributed and len({parse_device(n)[0] for n in names}) > 1:
            raise DataError(f"devices {', '.join(names)}: under torchrun a rank's towers must share a device type "
                            f"(DDP cannot wrap a module that spans CPU and GPU); use two GPUs or one")
        out = tuple(check_device(n) for n in names)
    return out


def use_devices(devices: tuple[torch.device, ...]) -> None:
    """Make this rank's first GPU the current one, so that its CUDA context, pinned-memory
    thread and NCCL communicator are there rather than all on GPU 0."""
    if devices[0].type == "cuda":
        torch.cuda.set_device(devices[0])


def all_reduce(values, op: str = "sum") -> list[float]:
    """The sum (or "max") of a few numbers over all ranks; the numbers themselves outside
    torchrun."""
    values = [float(v) for v in values]
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)  # on the CPU: gloo's side of the group
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """Whether any rank's flag is set (a NaN loss, say), so that all act on it together."""
    return all_reduce([flag], "max")[0] > 0


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one outside torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
