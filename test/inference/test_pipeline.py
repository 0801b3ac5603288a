"""The whole pipeline on tiny random models: results, fallbacks, scans that must not crash it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SMALL_PHANTOM, TINY_VIT
from stoic_ct.errors import InputError, ModelFileError
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.io.demographics import Demographics
from stoic_ct.io.volume import Volume
from stoic_ct.models.vit import ViTConfig
from stoic_ct.phantom import PhantomSpec, make_phantom
from stoic_ct.preprocessing.cropping import prepare_slices
from stoic_ct.preprocessing.lung_segmentation import threshold_lungs
from stoic_ct.preprocessing.resampling import resample
from stoic_ct.weights.model_files import VIT_IMAGENET
from stoic_ct.weights.random_weights import random_vit_state_dict, write_random_model_dir

CPU = torch.device("cpu")
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_predicts_probabilities(tiny_model: Balaitous) -> None:
    result = tiny_model.predict(make_phantom(SMALL_PHANTOM), Demographics(45.0, "F"))
    p = result.probabilities
    assert 0 < p.covid < 1 and 0 < p.severe < 1
    assert result.slices.lung_found
    assert result.features["full"].shape == result.features["lung"].shape == (64,)
    kept = result.slices.kept
    assert 0 < kept.start < kept.stop < result.slices.image.shape[2]
    assert result.slices.mask[..., kept].any(axis=(0, 1)).all()
    assert set(result.seconds) == {
        "resample",
        "lung mask",
        "crop",
        "encoder full",
        "encoder lung",
        "heads",
    }
    again = tiny_model.predict(make_phantom(SMALL_PHANTOM), Demographics(45.0, "F"))
    assert again.probabilities == p


def test_severity_depends_on_age_and_sex(tiny_model: Balaitous) -> None:
    volume = make_phantom(SMALL_PHANTOM)
    young = tiny_model.predict(volume, Demographics(30.0, "F")).probabilities
    old = tiny_model.predict(volume, Demographics(90.0, "M")).probabilities
    assert young.covid == old.covid
    assert young.severe != old.severe


def test_given_lung_labels_replace_the_segmenter(tiny_model: Balaitous) -> None:
    volume = make_phantom(SMALL_PHANTOM)
    resampled = resample(volume)
    labels = resampled.with_voxels(threshold_lungs(resampled))
    with_labels = tiny_model.predict(volume, Demographics(), lung_labels=labels)
    with_segmenter = tiny_model.predict(volume, Demographics())
    assert with_labels.probabilities == with_segmenter.probabilities


def test_no_lung_still_gives_probabilities(
    tiny_model: Balaitous, caplog: pytest.LogCaptureFixture
) -> None:
    soft_tissue = Volume(
        np.full((12, 64, 64), 40, np.int16), (3.0, 3.0, 5.0), (0.0, 0.0, 0.0), IDENTITY
    )
    result = tiny_model.predict(soft_tissue, Demographics())
    assert not result.slices.lung_found
    assert result.slices.kept == slice(0, 12)
    assert 0 < result.probabilities.covid < 1 and 0 < result.probabilities.severe < 1
    assert "no lung found" in caplog.text


def test_lung_in_one_slice_still_gives_probabilities(tiny_model: Balaitous) -> None:
    voxels = np.full((6, 64, 64), 40, np.int16)
    voxels[3, 20:40, 10:28] = -850
    voxels[3, 20:40, 36:54] = -850
    result = tiny_model.predict(
        Volume(voxels, (3.0, 3.0, 5.0), (0.0, 0.0, 0.0), IDENTITY), Demographics()
    )
    assert result.slices.lung_found and result.slices.kept == slice(3, 4)
    assert np.isfinite(result.features["lung"]).all()


ODD_SCANS = {
    "one thick slice": Volume(
        np.full((1, 40, 40), -800, np.int16), (8.0, 8.0, 5.0), (0.0, 0.0, 0.0), IDENTITY
    ),
    "all air": Volume(
        np.full((8, 50, 50), -1000, np.int16), (4.0, 4.0, 5.0), (0.0, 0.0, 0.0), IDENTITY
    ),
    "all bone": Volume(
        np.full((8, 50, 50), 3000, np.int16), (4.0, 4.0, 5.0), (0.0, 0.0, 0.0), IDENTITY
    ),
    "noise": Volume(
        np.random.default_rng(0).normal(-300, 600, (10, 60, 70)).astype(np.float32),
        (5.0, 5.0, 5.0),
        (0.0, 0.0, 0.0),
        IDENTITY,
    ),
    "unsigned": Volume(
        (make_phantom(SMALL_PHANTOM).voxels.astype(np.int32) + 1024).astype(np.uint16),
        SMALL_PHANTOM.spacing,
        SMALL_PHANTOM.origin,
        IDENTITY,
    ),
    "oblique": make_phantom(
        PhantomSpec(
            size=(80, 80, 12),
            spacing=(4.0, 4.0, 6.0),
            origin=(-100.0, -150.0, -40.0),
            direction=(0.8660254, -0.5, 0.0, 0.5, 0.8660254, 0.0, 0.0, 0.0, 1.0),
        )
    ),
    "huge field of view": make_phantom(
        PhantomSpec(size=(64, 64, 8), spacing=(12.0, 12.0, 10.0), origin=(-384.0, -384.0, -40.0))
    ),
}


@pytest.mark.parametrize("name", list(ODD_SCANS))
def test_readable_scans_never_crash(tiny_model: Balaitous, name: str) -> None:
    result = tiny_model.predict(ODD_SCANS[name], Demographics())
    p = result.probabilities
    assert 0 <= p.covid <= 1 and 0 <= p.severe <= 1
    assert np.isfinite([p.covid, p.severe]).all()


@pytest.mark.parametrize("name", ["one thick slice", "all air", "noise"])
def test_readable_scans_never_crash_the_r231_unet(tiny_model_dir: Path, name: str) -> None:
    model = Balaitous.from_model_dir(tiny_model_dir)
    p = model.predict(ODD_SCANS[name], Demographics()).probabilities
    assert 0 <= p.covid <= 1 and 0 <= p.severe <= 1


def test_unsigned_voxels_are_converted_before_padding() -> None:
    volume = resample(ODD_SCANS["unsigned"])
    stack = prepare_slices(
        volume, threshold_lungs(volume.with_voxels(volume.voxels.astype(np.int32) - 1024))
    )
    assert stack.image.dtype == np.float32
    assert stack.image.min() == -1024  # the padding


def test_too_small_volume(tiny_model: Balaitous) -> None:
    thin = Volume(np.zeros((2, 64, 64), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    with pytest.raises(InputError, match="too small to resample"):
        tiny_model.predict(thin, Demographics())


def test_missing_model_file(tmp_path: Path) -> None:
    write_random_model_dir(tmp_path, TINY_VIT)
    (tmp_path / "vitl_16_pt22k.pth").unlink()
    with pytest.raises(ModelFileError) as error:
        Balaitous.from_model_dir(tmp_path, lung_masks=threshold_lungs)
    message = str(error.value)
    assert message.startswith(str(tmp_path / "vitl_16_pt22k.pth") + ": is missing")
    assert "https://zenodo.org/record/6547999/files/vitl_16_pt22k.pth" in message


def test_encoder_and_heads_that_do_not_fit(tmp_path: Path) -> None:
    write_random_model_dir(tmp_path, TINY_VIT)
    other = ViTConfig(embed_dim=128, depth=24, num_heads=2, mlp_hidden=128)
    torch.save({"state_dict": random_vit_state_dict(other)}, tmp_path / VIT_IMAGENET.name)
    with pytest.raises(ModelFileError, match="take 64 features but vitl_16_pt22k.pth gives 128"):
        Balaitous.from_model_dir(tmp_path, lung_masks=threshold_lungs)


def test_random_weights_are_announced(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        Balaitous.from_model_dir(tiny_model_dir, lung_masks=threshold_lungs)
    assert "RANDOMLY INITIALISED" in caplog.text
