"""A GPU program's peak memory, counted on this machine without a GPU.

The networks are built on the meta device and materialised as fake tensors
(`FakeTensorMode`: shapes, dtypes and strides, no storage); each stage of the program then
runs for real under torch's `MemTracker`, which records the peak of live tensors by kind
(parameters, buffers, activations, gradients, optimiser state). Fake tensors live on the
CPU here: CPU-only torch builds cannot run every view and backward on fake CUDA tensors.

Three things on a GPU are not tensors, and are added as stated margins:

- the CUDA context (`CUDA_CONTEXT_BYTES`): the driver's and torch's kernels, 300 MB and
  more, about 500 MB with CUDA 12's lazy loading on recent GPUs;
- the libraries' workspaces: cuBLAS's (a few MB per stream) and cuDNN's convolution
  scratch, which it sizes to the free memory up to a few hundred MB (`Margins.workspaces`);
- the caching allocator's rounding and fragmentation: blocks above 1 MB are rounded up to
  2 MiB and cached blocks split; `FRAGMENTATION` of the tensors' peak.

What the CPU stand-in gets differently from a GPU, it gets on the safe side: attention
on a CPU materialises its (N x N) matrix where CUDA's fused kernels do not.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

GB = 10**9  # reported in decimal GB, as GPUs are sold
CUDA_CONTEXT_BYTES = 512 * 2**20
INFERENCE_WORKSPACES = 256 * 2**20  # cuBLAS, and cuDNN's scratch for 2D convolutions
TRAINING_WORKSPACES = 1024 * 2**20  # cuDNN's scratch for 3D convolutions and their gradients
FRAGMENTATION = 0.10

# MemTracker's kinds, by the names used here.
_KINDS = {
    "Parameter": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Activation": "activations",
    "Temp": "temporaries",
    "Optstate": "optimiser",
    "Other": "other",
}


@dataclass(frozen=True)
class StagePeak:
    """The peak of live tensors during one stage, in bytes, by kind (parameters, ...)."""

    name: str
    by_kind: Mapping[str, int]

    @property
    def tensors(self) -> int:
        return sum(self.by_kind.values())


@dataclass(frozen=True)
class MemoryEstimate:
    """A program's modelled peak GPU memory: the highest stage's tensors plus the margins.

    Attributes:
        stages: each stage's tensor peak, in running order.
        workspaces: the libraries' workspaces margin, bytes.
    """

    stages: tuple[StagePeak, ...]
    workspaces: int

    @property
    def peak_stage(self) -> StagePeak:
        return max(self.stages, key=lambda stage: stage.tensors)

    @property
    def tensors(self) -> int:
        """The peak of live tensors over all stages, bytes (what max_memory_allocated shows)."""
        return self.peak_stage.tensors

    @property
    def fragmentation(self) -> int:
        return round(FRAGMENTATION * self.tensors)

    @property
    def beyond_context(self) -> int:
        """Bytes the program needs on top of a created CUDA context."""
        return self.tensors + self.workspaces + self.fragmentation

    @property
    def total(self) -> int:
        """Bytes of GPU memory the process holds at its peak, context included."""
        return self.beyond_context + CUDA_CONTEXT_BYTES

    def summary(self) -> str:
        """One line: the total and its parts, in GB."""
        peak = self.peak_stage
        return (
            f"{self.total / GB:.2f} GB modelled: tensors {self.tensors / GB:.2f} GB at the "
            f"{peak.name} stage (weights {_weights(peak) / GB:.2f}), context "
            f"{CUDA_CONTEXT_BYTES / GB:.2f}, workspaces {self.workspaces / GB:.2f}, "
            f"fragmentation {self.fragmentation / GB:.2f}"
        )

    def as_dict(self) -> dict[str, object]:
        """The estimate as JSON-ready numbers, GB."""
        return {
            "total_gb": round(self.total / GB, 3),
            "tensors_gb": round(self.tensors / GB, 3),
            "peak_stage": self.peak_stage.name,
            "stages_gb": {s.name: round(s.tensors / GB, 3) for s in self.stages},
            "context_gb": round(CUDA_CONTEXT_BYTES / GB, 3),
            "workspaces_gb": round(self.workspaces / GB, 3),
            "fragmentation_gb": round(self.fragmentation / GB, 3),
        }


def _weights(stage: StagePeak) -> int:
    return stage.by_kind.get("parameters", 0) + stage.by_kind.get("buffers", 0)


Tracked = nn.Module | torch.optim.Optimizer


@dataclass(frozen=True)
class Program:
    """What runs on the device: what stays resident, and the stages in order.

    Attributes:
        networks: the networks, built on the meta device, that stay on the device
            throughout; `estimate` gives them fake storage before the stages run.
        stages: each stage's name and a call that runs it (creating its inputs).
        setup: run once the networks have storage, before the stages (an optimiser's
            creation, say); it returns more to keep resident (the optimiser).
    """

    networks: Sequence[nn.Module]
    stages: Sequence[tuple[str, Callable[[], object]]]
    setup: Callable[[], Sequence[Tracked]] | None = None


def _on_fake_device(module: nn.Module) -> None:
    """Give a module built on the meta device fake storage on the CPU. Its parameters
    require gradients: MemTracker hooks them."""
    module.to_empty(device="cpu")
    for parameter in module.parameters():
        parameter.requires_grad_(True)


@contextlib.contextmanager
def fake_tensors() -> Iterator[None]:
    """Tensors created within have shapes and no storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        # Copying a network (the EMA's deepcopy) looks at its data pointers, which fake
        # tensors lack; the copy is right all the same.
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        yield


def estimate(program: Program, workspaces: int) -> MemoryEstimate:
    """Run a program's stages on fake tensors, each under MemTracker.

    Args:
        workspaces: the libraries' workspace margin for this kind of program, bytes.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    peaks = []
    with fake_tensors():
        for network in program.networks:
            _on_fake_device(network)
        resident: list[Tracked] = list(program.networks)
        if program.setup is not None:
            resident += program.setup()
        for name, run in program.stages:
            tracker = MemTracker()
            tracker.track_external(*resident)
            with tracker:
                run()
            snapshot = tracker.get_tracker_snapshot("peak")
            by_kind: dict[str, int] = {}
            for kinds in snapshot.values():  # one device: the fake CPU
                for kind, value in kinds.items():
                    key = _KINDS.get(getattr(kind, "value", str(kind)))
                    if key is not None:
                        by_kind[key] = by_kind.get(key, 0) + int(value)
            peaks.append(StagePeak(name, by_kind))
    if not peaks:
        raise ValueError("a program needs at least one stage")
    return MemoryEstimate(tuple(peaks), workspaces)


def free_memory(device: torch.device) -> int:
    """Bytes this process may still allocate on a CUDA device: the driver's free memory,
    within the per-process fraction when one is set (`set_per_process_memory_fraction`)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    fraction = torch.cuda.get_per_process_memory_fraction(index)
    allowed = int(fraction * total) - torch.cuda.memory_reserved(index)
    return max(0, min(free, allowed))
