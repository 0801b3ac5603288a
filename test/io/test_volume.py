"""The volume value and its one crossing into and out of SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from stoic_ct.io.volume import Volume

DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def test_round_trip_keeps_voxels_geometry_and_axis_order() -> None:
    voxels = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # (z, y, x)
    volume = Volume(voxels, (0.5, 0.6, 2.0), (1.0, -2.0, 3.0), DIRECTION)
    image = volume.to_sitk()
    assert image.GetSize() == (4, 3, 2) == volume.size
    assert image[3, 2, 1] == voxels[1, 2, 3]  # SimpleITK indexes (x, y, z)
    assert image.GetPixelID() == sitk.sitkInt16
    back = Volume.from_sitk(image)
    np.testing.assert_array_equal(back.voxels, voxels)
    assert (back.spacing, back.origin, back.direction) == (volume.spacing, volume.origin, DIRECTION)


def test_refuses_other_than_3d() -> None:
    with pytest.raises(ValueError, match=r"must be 3D \(z, y, x\), not shape \(3, 4\)"):
        Volume(np.zeros((3, 4)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), DIRECTION)


def test_with_voxels_keeps_geometry_and_checks_shape() -> None:
    volume = Volume(np.zeros((2, 3, 4)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), DIRECTION)
    assert volume.with_voxels(np.ones((2, 3, 4))).direction == DIRECTION
    with pytest.raises(ValueError, match="do not fit"):
        volume.with_voxels(np.ones((2, 3, 5)))


def test_the_voxels_of_a_dropped_volume_still_hold_its_image() -> None:
    """SimpleITK's array view does not keep its image alive; the Volume's voxels must, or
    `reoriented(volume).voxels` reads freed memory once the temporary Volume is gone."""
    expected = np.arange(40 * 30 * 20, dtype=np.int16).reshape(20, 30, 40)

    def voxels_of_a_temporary() -> np.ndarray:
        return Volume.from_sitk(sitk.GetImageFromArray(expected.copy())).voxels

    views = [voxels_of_a_temporary() for _ in range(20)]
    clutter = [np.full((20, 30, 40), -1, dtype=np.int16) for _ in range(20)]  # reuse memory
    for view in views:
        np.testing.assert_array_equal(view, expected)
        assert not view.flags.writeable
    assert len(clutter) == 20
