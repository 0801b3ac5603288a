"""Lung labels on the working grid: lungmask's R231 U-Net, or a label image given by the user.

Labels follow lungmask: 0 background, 1 right lung, 2 left lung, as a (z, y, x) uint8
array on the grid of the volume it was computed for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from stoic_ct.errors import InputError
from stoic_ct.inference.precision import CalibratedInt8, check_precision, numerics, uses_int8
from stoic_ct.io.volume import Volume
from stoic_ct.models.r231 import r231_network
from stoic_ct.preprocessing.resampling import resample_labels
from stoic_ct.weights.checkpoints import check_r231_weights, load_state_dict, release_file_pages
from stoic_ct.weights.model_files import R231

logger = logging.getLogger(__name__)

# lungmask's own HU clip before its U-Net (lungmask.utils.preprocess).
LUNGMASK_WINDOW = (-1024, 600)

RIGHT_LUNG, LEFT_LUNG = 1, 2
_WORKERS = min(8, os.cpu_count() or 1)
# Slices per U-Net batch by device type: throughput is flat from 4 on a CPU and 8 on a GPU;
# each slice holds about 120 MB of activations (float32, the memory model).
R231_BATCH = {"cuda": 8, "cpu": 4}
R231_INPUT = 256  # lungmask's slice side at the U-Net's input


class LungSegmenter(Protocol):
    """Anything that labels the lungs of a volume: (z, y, x) uint8, 1 right, 2 left."""

    def __call__(self, volume: Volume) -> np.ndarray: ...


class R231Segmenter:
    """lungmask's R231 U-Net, run as lungmask runs it, from a local weights file.

    lungmask's own pre- and post-processing (body crop and resize to 256 x 256, the 3D
    connected-component clean-up, the resize back) are used as they are, the per-slice
    steps on several threads; only the network runs differently: weights memory-mapped and
    released after use, channels-last memory on a CPU, batches sized to the device, and in
    the fast precision int8 or bfloat16 (CPU) or float16 (GPU). In the exact precision the
    labels equal lungmask's `LMInferer`.
    """

    def __init__(
        self,
        weights: Path,
        device: torch.device,
        batch_size: int | None = None,
        precision: str = "exact",
    ) -> None:
        check_r231_weights(weights)
        self.weights, self.device, self.precision = weights, device, check_precision(precision)
        self.batch_size = batch_size or R231_BATCH[device.type]
        with torch.device("meta"):
            model = r231_network()
        state = load_state_dict(weights, R231)
        for key, value in model.state_dict().items():  # counters old checkpoints lack
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = torch.zeros(value.shape, dtype=value.dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model = model.eval().requires_grad_(False)
        # lungmask logs every stage to stdout at INFO, which would mix with our results.
        logging.getLogger("lungmask").setLevel(logging.WARNING)
        if device.type == "cuda":
            self._network: Callable[[torch.Tensor], torch.Tensor] = model.to(device)
            self._mapped: list[torch.Tensor] = []
        else:
            self._mapped = list(model.state_dict().values())
            self._network = model.to(memory_format=torch.channels_last)
        self._model = model
        self._int8: CalibratedInt8 | None = None

    def __call__(self, volume: Volume) -> np.ndarray:
        """Lung labels for `volume`, (z, y, x) uint8, same grid."""
        unet_input = lungmask_input(volume)
        return lungmask_labels(self.classify(unet_input.slices), unet_input)

    @torch.inference_mode()
    def classify(self, slices: np.ndarray) -> np.ndarray:
        """(Z, 256, 256) inputs in [0, 1] -> (Z, 256, 256) uint8 argmax classes."""
        out = np.empty(slices.shape, dtype=np.uint8)
        if uses_int8(self.device, self.precision) and self._int8 is None:
            # Ranges from slices across the scan, top, middle and bottom.
            picks = np.linspace(0, len(slices) - 1, num=min(3, len(slices))).round().astype(int)
            samples = torch.as_tensor(slices[picks, None], dtype=torch.float32)
            self._int8 = CalibratedInt8(self._model, samples)
            self._network = self._int8
        with numerics(self.device, self.precision):
            for start in range(0, len(slices), self.batch_size):
                chunk = slices[start : start + self.batch_size]
                classes = classify_slices(self._network, chunk, self.device)
                out[start : start + len(classes)] = classes.cpu().numpy()
        release_file_pages(self._mapped, self.weights)
        return out


@dataclass(frozen=True)
class UNetInput:
    """What lungmask's pre-processing makes of a volume, for the U-Net and for the way back.

    Attributes:
        slices: (Z, 256, 256) float64 in [0, 1]: each axial slice (LPS order) cropped to the
            body and resized.
        boxes: each slice's body box, to put its classes back.
        shape: (Z, H, W) of the LPS-ordered volume.
        orientation: the volume's own orientation code, to turn the labels back to.
    """

    slices: np.ndarray
    boxes: list[np.ndarray]
    shape: tuple[int, int, int]
    orientation: str


def lungmask_input(volume: Volume) -> UNetInput:
    """lungmask's pre-processing (utils.preprocess) of a volume in HU, per-slice steps on
    several threads (scipy lets go of the GIL)."""
    from lungmask import utils

    image = volume.to_sitk()
    orientation = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(
        image.GetDirection()
    )
    if orientation != "LPS":
        image = sitk.DICOMOrient(image, "LPS")
    raw = sitk.GetArrayFromImage(image)
    clipped = np.clip(raw, *LUNGMASK_WINDOW)
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        cropped = list(
            pool.map(
                lambda s: utils.crop_and_resize(s, width=R231_INPUT, height=R231_INPUT),
                clipped,
            )
        )
    slices = np.asarray([c[0] for c in cropped])
    low, high = LUNGMASK_WINDOW
    slices[slices > high] = high
    z, y, x = raw.shape
    return UNetInput(
        np.divide(slices - low, high - low), [c[1] for c in cropped], (z, y, x), orientation
    )


def lungmask_labels(classes: np.ndarray, unet_input: UNetInput) -> np.ndarray:
    """lungmask's post-processing: the U-Net's (Z, 256, 256) classes to (z, y, x) uint8 lung
    labels on the grid of the volume `unet_input` came from (3D connected-component
    clean-up, then each slice put back in its box, on several threads)."""
    from lungmask import utils

    labels = utils.postprocessing(classes, disable_tqdm=True)
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        labels = np.asarray(
            list(
                pool.map(
                    lambda i: utils.reshape_mask(
                        labels[i], unet_input.boxes[i], unet_input.shape[1:]
                    ),
                    range(len(labels)),
                )
            ),
            dtype=np.uint8,
        )
    if unet_input.orientation != "LPS":
        back = sitk.DICOMOrient(sitk.GetImageFromArray(labels), unet_input.orientation)
        labels = sitk.GetArrayFromImage(back)
    return labels.astype(np.uint8, copy=False)


def classify_slices(
    network: Callable[[torch.Tensor], torch.Tensor],
    slices: np.ndarray | torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """(B, 256, 256) U-Net inputs in [0, 1] -> (B, 256, 256) uint8 argmax classes on
    `device` (channels-last memory on a CPU)."""
    batch = torch.as_tensor(slices[:, None], dtype=torch.float32).to(device)
    if device.type == "cpu":
        batch = batch.contiguous(memory_format=torch.channels_last)
    return network(batch).argmax(1).to(torch.uint8)


# Two lungs hold 4-6 L; a scan cut at mid-thorax still shows well over this much of them.
MIN_LUNG_MASK_ML = 250.0


def labels_from_mask_image(mask: Volume, reference: Volume) -> np.ndarray:
    """Lung labels on `reference`'s grid from a user's mask image of any geometry.

    Labels 1 (right) and 2 (left) are taken as they are. A mask with a single foreground
    value is split into its two largest 3D components, the one further to the patient's
    right labelled 1; smaller components are dropped.

    Returns:
        (z, y, x) uint8 labels on `reference`'s grid.

    A mask under MIN_LUNG_MASK_ML (a lesion label given by mistake, say) is used with a
    warning.

    Raises:
        InputError: when the values are neither {0, 1, 2} nor one foreground value, or
            no lung voxel falls inside the scan.
    """
    values = np.unique(mask.voxels)
    foreground = values[values != 0]
    is_labelled = set(values.tolist()) <= {0, RIGHT_LUNG, LEFT_LUNG} and len(foreground) == 2
    if not is_labelled and len(foreground) != 1:
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise InputError(
            f"the lung mask holds the values {shown}; expected 0 with 1 (right lung) and "
            "2 (left lung), as lungmask writes them, or 0 with one foreground value"
        )
    on_grid = resample_labels(mask, reference)
    if not np.any(on_grid):
        raise InputError("no lung voxel of the mask falls inside the scan")
    millilitres = np.count_nonzero(on_grid) * float(np.prod(reference.spacing)) / 1000.0
    if millilitres < MIN_LUNG_MASK_ML:
        logger.warning(
            "the lung mask covers only %.0f mL of the scan, where lungs hold litres: is it a "
            "lung mask, not a lesion or tumour label? The crop and the slices follow it",
            millilitres,
        )
    if is_labelled:
        return on_grid.astype(np.uint8)
    return split_lungs(on_grid != 0, reference)


def split_lungs(binary: np.ndarray, geometry: Volume) -> np.ndarray:
    """Label the two largest 3D components of a (z, y, x) binary mask: 1 right, 2 left.

    `geometry` gives the physical axes, so that "right" is the patient's right (smaller
    LPS x) whatever the image orientation. One component only is labelled 1.
    """
    components, count = ndimage.label(binary, structure=np.ones((3, 3, 3), dtype=bool))
    labels = np.zeros(binary.shape, dtype=np.uint8)
    if count == 0:
        return labels
    sizes = np.bincount(components.ravel())[1:]
    largest = np.argsort(-sizes, kind="stable")[:2] + 1
    if len(largest) == 1:
        logger.warning("the lung mask has one connected component; it is kept as one lung")
        labels[components == largest[0]] = RIGHT_LUNG
        return labels
    centres_x = [_physical_x(np.argwhere(components == c).mean(axis=0), geometry) for c in largest]
    right, left = largest if centres_x[0] <= centres_x[1] else largest[::-1]
    labels[components == right] = RIGHT_LUNG
    labels[components == left] = LEFT_LUNG
    return labels


def _physical_x(index_zyx: np.ndarray, geometry: Volume) -> float:
    """LPS x (mm) of a continuous (z, y, x) index; smaller is further to the patient's right."""
    index_xyz = index_zyx[::-1] * np.asarray(geometry.spacing)
    direction = np.asarray(geometry.direction).reshape(3, 3)
    return float(geometry.origin[0] + direction[0] @ index_xyz)


def threshold_lungs(volume: Volume) -> np.ndarray:
    """Lung labels by thresholding: air (< -500 HU) enclosed by the body in each axial slice.

    Not a lung segmentation for real scans: a deterministic, fast stand-in for the U-Net,
    with which tests and the benchmark give the published package and this one the same
    masks. Label 1 in the half of the columns with smaller x index, 2 in the other half;
    the trachea is labelled too, so the mask cleaning has something to remove.

    Returns:
        (z, y, x) uint8 labels on `volume`'s grid.
    """
    voxels = volume.voxels
    labels = np.zeros(voxels.shape, dtype=np.uint8)
    for k in range(voxels.shape[0]):
        body = ndimage.binary_fill_holes(voxels[k] > -500)
        labels[k][body & (voxels[k] < -500)] = RIGHT_LUNG
    half = voxels.shape[2] // 2
    labels[..., half:][labels[..., half:] == RIGHT_LUNG] = LEFT_LUNG
    return labels
