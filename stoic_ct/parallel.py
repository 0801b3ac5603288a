"""Training on every device it is given: one process per device, each with its own share.

`training_devices` turns `--devices` into devices; `on_devices` runs one job per device in
spawned processes (CUDA cannot be shared with a forked child), each logging as the entry
points do, and returns their results in order. With one job it runs in this process, so
a single-GPU or CPU run is unchanged.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import torch

from stoic_ct.errors import StoicError
from stoic_ct.logs import configure_logging

J = TypeVar("J")
R = TypeVar("R")


def training_devices(spec: str) -> list[torch.device]:
    """ "auto" (every CUDA GPU, else the CPU) or a comma list such as "cuda:0,cuda:1".

    Raises:
        StoicError: when a device is malformed or a GPU is asked for that is not there.
    """
    if spec == "auto":
        count = torch.cuda.device_count()
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    devices = []
    for name in (part.strip() for part in spec.split(",")):
        try:
            device = torch.device(name)
        except RuntimeError:
            raise StoicError(f"--devices: {name!r} is not a device (cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise StoicError(
                f"--devices: {name} was asked for, but PyTorch sees "
                f"{torch.cuda.device_count()} CUDA GPU(s)"
            )
        if device.type not in ("cpu", "cuda"):
            raise StoicError(f"--devices: {name!r} is neither cpu nor cuda")
        devices.append(device)
    if not devices:
        raise StoicError("--devices names no device")
    return devices


def on_devices(
    work: Callable[[torch.device, J], R], jobs: Sequence[tuple[torch.device, J]]
) -> list[R]:
    """[work(device, job) for each (device, job)], the jobs in parallel processes.

    `work` must be a module-level function and the jobs picklable. An exception in a job
    is raised here (a StoicError with its message and path).
    """
    if len(jobs) == 1:
        device, job = jobs[0]
        return [work(device, job)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=context) as pool:
        futures = [pool.submit(_in_child, work, device, job) for device, job in jobs]
        return [future.result() for future in futures]


def _in_child(work: Callable[[torch.device, J], R], device: torch.device, job: J) -> R:
    # A spawned process starts without the entry point's logging: set it up the same way.
    configure_logging(information_to_stdout=True)
    return work(device, job)
