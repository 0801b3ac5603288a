"""Lung labels on the working grid: lungmask's pre- and post-processing around its R231
U-Net (the network runs in stoic_ct.inference.lung_masks), or a label image given by the
user.

Labels follow lungmask: 0 background, 1 right lung, 2 left lung, as a (z, y, x) uint8
array on the grid of the volume it was computed for.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from stoic_ct.errors import InputError
from stoic_ct.io.volume import Volume
from stoic_ct.preprocessing.resampling import resample_labels

logger = logging.getLogger(__name__)

# lungmask's own HU clip before its U-Net (lungmask.utils.preprocess).
LUNGMASK_WINDOW = (-1024, 600)

RIGHT_LUNG, LEFT_LUNG = 1, 2
_WORKERS = min(8, os.cpu_count() or 1)
R231_INPUT = 256  # lungmask's slice side at the U-Net's input


class LungSegmenter(Protocol):
    """Anything that labels the lungs of a volume: (z, y, x) uint8, 1 right, 2 left."""

    def __call__(self, volume: Volume) -> np.ndarray: ...


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
