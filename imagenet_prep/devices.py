"""Devices, dtypes and CPU shares: parsed and checked in one place, for the loaders and the
trainer alike, so that a bad `--device` fails the same way wherever it is given."""
from __future__ import annotations

import os
import re

from alexprep.imagenet_prep.errors import DataError

DTYPES = ("float32", "bfloat16", "float16")
# Cores of a rank's share left to its main process (the training loop, the copies to the
# device, the batch plans) and to the rest of the machine, not to loader workers.
SPARE_CORES = 2


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as under taskset or Slurm)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def local_world_size() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 outside it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def cpu_share() -> int:
    """This rank's share of the machine's CPUs: each of the ranks on one machine gets an
    equal part, so that 8 ranks do not each start a pool as large as the machine."""
    return max(1, available_cpus() // local_world_size())


def training_workers() -> int:
    """A training loader's workers (DataLoader processes or DALI threads): this rank's
    share less SPARE_CORES, at least one."""
    return max(1, cpu_share() - SPARE_CORES)


def evaluation_workers(ends_between_passes: bool) -> int:
    """An evaluation loader's workers, sized so that training's and evaluation's never
    want more cores together than the rank has: as many as training's where they exist
    only during a pass (training's idle meanwhile), else what training leaves over."""
    if ends_between_passes:
        return training_workers()
    return max(1, cpu_share() - training_workers())


def parse_device(device) -> tuple[str, int | None]:
    """("cpu", None) or ("cuda", N) from "cpu", "cuda", "cuda:N" or a torch.device."""
    text = str(device)
    if text == "cpu":
        return "cpu", None
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise DataError(f"device must be 'cpu' or 'cuda:N', not {device!r}")
    return "cuda", int(match.group(1) or 0)


def check_device(device):
    """The torch.device for `device`, or a DataError saying why it cannot be used here."""
    import torch

    kind, number = parse_device(device)
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError(f"device {str(device)!r}: CUDA is not available on this machine "
                        f"(torch {torch.__version__} sees no GPU); use cpu")
    if number >= torch.cuda.device_count():
        raise DataError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", number)


def device_name(device) -> str:
    """"cpu" or "cuda:N" for a torch.device (an index-less "cuda" is the current GPU, 0)."""
    return "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"


def torch_dtype(dtype):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def dtype_name(dtype) -> str:
    """"float32" from torch.float32 or "float32"."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise DataError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16, not {dtype!r}")
    return name
