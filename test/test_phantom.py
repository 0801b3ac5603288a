"""The phantom generator, and the shipped test case it made."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from stoic_ct.io.imageio import read_scan
from stoic_ct.phantom import AIR, BONE, LUNG, PhantomSpec, make_phantom

SHIPPED = Path(__file__).resolve().parent / "input" / "images" / "ct" / "phantom.mha"


def test_shipped_case_is_this_generator_s_output() -> None:
    """test/input holds `python -m stoic_ct phantom ... --seed 2021`, byte for byte in voxels."""
    scan = read_scan(SHIPPED)
    spec = PhantomSpec(
        size=(128, 128, 40),
        spacing=(2.8, 2.8, 5.0),
        origin=(-179.2, -179.2, -100.0),
        lesion_burden=0.08,
        seed=2021,
    )
    np.testing.assert_array_equal(scan.volume.voxels, make_phantom(spec).voxels)
    assert scan.header == {"PatientAge": "065Y", "PatientSex": "M"}
    assert SHIPPED.stat().st_size < 2_000_000


@pytest.mark.parametrize(
    "direction",
    [
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    ],
)
def test_anatomy_is_in_physical_space(direction: tuple[float, ...]) -> None:
    """Whatever the orientation, the lungs are where the patient's lungs are."""
    spec = PhantomSpec(
        size=(64, 64, 8),
        spacing=(5.0, 5.0, 10.0),
        direction=direction,
        origin=(-160.0 * direction[0], -160.0 * direction[4], -40.0),
        noise_hu=0.0,
        lesion_burden=0.0,
    )
    image = make_phantom(spec).to_sitk()
    body_y = 0.65 * 157.5  # the body's semi-axis along y: 0.65 of half the field of view
    landmarks = {
        (-80.0, 0.0, 0.0): LUNG,  # patient's right (LPS x < 0)
        (80.0, 0.0, 0.0): LUNG,
        (0.0, 0.75 * body_y, 0.0): BONE,  # spine, posterior
        (0.0, 140.0, 0.0): AIR,  # behind the patient
    }
    for point, expected in landmarks.items():
        assert image[image.TransformPhysicalPointToIndex(point)] == expected, point


def test_lesion_burden_adds_dense_lung() -> None:
    base = PhantomSpec(
        size=(64, 64, 16),
        spacing=(5.0, 5.0, 10.0),
        origin=(-160, -160, -80),
        noise_hu=0.0,
        lesion_burden=0.0,
    )
    clear = make_phantom(base).voxels
    sick = make_phantom(PhantomSpec(**{**base.__dict__, "lesion_burden": 0.3})).voxels
    assert (clear == LUNG).sum() > 1.2 * (sick == LUNG).sum()
    assert ((sick > -500) & (clear == LUNG)).any()


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.int32])
def test_pixel_types(dtype: type[np.generic]) -> None:
    volume = make_phantom(PhantomSpec(size=(16, 16, 4), dtype=dtype))
    assert volume.voxels.dtype == dtype
    assert sitk.GetArrayFromImage(volume.to_sitk()).dtype == dtype
