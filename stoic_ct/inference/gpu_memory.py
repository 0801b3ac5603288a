"""How much GPU memory one scan's prediction takes, and the batch sizes that fit a GPU.

The model (stoic_ct.device_memory) runs this package's own per-batch functions on fake
tensors: `classify_slices` (the R231 U-Net), `flip_summed_features` (a ViT encoder),
`volume_feature` (the frozen ConvNeXt encoder), `to_cube` and `mean_probabilities` (the
fine-tuned ConvNeXt), with every network of the system resident. The fast precision's
float16 autocast is stood in by the CPU's float16 autocast. The scan only sets how many
slices a batch can have and the size of the ConvNeXt's input volume: a chest CT,
512 x 512 x 300 voxels at 0.7 x 0.7 x 1.25 mm, unless told otherwise.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from stoic_ct.device_memory import (
    GB,
    INFERENCE_WORKSPACES,
    MemoryEstimate,
    Program,
    estimate,
)
from stoic_ct.errors import StoicError
from stoic_ct.inference.encoders import (
    VIT_BATCH,
    SliceEncoder,
    VolumeEncoder,
    flip_summed_features,
    volume_feature,
)
from stoic_ct.inference.fold_ensemble import FoldEnsemble, mean_probabilities
from stoic_ct.inference.lung_masks import R231_BATCH, R231Segmenter, classify_slices
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.inference.precision import check_precision
from stoic_ct.models.convnext3d import ConvNeXt3D
from stoic_ct.models.r231 import r231_network
from stoic_ct.models.vit import VIT_LARGE, VisionTransformer, ViTConfig
from stoic_ct.preprocessing.convnext_preprocessing import to_cube
from stoic_ct.preprocessing.cropping import SLICE_SIZE
from stoic_ct.preprocessing.lung_segmentation import R231_INPUT
from stoic_ct.preprocessing.resampling import resampled_size

CHEST_SCAN = (512, 512, 300)  # x, y, z voxels
CHEST_SPACING = (0.7, 0.7, 1.25)  # mm
PUBLISHED_VITS = (VIT_LARGE, replace(VIT_LARGE, depth=16))  # full (CT), lung (ImageNet)


@dataclass(frozen=True)
class ConvNeXtShape:
    """A 3D ConvNeXt as built: its size, input cube side, head outputs and metadata inputs."""

    size: str
    input_size: int
    outputs: int = 0
    metadata: int = 0

    @classmethod
    def of(cls, model: ConvNeXt3D, input_size: int) -> ConvNeXtShape:
        head = model.head
        outputs = head.out_features if isinstance(head, torch.nn.Linear) else 0
        return cls(model.size_name, input_size, outputs, model.metadata_dim)

    def build(self) -> ConvNeXt3D:
        with torch.device("meta"):
            return ConvNeXt3D(self.size, num_classes=self.outputs, metadata_dim=self.metadata)


@dataclass(frozen=True)
class Workload:
    """What one scan's prediction puts on a GPU.

    Attributes:
        precision: "exact" or "fast".
        vits: Balaitous's ViT encoders (full, lung); () when it has none.
        vit_batch: slices per ViT batch (each with its flip).
        r231_batch: slices per U-Net batch; None: no U-Net (lung masks given).
        frozen: the frozen ConvNeXt encoder, when Balaitous uses it instead of the ViTs.
        classifiers: the fine-tuned ConvNeXt's fold ensembles: (network, folds) per task.
        scan: x, y, z voxels of the scan; spacing: its mm.
    """

    precision: str = "exact"
    vits: tuple[ViTConfig, ...] = PUBLISHED_VITS
    vit_batch: int = VIT_BATCH["cuda"]
    r231_batch: int | None = R231_BATCH["cuda"]
    frozen: ConvNeXtShape | None = None
    classifiers: tuple[tuple[ConvNeXtShape, int], ...] = ()
    scan: tuple[int, int, int] = CHEST_SCAN
    spacing: tuple[float, float, float] = CHEST_SPACING

    def __post_init__(self) -> None:
        check_precision(self.precision)

    def describe(self) -> str:
        parts = []
        if self.r231_batch:
            parts.append(f"U-Net batch {self.r231_batch}")
        if self.vits:
            parts.append(f"ViT batch {self.vit_batch}")
        if self.frozen:
            parts.append(f"frozen ConvNeXt-{self.frozen.size} at {self.frozen.input_size}^3")
        parts += [
            f"{folds} x ConvNeXt-{s.size} at {s.input_size}^3" for s, folds in self.classifiers
        ]
        return ", ".join(parts) + f", {self.precision}"


def _numerics(precision: str) -> contextlib.AbstractContextManager[None]:
    """The stand-in of a GPU's numerics: float32, or float16 autocast (no weight cache:
    the networks' weights need no gradient at inference, so autocast caches none)."""
    if precision == "fast":
        return torch.autocast("cpu", dtype=torch.float16, cache_enabled=False)
    return contextlib.nullcontext()


def _program(workload: Workload) -> Program:
    """The networks (on meta) and per-stage calls of `workload`."""
    cpu = torch.device("cpu")
    networks: list[torch.nn.Module] = []
    stages: list[tuple[str, Callable[[], object]]] = []

    def network(module: torch.nn.Module) -> torch.nn.Module:
        networks.append(module.eval())
        return module

    def stage(name: str, run: Callable[[], object]) -> None:
        def inside() -> object:
            with torch.inference_mode(), _numerics(workload.precision):
                return run()

        stages.append((name, inside))

    slices = resampled_size(workload.scan, workload.spacing)[2]
    if workload.r231_batch:
        with torch.device("meta"):
            unet = network(r231_network())
        shape = (min(workload.r231_batch, slices), R231_INPUT, R231_INPUT)
        stage("lung mask", lambda: classify_slices(unet, torch.zeros(shape), cpu))
    for name, config in zip(("encoder full", "encoder lung"), workload.vits, strict=False):
        with torch.device("meta"):
            vit = network(VisionTransformer(config))
        batch = (SLICE_SIZE, SLICE_SIZE, min(workload.vit_batch, slices))

        def encode(vit: torch.nn.Module = vit, batch: tuple[int, ...] = batch) -> object:
            return flip_summed_features(vit, torch.zeros(batch, dtype=torch.int16), cpu)

        stage(name, encode)
    if workload.frozen is not None:
        frozen, side = network(workload.frozen.build()), workload.frozen.input_size
        stack = (slices, SLICE_SIZE, SLICE_SIZE)
        stage(
            "encoder",
            lambda: volume_feature(frozen, torch.zeros(stack, dtype=torch.int16), side),
        )
    x, y, z = workload.scan
    for number, (convnext, folds) in enumerate(workload.classifiers, start=1):
        models = [network(convnext.build()) for _ in range(folds)]

        def classify(
            models: list[torch.nn.Module] = models, convnext: ConvNeXtShape = convnext
        ) -> object:
            extra = torch.zeros((1, convnext.metadata)) if convnext.metadata else None
            cube = to_cube(torch.zeros((z, y, x)), convnext.input_size)
            return mean_probabilities(models, cube[None, None], extra, "softmax")

        stage(f"convnext3d {number}", classify)
    return Program(networks, stages)


@functools.lru_cache(maxsize=32)
def modelled_peak(workload: Workload) -> MemoryEstimate:
    """The peak GPU memory of one scan's prediction under `workload` (a few seconds)."""
    return estimate(_program(workload), INFERENCE_WORKSPACES)


def fit_batches(workload: Workload, budget: int) -> Workload:
    """`workload` with the largest batch sizes, from its own down, whose modelled peak
    (beyond the CUDA context) fits `budget` bytes: the batch of the peak stage is halved
    first.

    Raises:
        StoicError: when even batches of one slice do not fit, with the figures.
    """
    current = workload
    while True:
        needed = modelled_peak(current)
        if needed.beyond_context <= budget:
            return current
        halved = _halve(current, needed.peak_stage.name)
        if halved == current:
            raise StoicError(
                f"the GPU has {budget / GB:.1f} GB free for this process, and the model needs "
                f"{needed.beyond_context / GB:.1f} GB beyond the CUDA context at the smallest "
                f"batches ({needed.summary()}): free the GPU, or run on the CPU (--device cpu)"
            )
        current = halved


def _halve(workload: Workload, peak_stage: str) -> Workload:
    """The workload with the peak stage's batch halved, else the other's; the same when
    both are at one slice."""
    vit = max(1, workload.vit_batch // 2)
    unet = max(1, workload.r231_batch // 2) if workload.r231_batch else None
    first, second = (
        (replace(workload, r231_batch=unet), replace(workload, vit_batch=vit))
        if peak_stage == "lung mask"
        else (replace(workload, vit_batch=vit), replace(workload, r231_batch=unet))
    )
    return first if first != workload else second


def check_fits(workload: Workload, budget: int) -> MemoryEstimate:
    """The estimate of `workload`, when it fits `budget` bytes beyond the context.

    Raises:
        StoicError: when it does not, with the figures and what to change.
    """
    needed = modelled_peak(workload)
    if needed.beyond_context > budget:
        raise StoicError(
            f"{workload.describe()} needs {needed.beyond_context / GB:.1f} GB of GPU memory "
            f"beyond the CUDA context ({needed.summary()}), and this process has "
            f"{budget / GB:.1f} GB: lower --batch-size, or leave it out to have it chosen"
        )
    return needed


def workload_of(
    balaitous: Balaitous | None, fold_ensembles: Sequence[FoldEnsemble], precision: str
) -> Workload:
    """The Workload of loaded networks: a Balaitous model and fine-tuned fold ensembles."""
    vits: list[ViTConfig] = []
    frozen, vit_batch, r231_batch = None, VIT_BATCH["cuda"], None
    if balaitous is not None:
        for encoder in (balaitous.full, balaitous.lung):
            if isinstance(encoder, SliceEncoder) and isinstance(encoder.model, VisionTransformer):
                vits.append(encoder.model.config)
                vit_batch = encoder.batch_size
            elif isinstance(encoder, VolumeEncoder) and isinstance(encoder.model, ConvNeXt3D):
                frozen = ConvNeXtShape.of(encoder.model, encoder.input_size)
        if isinstance(balaitous.segmenter, R231Segmenter):
            r231_batch = balaitous.segmenter.batch_size
    classifiers = tuple(
        (ConvNeXtShape.of(ensemble.models[0], ensemble.input_size), len(ensemble.models))
        for ensemble in fold_ensembles
    )
    return Workload(precision, tuple(vits), vit_batch, r231_batch, frozen, classifiers)


def set_batches(balaitous: Balaitous, workload: Workload) -> None:
    """Give a loaded Balaitous model the workload's batch sizes."""
    for encoder in (balaitous.full, balaitous.lung):
        if isinstance(encoder, SliceEncoder):
            encoder.batch_size = workload.vit_batch
    if isinstance(balaitous.segmenter, R231Segmenter) and workload.r231_batch:
        balaitous.segmenter.batch_size = workload.r231_batch
