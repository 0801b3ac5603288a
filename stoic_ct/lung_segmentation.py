"""Lung labels on the working grid: lungmask's R231 U-Net, or a label image given by the user.

Labels follow lungmask: 0 background, 1 right lung, 2 left lung, as a (z, y, x) uint8
array on the grid of the volume it was computed for.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from scipy import ndimage

from stoic_ct.checkpoints import check_r231_weights
from stoic_ct.errors import InputError
from stoic_ct.resampling import resample_labels
from stoic_ct.volume import Volume

logger = logging.getLogger(__name__)

RIGHT_LUNG, LEFT_LUNG = 1, 2


class LungSegmenter(Protocol):
    """Anything that labels the lungs of a volume: (z, y, x) uint8, 1 right, 2 left."""

    def __call__(self, volume: Volume) -> np.ndarray: ...


class R231Segmenter:
    """lungmask's R231 U-Net with its own pre- and post-processing, from a local weights file."""

    def __init__(self, weights: Path, device: torch.device, batch_size: int = 20) -> None:
        from lungmask import LMInferer

        check_r231_weights(weights)
        # lungmask logs every stage to stdout at INFO, which would mix with our results.
        logging.getLogger("lungmask").setLevel(logging.WARNING)
        self.device = device
        self._inferer = LMInferer(
            modelname="R231",
            modelpath=str(weights),
            force_cpu=device.type != "cuda",
            batch_size=batch_size,
            tqdm_disable=True,
        )

    def __call__(self, volume: Volume) -> np.ndarray:
        """Lung labels for `volume`, (z, y, x) uint8, same grid."""
        labels: np.ndarray = self._inferer.apply(volume.to_sitk())
        return labels.astype(np.uint8, copy=False)


def labels_from_mask_image(mask: Volume, reference: Volume) -> np.ndarray:
    """Lung labels on `reference`'s grid from a user's mask image of any geometry.

    Labels 1 (right) and 2 (left) are taken as they are. A mask with a single foreground
    value is split into its two largest 3D components, the one further to the patient's
    right labelled 1; smaller components are dropped.

    Returns:
        (z, y, x) uint8 labels on `reference`'s grid.

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
