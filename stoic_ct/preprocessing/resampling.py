"""Resampling onto the working grid, and lung label images onto that grid.

The published model resamples with SimpleITK, linear interpolation, to 1.5 x 1.5 x 5 mm
(x, y, z), keeping origin, direction and pixel type; the output size is the input extent
divided by the new spacing, truncated (docs/explanation/pipeline.md, Balaïtous step 2).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from stoic_ct.errors import InputError
from stoic_ct.io.volume import Vector3, Volume

WORKING_SPACING: Vector3 = (1.5, 1.5, 5.0)


def resampled_size(
    size: tuple[int, int, int], spacing: Vector3, new_spacing: Vector3 = WORKING_SPACING
) -> tuple[int, int, int]:
    """Voxels along (x, y, z) after resampling, truncated as the published model does.

    Raises:
        InputError: when an axis would have no voxel left.
    """
    new_size = np.asarray(size) * np.asarray(spacing) / np.asarray(new_spacing, dtype=float)
    x, y, z = (int(n) for n in new_size.astype(int))
    if min(x, y, z) < 1:
        extent = " x ".join(f"{n * s:g}" for n, s in zip(size, spacing, strict=True))
        grid = " x ".join(f"{s:g}" for s in new_spacing)
        raise InputError(
            f"the volume ({extent} mm) is too small to resample onto a {grid} mm grid: "
            "at least one voxel along each axis is needed"
        )
    return (x, y, z)


def resample(volume: Volume, new_spacing: Vector3 = WORKING_SPACING) -> Volume:
    """Linear resampling to `new_spacing` mm, same origin, direction and pixel type.

    Voxels beyond the input's extent take the value 0, as in the published model.
    """
    size = resampled_size(volume.size, volume.spacing, new_spacing)
    image = volume.to_sitk()
    resampled = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        volume.origin,
        new_spacing,
        volume.direction,
        0.0,
        image.GetPixelID(),
    )
    return Volume.from_sitk(resampled)


def resample_labels(labels: Volume, reference: Volume) -> np.ndarray:
    """Labels resampled onto `reference`'s grid by nearest neighbour; (z, y, x).

    Labels outside the label image's extent are 0. Any geometry is accepted: the two
    images only need to overlap in physical space.
    """
    resampled = sitk.Resample(
        labels.to_sitk(),
        reference.to_sitk(),
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        0,
    )
    return sitk.GetArrayFromImage(resampled)
