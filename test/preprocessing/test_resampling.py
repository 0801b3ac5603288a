"""Resampling against the published SitkResample; label resampling onto the working grid."""

from __future__ import annotations

import types

import numpy as np
import pytest
import SimpleITK as sitk

from stoic_ct.errors import InputError
from stoic_ct.io.volume import Volume
from stoic_ct.preprocessing.resampling import (
    WORKING_SPACING,
    resample,
    resample_labels,
    resampled_size,
)

FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize(
    ("shape_zyx", "spacing", "dtype", "direction"),
    [
        ((20, 50, 40), (0.7, 0.7, 1.25), np.int16, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)),
        ((7, 30, 33), (2.1, 1.9, 6.5), np.float32, FLIPPED),
        ((12, 21, 25), (1.0, 3.0, 2.5), np.int32, (0, 1.0, 0, 1.0, 0, 0, 0, 0, 1.0)),
    ],
)
def test_matches_published(
    published: types.ModuleType,
    shape_zyx: tuple[int, int, int],
    spacing: tuple[float, float, float],
    dtype: type[np.generic],
    direction: tuple[float, ...],
) -> None:
    rng = np.random.default_rng(0)
    volume = Volume(
        rng.integers(-1000, 500, size=shape_zyx).astype(dtype),
        spacing,
        (-10.0, 5.0, 30.0),
        direction,
    )
    expected = published.SitkResample(output_spacing=(1.5, 1.5, 5))({"image": volume.to_sitk()})[
        "image"
    ]
    ours = resample(volume)
    np.testing.assert_array_equal(ours.voxels, sitk.GetArrayFromImage(expected))
    assert ours.voxels.dtype == dtype
    assert ours.spacing == WORKING_SPACING
    assert ours.origin == volume.origin and ours.direction == tuple(map(float, direction))


def test_size_is_truncated() -> None:
    assert resampled_size((512, 512, 300), (0.7, 0.7, 1.25)) == (238, 238, 75)


def test_too_small_volume_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"too small to resample onto a 1.5 x 1.5 x 5 mm grid"):
        resampled_size((64, 64, 3), (1.0, 1.0, 1.0))


def test_labels_follow_physical_space() -> None:
    """A label image on another grid lands where it is in physical space."""
    reference = Volume(
        np.zeros((4, 10, 10), np.int16),
        WORKING_SPACING,
        (0.0, 0.0, 0.0),
        (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
    )
    labels = np.zeros((20, 30, 30), np.uint8)
    labels[:, :, 15:] = 2  # physical x >= 7.5 mm
    labels[:, :, :15] = 1
    fine = Volume(labels, (0.5, 0.5, 1.0), (0.0, 0.0, 0.0), reference.direction)
    on_grid = resample_labels(fine, reference)
    assert on_grid.shape == (4, 10, 10)
    # Columns at x = 0, 1.5, ..., 13.5 mm: label 2 from x = 7.5 mm (column 5) on.
    np.testing.assert_array_equal(on_grid[0, 0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
