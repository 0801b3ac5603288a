"""Steps 4-7 and 9, each against the published balaitous 1.2 transform on the same arrays."""

from __future__ import annotations

import types

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from stoic_ct.preprocessing.cropping import (
    clean_lung_mask,
    crop_or_pad,
    lung_slice_range,
    mask_outside_lungs,
    to_slice_layout,
)


def random_case(
    seed: int, shape: tuple[int, int, int], dtype: type[np.generic] = np.int16
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, Z) HU image and lung labels with many blobs, some of them soft tissue."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(3, 3, 1))
    labels = np.zeros(shape, dtype=np.uint8)
    labels[field > 0.05] = 1
    labels[(field > 0.05) & (np.arange(shape[1])[None, :, None] >= shape[1] // 2)] = 2
    image = rng.normal(-800, 80, shape)
    tissue = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(4, 4, 1)) > 0.08
    image[tissue] = rng.normal(30, 40, int(tissue.sum()))
    return image.astype(dtype), labels


def test_slice_layout_matches_published(published: types.ModuleType) -> None:
    voxels = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    sample = published.SitkToNumpy()({"image": sitk.GetImageFromArray(voxels)})
    np.testing.assert_array_equal(to_slice_layout(voxels), sample["image"])


@pytest.mark.parametrize(("seed", "dtype"), [(0, np.int16), (1, np.float32), (2, np.int16)])
def test_clean_lung_mask_matches_published(
    published: types.ModuleType, seed: int, dtype: type[np.generic]
) -> None:
    image, labels = random_case(seed, (60, 70, 9), dtype)
    expected = published.CleanLungMask(hu_threshold=-100, percentile=5)(
        {"image": image, "mask": labels}
    )["mask"]
    ours = clean_lung_mask(image, labels)
    assert ours.dtype == bool
    # The case must exercise both rules: components dropped in 3D and in 2D.
    assert 0 < ours.sum() < (labels > 0).sum()
    np.testing.assert_array_equal(ours, expected)


def test_clean_lung_mask_drops_soft_tissue_components() -> None:
    image = np.full((20, 20, 1), -850, dtype=np.int16)
    labels = np.zeros((20, 20, 1), dtype=np.uint8)
    labels[2:8, 2:8] = 1  # lung
    labels[12:18, 2:8] = 1  # a second, smaller piece of label 1: not the largest in 3D
    labels[2:8, 12:18] = 2  # left lung, but soft tissue
    labels[2:4, 2:4] = 1
    image[2:8, 12:18] = 40
    mask = clean_lung_mask(image, labels)
    assert mask[2:8, 2:8].all()
    assert not mask[12:18].any()
    assert not mask[2:8, 12:18].any()


@pytest.mark.parametrize(
    ("shape", "lung_rows", "lung_cols"),
    [
        ((250, 260, 4), (10, 120), (100, 250)),  # crop both axes, off-centre lungs
        ((300, 200, 3), (280, 299), (50, 60)),  # crop rows with clipping, pad columns
        ((100, 101, 2), (20, 40), (30, 70)),  # pad both, odd padding
        ((224, 224, 2), (0, 223), (0, 223)),  # already the right size
    ],
)
def test_crop_or_pad_matches_published(
    published: types.ModuleType,
    shape: tuple[int, int, int],
    lung_rows: tuple[int, int],
    lung_cols: tuple[int, int],
) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 400, size=shape).astype(np.int16)
    mask = np.zeros(shape, dtype=bool)
    mask[lung_rows[0] : lung_rows[1] + 1, lung_cols[0] : lung_cols[1] + 1, 0] = True
    expected = published.CropPad(output_size=224, constant_values=-1024)(
        {"image": image.copy(), "mask": mask.copy()}
    )
    ours_image, ours_mask, crop = crop_or_pad(image, mask)
    np.testing.assert_array_equal(ours_image, expected["image"])
    np.testing.assert_array_equal(ours_mask, expected["mask"])
    assert ours_image.shape == (224, 224, shape[2])
    assert all(s + 224 <= n or n <= 224 for s, n in zip(crop.start, shape[:2], strict=False))


def test_crop_or_pad_centres_the_image_when_no_lung() -> None:
    image = np.arange(300)[:, None, None] * np.ones((300, 10, 1), dtype=np.int16)
    _, _, crop = crop_or_pad(image, np.zeros(image.shape, dtype=bool))
    assert crop.start[0] == 150 - 112
    assert crop.pad_before[1] == (224 - 10) // 2


@pytest.mark.parametrize(("first", "last"), [(0, 19), (3, 12), (5, 7), (2, 40)])
def test_lung_slice_range_matches_published(
    published: types.ModuleType, first: int, last: int
) -> None:
    depth = 45
    image = np.arange(depth, dtype=np.int16)[None, None, :] * np.ones((4, 4, 1), dtype=np.int16)
    mask = np.zeros((4, 4, depth), dtype=bool)
    mask[1, 1, first : last + 1] = True
    expected = published.CropLungs(percentile=10)({"image": image, "mask": mask})["image"]
    kept = lung_slice_range(mask)
    assert kept is not None
    np.testing.assert_array_equal(image[..., kept], expected)


def test_lung_slice_range_keeps_a_lung_in_one_slice_where_published_keeps_nothing() -> None:
    mask = np.zeros((4, 4, 10), dtype=bool)
    mask[1, 1, 6] = True
    assert lung_slice_range(mask) == slice(6, 7)
    mask[1, 1, 7] = True  # two slices: the published rule keeps [6, 7) then trims it to nothing
    assert lung_slice_range(mask) == slice(6, 8)


def test_lung_slice_range_without_lung_is_none() -> None:
    assert lung_slice_range(np.zeros((4, 4, 10), dtype=bool)) is None


def test_mask_outside_lungs_matches_published(published: types.ModuleType) -> None:
    image, labels = random_case(5, (20, 30, 4))
    mask = labels > 0
    expected = published.ApplyLungMask(constant_values=-1024)(
        {"image": image.copy(), "mask": mask}
    )["image"]
    ours = mask_outside_lungs(image, mask)
    np.testing.assert_array_equal(ours, expected)
    assert ours.dtype == image.dtype
    assert not np.shares_memory(ours, image)
