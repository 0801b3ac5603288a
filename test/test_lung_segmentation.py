"""The R231 U-Net as we run it, and lung masks given by the user."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stoic_ct.errors import InputError, ModelFileError
from stoic_ct.lung_segmentation import R231Segmenter, labels_from_mask_image, split_lungs
from stoic_ct.model_files import R231, ModelFiles
from stoic_ct.phantom import PhantomSpec, make_phantom
from stoic_ct.resampling import resample
from stoic_ct.volume import Volume

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIPPED_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("a download was attempted")


def test_r231_runs_from_the_model_dir_like_lungmask(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lungmask import LMInferer

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    spec = PhantomSpec(size=(60, 50, 3), spacing=(6.0, 6.0, 5.0), origin=(-180, -150, -5))
    volume = resample(make_phantom(spec))
    weights = ModelFiles(tiny_model_dir).r231
    ours = R231Segmenter(weights, torch.device("cpu"))(volume)
    direct = LMInferer(modelpath=str(weights), force_cpu=True, tqdm_disable=True).apply(
        volume.to_sitk()
    )
    assert ours.shape == volume.voxels.shape
    assert ours.dtype == np.uint8
    assert set(np.unique(ours)) <= {0, 1, 2}
    np.testing.assert_array_equal(ours, direct)


def test_r231_file_with_other_keys_is_refused(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / R231.name)
    with pytest.raises(ModelFileError, match="unet_r231-d5d2fc3d.pth: does not match") as error:
        R231Segmenter(tmp_path / R231.name, torch.device("cpu"))
    assert "github.com/JoHof/lungmask/releases" in str(error.value)


def _two_lungs(direction: tuple[float, ...]) -> tuple[Volume, np.ndarray]:
    """A reference grid and a binary mask: one blob at small index x, one at large x."""
    reference = Volume(np.zeros((6, 20, 30), np.int16), (1.5, 1.5, 5.0), (0.0, 0.0, 0.0), direction)
    binary = np.zeros((6, 20, 30), dtype=bool)
    binary[1:5, 4:16, 2:12] = True  # index x 2-11
    binary[1:5, 4:16, 18:26] = True  # index x 18-25
    binary[0, 0, 29] = True  # a speck, dropped
    return reference, binary


@pytest.mark.parametrize(
    ("direction", "right_columns"), [(IDENTITY, slice(2, 12)), (FLIPPED_X, slice(18, 26))]
)
def test_binary_mask_is_split_by_patient_side(
    direction: tuple[float, ...], right_columns: slice
) -> None:
    reference, binary = _two_lungs(direction)
    labels = split_lungs(binary, reference)
    assert (labels[1:5, 4:16, right_columns] == 1).all()
    assert set(np.unique(labels)) == {0, 1, 2}
    assert labels[0, 0, 29] == 0


def test_labelled_mask_on_another_grid(tmp_path: Path) -> None:
    reference, binary = _two_lungs(IDENTITY)
    labels = np.zeros(binary.shape, np.uint8)
    labels[1:5, 4:16, 2:12] = 1
    labels[1:5, 4:16, 18:26] = 2
    # The same labels at twice the in-plane resolution.
    fine = Volume(
        labels.repeat(2, axis=1).repeat(2, axis=2),
        (0.75, 0.75, 5.0),
        (-0.375, -0.375, 0.0),
        IDENTITY,
    )
    np.testing.assert_array_equal(labels_from_mask_image(fine, reference), labels)


def test_binary_mask_from_file_values(tmp_path: Path) -> None:
    reference, binary = _two_lungs(IDENTITY)
    mask = Volume(binary.astype(np.uint8) * 255, reference.spacing, reference.origin, IDENTITY)
    labels = labels_from_mask_image(mask, reference)
    assert (labels[1:5, 4:16, 2:12] == 1).all() and (labels[1:5, 4:16, 18:26] == 2).all()


def test_lobe_labels_are_refused() -> None:
    reference, _ = _two_lungs(IDENTITY)
    lobes = Volume(
        np.arange(6 * 20 * 30).reshape(6, 20, 30) % 6, reference.spacing, reference.origin, IDENTITY
    )
    with pytest.raises(InputError, match=r"holds the values 0, 1, 2, 3, 4, 5; expected 0 with 1"):
        labels_from_mask_image(lobes, reference)


def test_mask_outside_the_scan_is_refused() -> None:
    reference, binary = _two_lungs(IDENTITY)
    far = Volume(binary.astype(np.uint8), reference.spacing, (500.0, 0.0, 0.0), IDENTITY)
    with pytest.raises(InputError, match="no lung voxel of the mask falls inside the scan"):
        labels_from_mask_image(far, reference)
