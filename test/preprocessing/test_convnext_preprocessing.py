"""The 3D ConvNeXt's input: window, scipy's cubic-spline zoom as matrices, the mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from stoic_ct.io.volume import Volume
from stoic_ct.preprocessing.convnext_preprocessing import prepare_volume, resize_cubic


def test_the_resize_is_scipys_cubic_spline_zoom() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(9, 13, 11))
    expected = ndimage.zoom(volume, (16 / 9, 20 / 13, 7 / 11), order=3, mode="nearest")
    got = resize_cubic(torch.from_numpy(volume), (16, 20, 7)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    float32 = resize_cubic(torch.from_numpy(volume).float(), (16, 20, 7)).numpy()
    np.testing.assert_allclose(float32, expected, rtol=0, atol=1e-5)


def test_prepared_volume_is_a_windowed_cube_with_air_outside_the_mask() -> None:
    voxels = np.full((10, 30, 20), 40, dtype=np.int16)  # soft tissue
    voxels[:, 10:20, 5:15] = -850  # "lung", about the middle of the cube
    volume = Volume(voxels, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    cube = prepare_volume(volume, torch.device("cpu"), size=24)
    assert cube.shape == (1, 1, 24, 24, 24) and cube.dtype == torch.float32
    assert cube.min() >= 0.0 and cube.max() <= 1.0
    lung, tissue = (-850 + 1024) / 1624, (40 + 1024) / 1624
    assert float(cube[0, 0, 12, 12, 12]) == pytest.approx(lung, abs=0.01)
    assert float(cube[0, 0, 12, 1, 1]) == pytest.approx(tissue, abs=0.01)
    masked = prepare_volume(volume, torch.device("cpu"), size=24, mask=voxels < -500)
    assert float(masked[0, 0, 12, 1, 1]) == pytest.approx(0.0, abs=0.01)  # air outside
    assert float(masked[0, 0, 12, 12, 12]) == pytest.approx(lung, abs=0.01)  # lung kept
