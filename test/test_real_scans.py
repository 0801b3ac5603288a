"""Real chest CTs (the pyradiomics archive's two scans) through the pipeline.

Tiny random encoders with the threshold lung segmenter keep these to seconds: what is
checked is reading, storage order, the crop and the QC picture, not the encoders.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import run_as_container, write_dicom_series
from stoic_ct.inference.pipeline import Balaitous, BalaitousPrediction
from stoic_ct.inference.qc import ZOOM, render_qc
from stoic_ct.io.demographics import resolve_demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.io.volume import Volume
from stoic_ct.preprocessing.lung_segmentation import threshold_lungs
from stoic_ct.preprocessing.resampling import resample

DEMOGRAPHICS = resolve_demographics([("test", 60)], [("test", "F")])


def predict(model: Balaitous, path: Path, orientation: str = "canonical") -> BalaitousPrediction:
    scan = read_scan(path, "as-stored" if orientation == "as-stored" else "canonical")
    return model.predict(scan.volume, DEMOGRAPHICS)


def probabilities(result: BalaitousPrediction) -> np.ndarray:
    return np.array([result.probabilities.covid, result.probabilities.severe])


@pytest.fixture(scope="module")
def lung2(real_scans: dict[str, Path]) -> sitk.Image:
    """lung2 with its spacing rounded to float32, as NIfTI stores it, so that every format
    holds the same grid: the published resampling's int(size x spacing / 1.5) gives 213
    columns for the NRRD's 0.6269531 mm and 214 for NIfTI's 0.626953125 mm."""
    image = sitk.ReadImage(str(real_scans["lung2"]))
    image.SetSpacing(tuple(float(np.float32(s)) for s in image.GetSpacing()))
    return image


@pytest.fixture(scope="module")
def lung2_mha(lung2: sitk.Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lung2") / "lung2.mha"
    sitk.WriteImage(lung2, str(path))
    return path


def test_every_format_gives_the_same_probabilities(
    tiny_model: Balaitous, lung2: sitk.Image, lung2_mha: Path, tmp_path: Path
) -> None:
    """The same scan as MetaImage, NRRD, NIfTI and a DICOM series."""
    reference = probabilities(predict(tiny_model, lung2_mha))
    copies = [tmp_path / "lung2.nrrd", tmp_path / "lung2.nii.gz"]
    for path in copies:
        sitk.WriteImage(lung2, str(path))
    copies.append(write_dicom_series(lung2, tmp_path / "dicom"))
    for path in copies:
        np.testing.assert_allclose(
            probabilities(predict(tiny_model, path)), reference, atol=1e-6, err_msg=path.name
        )


def test_any_storage_order_gives_the_same_probabilities(
    tiny_model: Balaitous, lung2: sitk.Image, lung2_mha: Path, tmp_path: Path
) -> None:
    """Stored flipped in-plane (NIfTI's RAS) and sagittally: the same probabilities as
    stored as STOIC stores scans; read as stored, as the published package reads them,
    they differ."""
    reference = probabilities(predict(tiny_model, lung2_mha))
    flipped = tmp_path / "ras.nii.gz"
    sitk.WriteImage(sitk.Flip(lung2, (True, True, False)), str(flipped))
    sagittal = tmp_path / "sagittal.mha"
    sitk.WriteImage(sitk.PermuteAxes(lung2, (2, 1, 0)), str(sagittal))
    for path in (flipped, sagittal):
        assert read_scan(path).stored_as != "LPS"
        np.testing.assert_allclose(
            probabilities(predict(tiny_model, path)), reference, atol=1e-6, err_msg=path.name
        )
    as_stored = probabilities(predict(tiny_model, flipped, "as-stored"))
    assert np.abs(as_stored - reference).max() > 1e-6


def test_a_given_lung_mask_sets_the_slice_range(
    tiny_model: Balaitous, real_scans: dict[str, Path]
) -> None:
    """With a lung mask on axial slices 20-44, the encoders see those slices of the working
    grid less 10 % at each end, by the published rule (from the first slice with lung up
    to, not including, the last; then int(n x 0.1) off the start, from int(n x 0.9) on off
    the end)."""
    scan = read_scan(real_scans["lung2"])
    labels = threshold_lungs(scan.volume)
    labels[:20] = 0
    labels[45:] = 0
    mask = Volume(labels, scan.volume.spacing, scan.volume.origin, scan.volume.direction)
    result = tiny_model.predict(scan.volume, DEMOGRAPHICS, lung_labels=mask)
    # The working grid keeps the 5 mm slices: mask slices 20-44 stay slices 20-44.
    assert resample(scan.volume).size[2] == scan.volume.size[2]
    with_lung = np.flatnonzero(result.slices.mask.any(axis=(0, 1)))
    assert (with_lung.min(), with_lung.max()) == (20, 44)
    n = 44 - 20
    assert result.slices.kept == slice(20 + int(0.1 * n), 20 + int(0.9 * n)) == slice(22, 41)


def test_the_qc_picture_is_upright(tiny_model: Balaitous, real_scans: dict[str, Path]) -> None:
    """The axial view of lung2 in radiological view: the spine at the bottom, the heart on
    the picture's right (the patient's left)."""
    result = predict(tiny_model, real_scans["lung2"])
    picture = np.asarray(render_qc(result, "lung2").convert("L"))
    side = 224 * ZOOM
    axial = picture[:side, :side].astype(float)
    # Bone (at or above the window's top, 150 HU) in the middle fifth of the columns: the
    # vertebra far outweighs the sternum.
    bone = axial[:, 2 * side // 5 : 3 * side // 5] >= 255
    assert np.nonzero(bone)[0].mean() > 0.6 * side, "the spine is not at the bottom"
    # Soft tissue (about -50 to 120 HU) in the middle third of the rows: the heart adds it
    # to the picture's right half.
    soft = (axial > 220) & (axial < 255)
    middle = soft[side // 3 : 2 * side // 3]
    assert middle[:, side // 2 :].sum() > 1.3 * middle[:, : side // 2].sum()


def test_process_py_on_a_real_scan(
    real_scans: dict[str, Path], tiny_model_dir: Path, shared_tmp: Path
) -> None:
    """process.py as the container runs it (no network, a non-root user), on lung1 in the
    STOIC layout, with the tiny encoders and the R231 U-Net of the tiny model folder."""
    ct = shared_tmp / "input" / "images" / "ct"
    ct.mkdir(parents=True)
    sitk.WriteImage(sitk.ReadImage(str(real_scans["lung1"])), str(ct / "lung1.mha"))
    model = Path(shutil.copytree(tiny_model_dir, shared_tmp / "model"))
    for folder in (shared_tmp / "input", shared_tmp / "input" / "images", ct, model):
        folder.chmod(0o755)
    output = shared_tmp / "output"
    output.mkdir(mode=0o777)
    output.chmod(0o777)
    done = run_as_container(shared_tmp / "input", output, model)
    assert done.returncode == 0, done.stderr
    assert "lung1.mha: 512x512x48 voxels at 0.57x0.57x5 mm" in done.stdout
    values = [float(p.read_text()) for p in sorted(output.iterdir())]
    assert len(values) == 2 and all(0 <= v <= 1 for v in values)
