"""The 3D ConvNeXt as a frozen encoder: inflate-convnext, --encoder convnext3d-frozen
through extract-features, fit-heads and process.py (and the old name, deprecated)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import process
from helpers import assert_process_py_uses, official_2d_state
from stoic_ct.cli import main as cli
from stoic_ct.errors import ModelFileError
from stoic_ct.head_training.features import FeatureTable
from stoic_ct.inference.encoders import VolumeEncoder
from stoic_ct.weights.network_files import load_convnext3d

REPOSITORY = Path(process.__file__).resolve().parent


@pytest.fixture(scope="module")
def convnext_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model files plus a random micro 3D ConvNeXt on 32^3 cubes."""
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("cx") / "model"))
    out = model_dir / "convnext3d.pth"
    assert (
        cli(
            [
                "inflate-convnext",
                "--random",
                "0",
                "--size",
                "micro",
                "--input-size",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return model_dir


def test_an_official_2d_checkpoint_is_inflated_and_loads(tmp_path: Path) -> None:
    checkpoint = tmp_path / "convnext_micro_2d.pth"
    torch.save({"model": official_2d_state(size="micro")}, checkpoint)
    out = tmp_path / "convnext3d.pth"
    command = ["inflate-convnext", str(checkpoint), "--size", "micro", "--out", str(out)]
    assert cli([*command, "--inflation", "2g", "--normalisation", "l2"]) == 0
    model, input_size = load_convnext3d(out)
    assert input_size == 224 and model.feature_dim == 256
    assert cli([*command[:-2], "--out", str(tmp_path / "x.pth"), "--random", "1"]) == 1  # both


def test_a_wrong_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "convnext3d.pth").write_text("not a checkpoint")
    with pytest.raises(ModelFileError, match="convnext3d.pth: cannot be loaded"):
        load_convnext3d(tmp_path / "convnext3d.pth")


def test_the_volume_encoder_sees_the_whole_stack(convnext_model_dir: Path) -> None:
    model, input_size = load_convnext3d(convnext_model_dir / "convnext3d.pth")
    encoder = VolumeEncoder(model, torch.device("cpu"), input_size)
    slices = np.full((224, 224, 20), -850.0)
    feature = encoder(slices)
    assert feature.shape == (256,) and feature.dtype == np.float64
    slices[100:140, 100:140, 5:15] = 20.0  # a consolidation
    assert not np.allclose(encoder(slices), feature)


def test_convnext_features_heads_and_process_py(
    phantom_cohort: Path, cohort_masks: Path, convnext_model_dir: Path, tmp_path: Path
) -> None:
    features = tmp_path / "convnext.npz"
    common = [
        *("--model-dir", str(convnext_model_dir), "--device", "cpu"),
        *("--encoder", "convnext3d-frozen"),
    ]
    status = cli(
        [
            "extract-features",
            str(phantom_cohort),
            "--out",
            str(features),
            "--lung-masks",
            str(cohort_masks),
            *common,
        ]
    )
    assert status == 0
    table = FeatureTable.load(features)
    assert table.feature_full.shape == (48, 256)
    assert table.provenance["encoder"] == "convnext3d-frozen"
    assert set(table.provenance["model_files"]) == {"convnext3d.pth"}

    assert (
        cli(["fit-heads", str(features), "--out", str(convnext_model_dir), "--inner-folds", "3"])
        == 0
    )
    assert (convnext_model_dir / "convnext3d_heads.npz").exists()
    report = json.loads((convnext_model_dir / "convnext3d_heads.json").read_text())
    assert report["data"]["encoder"] == "convnext3d-frozen"
    assert not (convnext_model_dir / "heads.json").exists()  # the ViT heads' report untouched

    assert "deprecated" not in assert_process_py_uses(
        convnext_model_dir, tmp_path / "new", encoder="convnext3d-frozen"
    )
    # The old name still works for one release, with a notice that names the new one.
    stderr = assert_process_py_uses(convnext_model_dir, tmp_path / "old", encoder="convnext3d")
    assert "--encoder convnext3d is deprecated" in stderr
    assert "--encoder convnext3d-frozen" in stderr
