"""Where and in what numbers the networks run: the device, and the precision, "exact" (the
published numbers) or "fast".

exact: float32 everywhere, no TF32 on GPUs. fast: on a GPU, float16 autocast; on a CPU
with AMX, bfloat16 autocast; on other CPUs, int8: dynamic quantisation of the ViT's Linear
layers, and static quantisation of the U-Net's convolutions, calibrated on slices of the
first scan it sees. "int8" and "bfloat16" ask for one of the CPU's two fast modes whatever
the CPU has. The benchmark runs both on a CPU, measures what each costs in probability and
time, and says which was faster (bench/README): on a CPU with AVX512-BF16 but no AMX, int8
was (its ViTs faster, the U-Net slower than in bfloat16).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from stoic_ct.errors import StoicError

PRECISIONS = ("exact", "fast", "int8", "bfloat16")
CPU_FAST = ("int8", "bfloat16")  # the CPU's two fast modes


def check_precision(name: str) -> str:
    """`name` when it is a precision; ValueError otherwise."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {name!r}")
    return name


def bfloat16_units() -> tuple[str, ...]:
    """The CPU's bfloat16 matrix units that PyTorch's kernels use: "AMX", "AVX512-BF16"."""
    found = []
    if torch.cpu._is_amx_tile_supported():
        found.append("AMX")
    if torch.cpu._is_avx512_bf16_supported():
        found.append("AVX512-BF16")
    return tuple(found)


def cpu_fast(units: tuple[str, ...] | None = None) -> str:
    """What "fast" means on a CPU with these bfloat16 `units` (default: this CPU's):
    "bfloat16" with AMX, "int8" without (AVX512-BF16 alone was slower than int8 on the
    benchmark)."""
    return "bfloat16" if "AMX" in (bfloat16_units() if units is None else units) else "int8"


def numerics_of(device: torch.device, precision: str) -> str:
    """The numbers the networks compute in: "exact" (float32), "float16" (a GPU's fast),
    "int8" or "bfloat16" (a CPU's fast).

    Raises:
        StoicError: for a CPU mode (int8, bfloat16) on a GPU.
    """
    check_precision(precision)
    if precision == "exact":
        return "exact"
    if device.type == "cuda":
        if precision != "fast":
            raise StoicError(
                f"--precision {precision} is one of the CPU's fast modes; on a GPU, "
                "--precision fast is float16"
            )
        return "float16"
    return cpu_fast() if precision == "fast" else precision


def uses_int8(device: torch.device, precision: str) -> bool:
    """Whether the networks are quantised to int8 (a CPU's fast mode without bfloat16 units,
    or asked for)."""
    return numerics_of(device, precision) == "int8"


def resolve_device(name: str) -> torch.device:
    """ "auto" (a GPU when there is one), "cpu" or "cuda"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StoicError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name not in ("cpu", "cuda"):
        raise StoicError(f"device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


@dataclass(frozen=True)
class ModelSettings:
    """How the networks of a system run.

    Attributes:
        device: where they run (default: the CPU).
        precision: "exact" (the published numbers), "fast", or one of the CPU's fast modes
            ("int8", "bfloat16"; see the module's docstring).
        encoder: the frozen encoders under the heads (stoic_ct.weights.model_files.ENCODER_CHOICES);
            None: the model folder's choice (its system.json; the ViTs without one).
        batch_size: slices per ViT batch (default: 16 on a CPU; on a GPU the largest up to 32
            that the memory model says fits, stoic_ct.inference.systems.fit_to_gpu).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "exact"
    encoder: str | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        numerics_of(self.device, self.precision)  # a CPU mode on a GPU is refused here
        if self.batch_size is not None and self.batch_size < 1:
            raise StoicError(f"the batch size must be at least 1, not {self.batch_size}")


EXACT_ON_CPU = ModelSettings()  # the library's default: the published numbers, on the CPU


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Full float32 precision on a GPU: no TF32 in convolutions or matrix products.

    PyTorch lets cuDNN convolutions use TF32 by default on Ampere and later GPUs, which
    moves features by ~1e-3; the exact mode must give the CPU's numbers.
    """
    previous = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous[0]
        torch.set_float32_matmul_precision(previous[1])


def numerics(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """The context the networks run in: exact float32, float16 autocast on a GPU, bfloat16
    autocast on a CPU (int8 networks are quantised beforehand and run in this float32 one)."""
    kind = numerics_of(device, precision)
    if kind == "float16":
        return torch.autocast("cuda", dtype=torch.float16)
    if kind == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return exact_float32()


@contextlib.contextmanager
def _quiet_quantisation() -> Iterator[None]:
    # torch.ao.quantization announces on every call that it moves to torchao; it still works.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def int8_linear(model: nn.Module) -> nn.Module:
    """`model` with its Linear layers replaced, in place, by int8 ones (weights quantised
    once, activations per batch). CPU only."""
    from torch.ao.quantization import quantize_dynamic

    with _quiet_quantisation():
        quantised: nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {nn.Linear}, dtype=torch.qint8, inplace=True
        )
        return quantised


class CalibratedInt8:
    """A convolutional network in int8, calibrated on sample inputs (CPU).

    The float network runs once on the samples with observers, which record activation
    ranges; the int8 network is built from them and used from then on.
    """

    def __init__(self, model: nn.Module, samples: torch.Tensor) -> None:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        with _quiet_quantisation():
            observed = prepare_fx(
                copy.deepcopy(model), get_default_qconfig_mapping("x86"), example_inputs=(samples,)
            )
            observed(samples)
            self.network: nn.Module = convert_fx(observed)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.network(batch)
