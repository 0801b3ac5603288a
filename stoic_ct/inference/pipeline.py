"""The Balaïtous pipeline: a CT volume and the patient's age and sex in, two probabilities out.

`Balaitous` owns the models and the device, loads them once, and runs any number of scans;
the pure steps it runs are in stoic_ct.preprocessing (resampling, lung_segmentation's pre-
and post-processing, cropping.prepare_slices for steps 4-7).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from stoic_ct.errors import ModelFileError, StoicError
from stoic_ct.inference.encoders import VIT_BLOCKS, Encoder, load_encoders
from stoic_ct.inference.lung_masks import R231Segmenter
from stoic_ct.inference.precision import EXACT_ON_CPU, ModelSettings
from stoic_ct.inference.prediction import Prediction
from stoic_ct.io.demographics import Demographics
from stoic_ct.io.volume import Volume
from stoic_ct.models.heads import LogisticHeads
from stoic_ct.preprocessing.cropping import SliceStack, mask_outside_lungs, prepare_slices
from stoic_ct.preprocessing.lung_segmentation import LungSegmenter, labels_from_mask_image
from stoic_ct.preprocessing.resampling import resample
from stoic_ct.weights.checkpoints import check_r231_weights
from stoic_ct.weights.model_files import (
    HEADS,
    R231,
    ModelFiles,
    ModelFileSpec,
    encoder_kind,
    problem,
)
from stoic_ct.weights.network_files import load_heads, load_vit
from stoic_ct.weights.system_record import choose

logger = logging.getLogger(__name__)

# Where the lung masks come from: the R231 U-Net, the caller (with each scan), or a
# segmenter of the caller's.
LungMasks = Literal["r231", "given"] | LungSegmenter


@dataclass(frozen=True)
class EncodedScan:
    """The two encoder features of one scan and what the encoders saw.

    Attributes:
        features: "full" and "lung" encoder features, (D,) float64 each.
        slices: the encoders' input, for quality control.
        seconds: wall time per stage.
    """

    features: dict[str, np.ndarray]
    slices: SliceStack
    seconds: dict[str, float]


@dataclass(frozen=True)
class BalaitousPrediction(Prediction):
    """A Prediction with what led to it.

    Attributes:
        demographics: the age and sex the heads were given.
        features: "full" and "lung" encoder features, (D,) float64 each.
        slices: the encoders' input, for quality control.
    """

    demographics: Demographics
    features: dict[str, np.ndarray]
    slices: SliceStack


def check_model_file(spec: ModelFileSpec, path: Path) -> None:
    """Raise ModelFileError unless `path` loads as the published `spec` file (keys, shapes)."""
    if spec in VIT_BLOCKS:
        load_vit(path, spec, VIT_BLOCKS[spec])
    elif spec == R231:
        check_r231_weights(path)
    elif spec == HEADS:
        load_heads(path)
    else:
        raise ValueError(f"no check for {spec.name}")


class Balaitous:
    """The Balaïtous model: lung segmenter, two encoders and four logistic heads on a device.

    The encoders are the published ViTs, or the frozen 3D ConvNeXt
    (`encoder="convnext3d-frozen"`) seeing the same crops whole; the heads are the ones
    fitted on that encoder's features.
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
        settings: ModelSettings = EXACT_ON_CPU,
        *,
        lung_masks: LungMasks = "r231",
    ) -> Balaitous:
        """The whole model, for prediction, from `model_dir` (never from the network).

        Args:
            settings: device, precision, encoder choice and batch size.
            lung_masks: "r231" (the published U-Net), "given" (each call brings a lung
                mask; no U-Net is loaded), or a segmenter to use instead of the U-Net.

        Raises:
            ModelFileError: when a file is missing or malformed, or the files do not fit together.
        """
        return cls._load(model_dir, settings, lung_masks, with_heads=True)

    @classmethod
    def feature_extractor(
        cls,
        model_dir: Path,
        settings: ModelSettings = EXACT_ON_CPU,
        *,
        lung_masks: LungMasks = "r231",
    ) -> Balaitous:
        """The model without heads, for extracting features before fitting them (`encode`).

        Raises:
            ModelFileError: when a file is missing or malformed.
        """
        return cls._load(model_dir, settings, lung_masks, with_heads=False)

    @classmethod
    def _load(
        cls, model_dir: Path, settings: ModelSettings, lung_masks: LungMasks, with_heads: bool
    ) -> Balaitous:
        try:
            kind = encoder_kind(settings.encoder or choose(model_dir).encoder)
        except ValueError as error:
            raise StoicError(str(error)) from None
        files = ModelFiles(model_dir)
        if files.are_random:
            logger.warning(
                "%s holds RANDOMLY INITIALISED weights: the probabilities only check the setup "
                "and mean nothing; see model/README.md for the real files",
                model_dir,
            )
        heads = load_heads(files.path(kind.heads)) if with_heads else None
        encoders = load_encoders(kind, files, settings)
        for name, encoder in (("full", encoders.full), ("lung", encoders.lung)):
            if heads is not None and encoder.dim != heads.feature_dim:
                raise ModelFileError(
                    problem(
                        kind.heads,
                        f"its heads take {heads.feature_dim} features but "
                        f"{encoders.sources[name].name} gives {encoder.dim}: the files do not "
                        "belong together",
                    ),
                    files.path(kind.heads),
                )
        segmenter: LungSegmenter | None
        if lung_masks == "r231":
            segmenter = R231Segmenter(files.r231, settings.device, precision=settings.precision)
        elif lung_masks == "given":
            segmenter = None
        else:
            segmenter = lung_masks
        return cls(encoders.full, encoders.lung, heads, segmenter)

    def encode(self, volume: Volume, lung_labels: Volume | None = None) -> EncodedScan:
        """Run the pipeline up to the two encoder features (published steps 2-11).

        Args:
            volume: the CT as read, HU, any grid.
            lung_labels: a lung label image of any geometry to use instead of the
                segmenter (1 right, 2 left, or one foreground value).

        Raises:
            InputError: when the volume is too small for the working grid, or the lung
                mask cannot be used.
        """
        watch = Stopwatch()
        resampled = resample(volume)
        watch.lap("resample")
        if lung_labels is not None:
            labels = labels_from_mask_image(lung_labels, resampled)
        elif self.segmenter is not None:
            labels = self.segmenter(resampled)
        else:
            raise StoicError(
                "no lung segmenter is loaded (lung_masks='given') and no lung mask was given"
            )
        watch.lap("lung mask")
        stack = prepare_slices(resampled, labels)
        watch.lap("crop")
        return self.encode_slices(stack, watch.seconds)

    def encode_slices(self, stack: SliceStack, seconds: dict[str, float]) -> EncodedScan:
        """The encoders on prepared slices (published steps 8-11); `seconds` so far, to
        which theirs are added."""
        watch = Stopwatch(dict(seconds))
        image = stack.image[..., stack.kept]
        features = {"full": self.full(image)}
        watch.lap("encoder full")
        features["lung"] = self.lung(mask_outside_lungs(image, stack.mask[..., stack.kept]))
        watch.lap("encoder lung")
        return EncodedScan(features, stack, watch.seconds)

    def predict(
        self, volume: Volume, demographics: Demographics, lung_labels: Volume | None = None
    ) -> BalaitousPrediction:
        """Run the whole pipeline on one CT: `encode`, then the heads.

        Raises:
            InputError: as `encode`.
        """
        if self.heads is None:
            raise StoicError("no heads are loaded: this model only extracts features")
        return self.classify(self.encode(volume, lung_labels), demographics)

    def classify(self, encoded: EncodedScan, demographics: Demographics) -> BalaitousPrediction:
        """The heads on an encoded scan (published step 12)."""
        if self.heads is None:
            raise StoicError("no heads are loaded: this model only extracts features")
        watch = Stopwatch(dict(encoded.seconds))
        probabilities = self.heads(
            encoded.features, demographics.age_feature, demographics.sex_feature
        )
        watch.lap("heads")
        return BalaitousPrediction(
            probabilities, watch.seconds, demographics, encoded.features, encoded.slices
        )


@dataclass
class Stopwatch:
    """Wall time per stage: each `lap` records the seconds since the previous one."""

    seconds: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        """Record `stage` as having taken the time since the last lap (added to any before)."""
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.clock
        self.clock = now
