"""From the working grid to the stack of axial slices the encoders see
(docs/explanation/pipeline.md, Balaïtous steps 4-7 and 9).

Steps 4-7 and 9 of the published pipeline, as pure functions on arrays in the published
slice layout (H, W, Z): rows are SimpleITK's y reversed, columns x, and the last axis z.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from stoic_ct.io.volume import Volume

logger = logging.getLogger(__name__)

SLICE_SIZE = 224
PAD_HU = -1024
# The HU window of the encoders' input (published step 11), which the ConvNeXt takes too.
HU_WINDOW = (-1024.0, 600.0)
MASK_HU_THRESHOLD = -100.0
MASK_HU_PERCENTILE = 5.0
SLICE_TRIM_FRACTION = 0.1

_FULL_2D = np.ones((3, 3), dtype=bool)
_FULL_3D = np.ones((3, 3, 3), dtype=bool)


def to_slice_layout(voxels_zyx: np.ndarray) -> np.ndarray:
    """(z, y, x) voxels as the published (H, W, Z) layout: transpose(1, 2, 0)[::-1] (a view)."""
    return voxels_zyx.transpose(1, 2, 0)[::-1]


def clean_lung_mask(
    image: np.ndarray,
    labels: np.ndarray,
    hu_threshold: float = MASK_HU_THRESHOLD,
    percentile: float = MASK_HU_PERCENTILE,
) -> np.ndarray:
    """Binary lung mask without spurious components (published step 5).

    Per lung label (1, 2) the largest 26-connected 3D component is kept; then, slice by
    slice, every 8-connected component whose `percentile`-th HU percentile is above
    `hu_threshold` is dropped (soft tissue, not lung).

    Args:
        image: (H, W, Z) HU.
        labels: (H, W, Z) lung labels, 0 background.

    Returns:
        (H, W, Z) bool.
    """
    mask: np.ndarray = np.zeros(labels.shape, dtype=bool)
    for lung in (1, 2):
        components, count = ndimage.label(labels == lung, structure=_FULL_3D)
        if count:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            mask |= components == int(np.argmax(sizes))
    for z in range(mask.shape[2]):
        components, count = ndimage.label(mask[..., z], structure=_FULL_2D)
        for component in range(1, count + 1):
            where = components == component
            if np.percentile(image[..., z][where], percentile) > hu_threshold:
                mask[..., z][where] = False
    return mask


@dataclass(frozen=True)
class InPlaneCrop:
    """Where the 224 x 224 slice window sits on the (H, W) plane of the working grid.

    Attributes:
        start: first row and column of the input kept (0 when the axis was padded).
        pad_before: rows and columns of padding added before the input.
        size: (H, W) of the input.
    """

    start: tuple[int, int]
    pad_before: tuple[int, int]
    size: tuple[int, int]


def crop_or_pad(
    image: np.ndarray, mask: np.ndarray, size: int = SLICE_SIZE, pad_value: float = PAD_HU
) -> tuple[np.ndarray, np.ndarray, InPlaneCrop]:
    """Crop (centred on the lungs) or pad each in-plane axis to `size` (published step 6).

    An axis longer than `size` keeps the `size` rows around the middle of the lung's
    extent, shifted to stay inside; an empty mask centres on the image. A shorter axis
    is padded evenly with `pad_value` (the extra row after).

    Args:
        image: (H, W, Z) HU. mask: (H, W, Z) bool.

    Returns:
        image and mask of shape (size, size, Z), and where the window lies.
    """
    start, pad = [0, 0], [0, 0]
    half = size // 2
    for axis in (0, 1):
        length = image.shape[axis]
        if length > size:
            other = tuple(a for a in range(3) if a != axis)
            occupied = np.flatnonzero(mask.any(axis=other))
            centre = (occupied[0] + occupied[-1]) // 2 if len(occupied) else length // 2
            centre = int(np.clip(centre, half, length - half))
            window = slice(centre - half, centre + half)
            image = image[window] if axis == 0 else image[:, window]
            mask = mask[window] if axis == 0 else mask[:, window]
            start[axis] = centre - half
    delta = [size - image.shape[0], size - image.shape[1], 0]
    widths = [(d // 2, d - d // 2) for d in delta]
    pad = [widths[0][0], widths[1][0]]
    image = np.pad(image, widths, constant_values=pad_value)
    mask = np.pad(mask, widths, constant_values=False)
    crop = InPlaneCrop((start[0], start[1]), (pad[0], pad[1]), (image.shape[0], image.shape[1]))
    return image, mask, crop


def lung_slice_range(mask: np.ndarray, trim: float = SLICE_TRIM_FRACTION) -> slice | None:
    """Axial slices the encoders see (published step 7), or None when no lung is found.

    Published rule, kept exactly: from the first slice with lung up to, not including,
    the last one; then `int(n * trim)` slices off the start and the slices from
    `int(n * (1 - trim))` on off the end, n being the number kept so far. When that
    leaves nothing (a lung in only one or two slices), all slices with lung are kept.

    Args:
        mask: (H, W, Z) bool.
    """
    with_lung = np.flatnonzero(mask.any(axis=(0, 1)))
    if len(with_lung) == 0:
        return None
    first, last = int(with_lung[0]), int(with_lung[-1])
    n = last - first
    kept = slice(first + int(n * trim), first + int(n * (1 - trim)))
    if kept.stop <= kept.start:
        logger.warning(
            "the lungs span only %d axial slice(s) at 5 mm; all of them are used", last - first + 1
        )
        return slice(first, last + 1)
    return kept


def mask_outside_lungs(image: np.ndarray, mask: np.ndarray, value: float = PAD_HU) -> np.ndarray:
    """A copy of `image` with every voxel outside `mask` set to `value` (published step 9)."""
    return np.where(mask, image, np.asarray(value, dtype=image.dtype))


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
