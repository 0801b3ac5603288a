"""Reorienting to LPS: exact, geometry-preserving, and a no-op on STOIC's own storage."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from stoic_ct.io.orientation import orientation_code, to_canonical
from stoic_ct.io.volume import Volume

VOXELS = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)


def lps_image() -> sitk.Image:
    image = sitk.GetImageFromArray(VOXELS)
    image.SetSpacing((0.7, 0.8, 5.0))
    image.SetOrigin((-100.0, -120.0, 30.0))
    return image


def stored(image: sitk.Image, order: tuple[int, int, int], flips: tuple[bool, ...]) -> Volume:
    """The same physical image with its voxel axes permuted and flipped."""
    return Volume.from_sitk(sitk.Flip(sitk.PermuteAxes(image, order), flips))


# (axis order, flips) -> orientation code: in-plane flips (NIfTI's RAS), a transposed
# slice, a sagittal and a coronal storage.
STORAGES = {
    ((0, 1, 2), (True, True, False)): "RAS",
    ((1, 0, 2), (False, False, False)): "PLS",
    ((2, 0, 1), (False, True, True)): "SRA",
    ((0, 2, 1), (False, True, False)): "LIP",
}


@pytest.mark.parametrize(("storage", "code"), STORAGES.items())
def test_every_storage_comes_back_to_lps_exactly(
    storage: tuple[tuple[int, int, int], tuple[bool, ...]], code: str
) -> None:
    reference = Volume.from_sitk(lps_image())
    other = stored(lps_image(), *storage)
    assert orientation_code(other) == code
    assert not np.array_equal(np.asarray(other.voxels).ravel(), VOXELS.ravel())
    canonical = to_canonical(other)
    np.testing.assert_array_equal(canonical.voxels, VOXELS)
    assert canonical.spacing == pytest.approx(reference.spacing)
    assert canonical.origin == pytest.approx(reference.origin)
    assert canonical.direction == pytest.approx(reference.direction)


def test_lps_is_left_as_it_is() -> None:
    volume = Volume.from_sitk(lps_image())
    assert orientation_code(volume) == "LPS"
    assert to_canonical(volume) is volume


def test_an_oblique_scan_goes_to_the_nearest_lps_order() -> None:
    """About 10 degrees off axis and stored RAS: axes flipped, the obliquity kept."""
    angle = np.deg2rad(10.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    image = lps_image()
    image.SetDirection(tuple((rotation @ np.diag([-1.0, -1.0, 1.0])).ravel()))
    canonical = to_canonical(Volume.from_sitk(image))
    assert orientation_code(canonical) == "LPS"
    np.testing.assert_allclose(np.reshape(canonical.direction, (3, 3)), rotation, atol=1e-12)
