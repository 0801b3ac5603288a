"""The R231 U-Net as we run it, and lung masks given by the user."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from stoic_ct.errors import InputError, ModelFileError
from stoic_ct.inference.lung_masks import R231Segmenter
from stoic_ct.io.volume import Volume
from stoic_ct.models.r231 import r231_network
from stoic_ct.phantom import PhantomSpec, make_phantom
from stoic_ct.preprocessing.lung_segmentation import labels_from_mask_image, split_lungs
from stoic_ct.preprocessing.resampling import resample
from stoic_ct.weights.model_files import R231
from stoic_ct.weights.random_weights import random_r231_state_dict

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIPPED_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("a download was attempted")


# Flipped axes make both lungmask and us reorient to LPS and back.
PHANTOM = PhantomSpec(
    size=(60, 50, 6),
    spacing=(6.0, 6.0, 5.0),
    origin=(180, 150, -15),
    direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
)


@pytest.fixture(scope="module")
def segmenting_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random R231 weights whose last layer is centred on the phantom's features.

    Random weights alone give one class everywhere, and so empty masks after lungmask's
    clean-up; centred, the classes split the slices into regions, and the masks that
    come out are non-trivial, to compare.
    """
    from lungmask import utils

    state = random_r231_state_dict(seed=1)
    model = r231_network().eval()
    model.load_state_dict(state)
    volume = resample(make_phantom(PHANTOM)).to_sitk()
    slices, _ = utils.preprocess(
        sitk.GetArrayFromImage(sitk.DICOMOrient(volume, "LPS")), resolution=[256, 256]
    )
    features: list[torch.Tensor] = []
    hook = model.last.register_forward_hook(lambda _m, args, _o: features.append(args[0]))
    with torch.inference_mode():
        model(
            torch.as_tensor((np.minimum(slices, 600)[:, None] + 1024) / 1624, dtype=torch.float32)
        )
    hook.remove()
    mean, std = features[0].mean(dim=(0, 2, 3)), features[0].std(dim=(0, 2, 3))
    weight = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) / (std + 1e-6)
    state["last.weight"], state["last.bias"] = weight[:, :, None, None], -(weight @ mean)
    path = tmp_path_factory.mktemp("r231") / R231.name
    torch.save(state, path)
    return path


def test_r231_gives_lungmasks_labels_without_downloading(
    segmenting_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lungmask import LMInferer

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    volume = resample(make_phantom(PHANTOM))
    ours = R231Segmenter(segmenting_weights, torch.device("cpu"), batch_size=4)(volume)
    direct = LMInferer(modelpath=str(segmenting_weights), force_cpu=True, tqdm_disable=True)
    expected = direct.apply(volume.to_sitk())
    assert ours.shape == volume.voxels.shape
    assert ours.dtype == np.uint8
    counts = np.bincount(ours.ravel(), minlength=3)
    assert len(counts) == 3 and counts.min() > 1000  # both lungs and background: not vacuous
    np.testing.assert_array_equal(ours, expected)


def test_r231_bfloat16_gives_labels_close_to_exact(segmenting_weights: Path) -> None:
    """bfloat16 autocast (the fast mode of CPUs with bfloat16 units): no calibration."""
    volume = resample(make_phantom(PHANTOM))
    cpu = torch.device("cpu")
    exact = R231Segmenter(segmenting_weights, cpu, batch_size=2)(volume)
    fast = R231Segmenter(segmenting_weights, cpu, batch_size=2, precision="bfloat16")
    labels = fast(volume)
    assert fast._int8 is None
    assert np.mean(labels == exact) > 0.99 and np.count_nonzero(labels) > 1000


def test_r231_fast_precision_gives_labels(segmenting_weights: Path) -> None:
    """int8 after calibration on the first scan; its accuracy is measured by the benchmark."""
    volume = resample(make_phantom(PHANTOM))
    fast = R231Segmenter(segmenting_weights, torch.device("cpu"), batch_size=2, precision="int8")
    labels = fast(volume)
    assert labels.shape == volume.voxels.shape and set(np.unique(labels)) <= {0, 1, 2}
    calibrated = fast._int8
    np.testing.assert_array_equal(fast(volume), labels)  # deterministic, and calibrated once
    assert fast._int8 is calibrated is not None


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


def test_a_mask_far_smaller_than_lungs_is_used_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 1 mL label (a tumour's, say) given as the lung mask; then two lung-sized blocks."""
    shape, spacing = (40, 100, 100), (1.5, 1.5, 5.0)
    reference = Volume(np.zeros(shape, np.int16), spacing, (0.0, 0.0, 0.0), IDENTITY)
    tumour = np.zeros(shape, np.uint8)
    tumour[20, 50:60, 50:60] = 1  # 100 voxels of 11.25 mm3
    labels = labels_from_mask_image(Volume(tumour, spacing, (0.0, 0.0, 0.0), IDENTITY), reference)
    assert np.count_nonzero(labels) == 100
    assert "the lung mask covers only 1 mL of the scan" in caplog.text
    caplog.clear()
    lungs = np.zeros(shape, np.uint8)
    lungs[10:30, 30:70, 10:40] = 1  # 270 mL
    lungs[10:30, 30:70, 60:90] = 2
    labels_from_mask_image(Volume(lungs, spacing, (0.0, 0.0, 0.0), IDENTITY), reference)
    assert "covers only" not in caplog.text
