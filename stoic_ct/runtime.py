"""What a process runs on: torch, its CUDA runtime, the GPU and its driver.

Every entry point logs this at start-up. Where an NVIDIA GPU is present but PyTorch
cannot use it (most often a driver older than the one the image's CUDA needs), one
warning names both versions and says that the job runs on the CPU: the platform would
otherwise score a GPU job slowly on the CPU without a word.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")
DEVICE_DIR = Path("/dev")
# The oldest Linux driver each CUDA major version runs on (minor-version compatibility),
# from NVIDIA's CUDA compatibility tables.
MINIMUM_DRIVER = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}
_DRIVER_VERSION = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)")


@dataclass(frozen=True)
class Runtime:
    """What torch and the machine offer.

    Attributes:
        cuda: the CUDA runtime torch is built with (torch.version.cuda); None: a CPU build.
        usable: torch can use a CUDA GPU.
        gpus: "name (memory GiB)" of each GPU torch sees.
        nvidia_present: an NVIDIA device node or driver is there, usable or not.
        driver: the NVIDIA kernel driver's version, when it can be read.
    """

    torch_version: str
    cuda: str | None
    usable: bool
    gpus: tuple[str, ...]
    nvidia_present: bool
    driver: str | None
    cudnn: int | None = None
    threads: int = 1


def probe(driver_file: Path = NVIDIA_DRIVER_FILE, device_dir: Path = DEVICE_DIR) -> Runtime:
    """The Runtime of this process."""
    usable = torch.cuda.is_available()
    gpus = (
        tuple(
            f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
            for props in (
                torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())
            )
        )
        if usable
        else ()
    )
    try:
        match = _DRIVER_VERSION.search(driver_file.read_text(encoding="utf-8", errors="replace"))
        driver = match.group(1) if match else None
        present = True
    except OSError:
        driver = None
        present = any(device_dir.glob("nvidia[0-9]*"))
    return Runtime(
        torch_version=torch.__version__,
        cuda=torch.version.cuda,
        usable=usable,
        gpus=gpus,
        nvidia_present=present or usable,
        driver=driver,
        cudnn=torch.backends.cudnn.version() if usable else None,  # type: ignore[no-untyped-call]
        threads=torch.get_num_threads(),
    )


def describe(runtime: Runtime) -> tuple[str, str | None]:
    """One line on what runs where, and a warning when a GPU is present but unusable."""
    build = f"CUDA runtime {runtime.cuda}" if runtime.cuda else "a CPU build"
    driver = f"NVIDIA driver {runtime.driver}" if runtime.driver else "NVIDIA driver unknown"
    if runtime.usable:
        cudnn = f", cuDNN {runtime.cudnn}" if runtime.cudnn else ""
        gpus = "; ".join(f"GPU {i}: {name}" for i, name in enumerate(runtime.gpus))
        return f"torch {runtime.torch_version} ({build}{cudnn}); {gpus}; {driver}", None
    line = f"torch {runtime.torch_version} ({build}); no GPU used: {runtime.threads} CPU threads"
    if not runtime.nvidia_present:
        return line, None
    if runtime.cuda is None:
        why = f"this torch is a CPU build ({runtime.torch_version})"
    else:
        needed = MINIMUM_DRIVER.get(runtime.cuda.split(".")[0])
        wants = f", which needs NVIDIA driver {needed} or newer" if needed else ""
        have = (
            f"the driver is {runtime.driver}"
            if runtime.driver
            else "the driver's version is unknown"
        )
        why = f"{have}, and torch {runtime.torch_version} is built for CUDA {runtime.cuda}{wants}"
    return (
        line,
        f"an NVIDIA GPU is present but PyTorch cannot use it: {why}; the job runs on the CPU",
    )


def log_runtime() -> Runtime:
    """Log what this process runs on (and the warning, where there is one); return it."""
    runtime = probe()
    line, warning = describe(runtime)
    logger.info("%s", line)
    if warning:
        logger.warning("%s", warning)
    return runtime
