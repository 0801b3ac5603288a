"""The Balaïtous pipeline: a CT volume and the patient's age and sex in, two probabilities out.

`prepare_slices` is the pure part (published steps 4-7); `Balaitous` owns the models and
the device, loads them once, and runs any number of scans.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from stoic_ct.errors import ModelFileError, StoicError
from stoic_ct.inference.encoders import SliceEncoder, VolumeEncoder
from stoic_ct.io.demographics import Demographics
from stoic_ct.io.volume import Volume
from stoic_ct.models.convnext3d import load_convnext3d
from stoic_ct.models.heads import LogisticHeads, Probabilities
from stoic_ct.models.vit import load_vit
from stoic_ct.preprocessing.cropping import (
    InPlaneCrop,
    clean_lung_mask,
    crop_or_pad,
    lung_slice_range,
    mask_outside_lungs,
    to_slice_layout,
)
from stoic_ct.preprocessing.lung_segmentation import (
    LungSegmenter,
    R231Segmenter,
    labels_from_mask_image,
)
from stoic_ct.preprocessing.resampling import resample
from stoic_ct.weights.checkpoints import check_r231_weights
from stoic_ct.weights.model_files import (
    ENCODER_KINDS,
    HEADS,
    R231,
    VIT_CT,
    VIT_IMAGENET,
    ModelFiles,
    ModelFileSpec,
    heads_spec,
    problem,
)

logger = logging.getLogger(__name__)

FULL_ENCODER_BLOCKS = 24
LUNG_ENCODER_BLOCKS = 16


@dataclass(frozen=True)
class SliceStack:
    """What the encoders see, on the working grid in the published (H, W, Z) layout.

    Attributes:
        image: (224, 224, Z) HU, every axial slice of the scan.
        mask: (224, 224, Z) bool, the cleaned lung mask.
        kept: the axial slices given to the encoders.
        crop: where the 224 x 224 window lies on the resampled slices.
        lung_found: False when the mask is empty and all slices are kept.
    """

    image: np.ndarray
    mask: np.ndarray
    kept: slice
    crop: InPlaneCrop
    lung_found: bool


def prepare_slices(volume: Volume, labels: np.ndarray) -> SliceStack:
    """Published steps 4-7 on a resampled volume and its (z, y, x) lung labels."""
    image = to_slice_layout(volume.voxels)
    if not (
        np.issubdtype(image.dtype, np.signedinteger) or np.issubdtype(image.dtype, np.floating)
    ):
        # Padding and masking write -1024, which unsigned types cannot hold.
        image = image.astype(np.float32)
    mask = clean_lung_mask(image, to_slice_layout(labels))
    image, mask, crop = crop_or_pad(image, mask)
    kept = lung_slice_range(mask)
    if kept is None:
        logger.warning(
            "no lung found in the scan; the model sees all %d axial slices, uncropped, and "
            "an empty lung mask: check the scan (QC image) before trusting the result",
            image.shape[2],
        )
        return SliceStack(image, mask, slice(0, image.shape[2]), crop, lung_found=False)
    return SliceStack(image, mask, kept, crop, lung_found=True)


class Encoder(Protocol):
    """A frozen encoder: (H, W, Z) HU slices -> (D,) feature."""

    dim: int

    def __call__(self, slices: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Encoded:
    """The two features of one scan and what the encoders saw.

    Attributes:
        features: "full" and "lung" encoder features, (D,) float64 each.
        slices: the encoders' input, for quality control.
        seconds: wall time per stage.
    """

    features: dict[str, np.ndarray]
    slices: SliceStack
    seconds: dict[str, float]


@dataclass(frozen=True)
class Result:
    """The probabilities for one scan with what led to them.

    Attributes:
        features: "full" and "lung" encoder features, (D,) each.
        slices: the encoders' input, for quality control.
        seconds: wall time per stage.
    """

    probabilities: Probabilities
    demographics: Demographics
    features: dict[str, np.ndarray]
    slices: SliceStack
    seconds: dict[str, float] = field(default_factory=dict)


def check_model_file(spec: ModelFileSpec, path: Path) -> None:
    """Raise ModelFileError unless `path` loads as the published `spec` file (keys, shapes)."""
    if spec == VIT_CT:
        load_vit(path, VIT_CT, FULL_ENCODER_BLOCKS)
    elif spec == VIT_IMAGENET:
        load_vit(path, VIT_IMAGENET, LUNG_ENCODER_BLOCKS)
    elif spec == R231:
        check_r231_weights(path)
    elif spec == HEADS:
        LogisticHeads.load(path)
    else:
        raise ValueError(f"no check for {spec.name}")


def resolve_device(name: str) -> torch.device:
    """ "auto" (a GPU when there is one), "cpu" or "cuda"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StoicError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name not in ("cpu", "cuda"):
        raise StoicError(f"device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


class Balaitous:
    """The Balaïtous model: lung segmenter, two encoders and four logistic heads on a device.

    The encoders are the published ViTs, or a 3D ConvNeXt (`encoder="convnext3d"`) seeing
    the same crops whole; the heads are the ones fitted on that encoder's features.
    """

    def __init__(
        self,
        full: Encoder,
        lung: Encoder,
        heads: LogisticHeads | None,
        segmenter: LungSegmenter | None,
    ) -> None:
        self.full, self.lung, self.heads, self.segmenter = full, lung, heads, segmenter

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path,
        device: torch.device,
        *,
        segmenter: LungSegmenter | None = None,
        with_segmenter: bool = True,
        batch_size: int | None = None,
        precision: str = "exact",
        encoder: str = "vit",
        with_heads: bool = True,
    ) -> Balaitous:
        """Load every model from `model_dir` (never from the network).

        Args:
            segmenter: used instead of the R231 U-Net when given.
            with_segmenter: False to skip the U-Net, for runs that bring their own masks.
            batch_size: slices per ViT batch (default: 32 on a GPU, 16 on a CPU).
            precision: "exact" (the published numbers) or "fast" (see stoic_ct.inference.precision).
            encoder: "vit" (the published model) or "convnext3d" (convnext3d.pth).
            with_heads: False to load no heads, for feature extraction before fitting them.

        Raises:
            ModelFileError: when a file is missing or malformed, or the files do not fit together.
        """
        if encoder not in ENCODER_KINDS:
            raise StoicError(f"encoder must be one of {', '.join(ENCODER_KINDS)}, not {encoder!r}")
        files = ModelFiles(model_dir)
        if files.are_random:
            logger.warning(
                "%s holds RANDOMLY INITIALISED weights: the probabilities only check the setup "
                "and mean nothing; see model/README.md for the real files",
                model_dir,
            )
        spec = heads_spec(encoder)
        heads = LogisticHeads.load(files.path(spec)) if with_heads else None
        encoders: dict[str, Encoder] = {}
        if encoder == "convnext3d":
            convnext, input_size = load_convnext3d(files.convnext3d)
            shared = VolumeEncoder(convnext, device, input_size, precision)
            encoders = {"full": shared, "lung": shared}
            sources = {"full": files.convnext3d, "lung": files.convnext3d}
        else:
            sources = {"full": files.vit_ct, "lung": files.vit_imagenet}
            for name, vit_spec, blocks in (
                ("full", VIT_CT, FULL_ENCODER_BLOCKS),
                ("lung", VIT_IMAGENET, LUNG_ENCODER_BLOCKS),
            ):
                vit = load_vit(sources[name], vit_spec, blocks)
                encoders[name] = SliceEncoder(
                    vit, device, batch_size, precision, weights=sources[name]
                )
        for name, source in sources.items():
            if heads is not None and encoders[name].dim != heads.feature_dim:
                raise ModelFileError(
                    problem(
                        spec,
                        f"its heads take {heads.feature_dim} features but {source.name} gives "
                        f"{encoders[name].dim}: the files do not belong together",
                    ),
                    files.path(spec),
                )
        if segmenter is None and with_segmenter:
            segmenter = R231Segmenter(files.r231, device, precision=precision)
        return cls(encoders["full"], encoders["lung"], heads, segmenter)

    def encode(self, volume: Volume, lung_labels: Volume | None = None) -> Encoded:
        """Run the pipeline up to the two encoder features (published steps 2-11).

        Args:
            volume: the CT as read, HU, any grid.
            lung_labels: a lung label image of any geometry to use instead of the
                segmenter (1 right, 2 left, or one foreground value).

        Raises:
            InputError: when the volume is too small for the working grid, or the lung
                mask cannot be used.
        """
        seconds: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[stage] = now - clock
            clock = now

        resampled = resample(volume)
        lap("resample")
        if lung_labels is not None:
            labels = labels_from_mask_image(lung_labels, resampled)
        elif self.segmenter is not None:
            labels = self.segmenter(resampled)
        else:
            raise StoicError("no lung segmenter is loaded and no lung mask was given")
        lap("lung mask")
        stack = prepare_slices(resampled, labels)
        lap("crop")
        image = stack.image[..., stack.kept]
        features = {"full": self.full(image)}
        lap("encoder full")
        features["lung"] = self.lung(mask_outside_lungs(image, stack.mask[..., stack.kept]))
        lap("encoder lung")
        return Encoded(features, stack, seconds)

    def predict(
        self, volume: Volume, demographics: Demographics, lung_labels: Volume | None = None
    ) -> Result:
        """Run the whole pipeline on one CT: `encode`, then the heads.

        Raises:
            InputError: as `encode`.
        """
        if self.heads is None:
            raise StoicError("no heads are loaded: this model only extracts features")
        encoded = self.encode(volume, lung_labels)
        started = time.perf_counter()
        probabilities = self.heads(
            encoded.features, demographics.age_feature, demographics.sex_feature
        )
        seconds = encoded.seconds | {"heads": time.perf_counter() - started}
        return Result(probabilities, demographics, encoded.features, encoded.slices, seconds)
