"""Reading scans: every format SimpleITK reads, and a clear error for each bad input."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import write_dicom_series, write_image
from stoic_ct.errors import InputError
from stoic_ct.io.imageio import _itk_chatter_kept_off_stderr, metaimage_data_files, read_scan

VOXELS = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz", ".nrrd", ".mhd"])
def test_reads_image_files(tmp_path: Path, suffix: str) -> None:
    path = write_image(
        tmp_path / f"scan{suffix}",
        VOXELS,
        spacing=(0.8, 0.9, 2.5),
        PatientAge="045Y",
        PatientSex="F",
    )
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.volume.voxels, VOXELS)
    assert scan.volume.spacing == pytest.approx((0.8, 0.9, 2.5))
    assert scan.volume.size == (6, 5, 4)
    if suffix in (".mha", ".mhd", ".nrrd"):
        assert scan.header == {"PatientAge": "045Y", "PatientSex": "F"}


def test_reads_a_dicom_folder(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    folder.mkdir()
    for k in range(VOXELS.shape[0]):
        image = sitk.GetImageFromArray(VOXELS[k])
        image.SetSpacing((0.8, 0.9))
        tags = {
            "0008|0060": "CT",
            "0010|1010": "072Y",
            "0010|0040": "M",
            "0020|000d": "1.2.3",
            "0020|000e": "1.2.3.4",
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{2.5 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": "0.9\\0.8",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)
    scan = read_scan(folder)
    np.testing.assert_array_equal(scan.volume.voxels, VOXELS)
    assert scan.volume.spacing[2] == pytest.approx(2.5)
    assert scan.header == {"PatientAge": "072Y", "PatientSex": "M"}


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.mha: no such file or folder"):
        read_scan(tmp_path / "nope.mha")


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="holds no DICOM series"):
        read_scan(tmp_path)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "scan.mha"
    path.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match=r"scan.mha: cannot read it as an image"):
        read_scan(path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_file(tmp_path: Path, compress: bool) -> None:
    path = tmp_path / "scan.mha"
    rng = np.random.default_rng(0)
    sitk.WriteImage(
        sitk.GetImageFromArray(rng.integers(-1000, 1000, (20, 30, 30)).astype(np.int16)),
        str(path),
        useCompression=compress,
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(
        InputError, match=r"scan.mha: cannot read its voxels; the file is truncated"
    ):
        read_scan(path)


def test_2d_image(tmp_path: Path) -> None:
    path = write_image(tmp_path / "slice.mha", VOXELS[0], spacing=(1.0, 1.0))
    with pytest.raises(InputError, match=r"slice.mha: it is a 2D image \(6x5 pixels\)"):
        read_scan(path)


def test_4d_image(tmp_path: Path) -> None:
    path = tmp_path / "series.mha"
    sitk.WriteImage(sitk.Image([6, 5, 4, 3], sitk.sitkInt16), str(path))
    with pytest.raises(InputError, match=r"series.mha: it is a 4D image \(6x5x4x3 voxels\)"):
        read_scan(path)


def test_multi_component_image(tmp_path: Path) -> None:
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([6, 5, 4], sitk.sitkVectorUInt8, 3), str(path))
    with pytest.raises(InputError, match="rgb.mha: it has 3 components per voxel"):
        read_scan(path)


def test_some_nan_voxels_become_air(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    voxels = VOXELS.astype(np.float32)
    voxels[0, 0, :3] = [np.nan, np.inf, -np.inf]
    scan = read_scan(write_image(tmp_path / "scan.mha", voxels))
    assert np.isfinite(scan.volume.voxels).all()
    np.testing.assert_array_equal(scan.volume.voxels[0, 0, :3], -1024)
    np.testing.assert_array_equal(scan.volume.voxels[1:], voxels[1:])
    assert any(
        r.levelno == logging.WARNING and "3 of 120 voxels are NaN or infinite" in r.message
        for r in caplog.records
    )


def test_all_nan_is_an_error(tmp_path: Path) -> None:
    path = write_image(tmp_path / "scan.mha", np.full((3, 4, 5), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="scan.mha: every voxel is NaN or infinite"):
        read_scan(path)


def test_complex_voxels(tmp_path: Path) -> None:
    path = tmp_path / "complex.nii.gz"  # MetaImage stores complex voxels as two channels
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkComplexFloat32), str(path))
    with pytest.raises(InputError, match="complex numbers"):
        read_scan(path)


def test_a_flipped_storage_is_read_in_lps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same physical scan stored RAS (NIfTI's habit) reads as the LPS one, with a log
    line; "as-stored" keeps the file's order, as the published package does."""
    lps = write_image(tmp_path / "lps.mha", VOXELS, spacing=(0.8, 0.9, 2.5))
    ras_image = sitk.Flip(sitk.ReadImage(str(lps)), (True, True, False))
    sitk.WriteImage(ras_image, str(tmp_path / "ras.nii.gz"))
    with caplog.at_level(logging.INFO, logger="stoic_ct.io.imageio"):
        scan = read_scan(tmp_path / "ras.nii.gz")
    assert scan.stored_as == "RAS"
    np.testing.assert_array_equal(scan.volume.voxels, VOXELS)
    assert scan.volume.origin == pytest.approx(read_scan(lps).volume.origin, abs=1e-5)  # float32
    assert "ras.nii.gz: stored RAS; reoriented to LPS" in caplog.text
    as_stored = read_scan(tmp_path / "ras.nii.gz", "as-stored")
    np.testing.assert_array_equal(as_stored.volume.voxels, VOXELS[:, ::-1, ::-1])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stoic_ct.io.imageio"):
        assert read_scan(lps).stored_as == "LPS"
    assert "reoriented" not in caplog.text


def test_a_truncated_gzip_file(tmp_path: Path) -> None:
    """ITK reads a truncated .nii.gz without a word, the missing slices as 0 HU."""
    path = write_image(tmp_path / "scan.nii.gz", np.full((20, 32, 32), -800, np.int16))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(InputError, match=r"scan.nii.gz: its compressed data is truncated"):
        read_scan(path)


def test_an_mhd_without_its_voxel_file(tmp_path: Path) -> None:
    path = write_image(tmp_path / "scan.mhd", VOXELS)
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(InputError, match=r"scan.mhd: its voxel file scan.raw is missing"):
        read_scan(path)


def series_image(depth: int = 6) -> sitk.Image:
    image = sitk.GetImageFromArray(np.full((depth, 8, 8), -700, np.int16))
    image.SetSpacing((0.8, 0.8, 2.5))
    return image


def test_a_series_with_a_missing_slice(tmp_path: Path) -> None:
    folder = write_dicom_series(series_image(), tmp_path / "dicom", slices=[0, 1, 2, 4, 5])
    with pytest.raises(
        InputError,
        match=r"dicom: its DICOM series has missing or unevenly spaced slices: 5 mm between "
        r"slices 3 and 4 of 5, where the others are 2.5 mm apart",
    ):
        read_scan(folder)


def test_a_series_with_uneven_gaps(tmp_path: Path) -> None:
    """Slices 2.5, 2.5, 3.5 and 2.5 mm apart (from a grid of 0.5 mm)."""
    image = series_image(depth=23)
    image.SetSpacing((0.8, 0.8, 0.5))
    folder = write_dicom_series(image, tmp_path / "dicom", slices=[0, 5, 10, 17, 22])
    with pytest.raises(InputError, match=r"3.5 mm between slices 3 and 4 of 5, where the others"):
        read_scan(folder)


def test_several_series_in_one_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_dicom_series(series_image(6), tmp_path / "dicom", series=2)
    write_dicom_series(series_image(3), folder, series=3)
    assert read_scan(folder).volume.size[2] == 6
    assert "holds 2 DICOM series; reading the largest" in caplog.text


def test_a_one_slice_series(tmp_path: Path) -> None:
    folder = write_dicom_series(series_image(), tmp_path / "dicom", slices=[3])
    with pytest.raises(InputError, match="its DICOM series has a single slice, a 2D image"):
        read_scan(folder)


def test_series_in_subfolders(tmp_path: Path) -> None:
    write_dicom_series(series_image(), tmp_path / "study" / "series-a")
    (tmp_path / "study" / "notes").mkdir()
    with pytest.raises(
        InputError, match="holds no DICOM series; its subfolders series-a do: give one of them"
    ):
        read_scan(tmp_path / "study")


def test_no_itk_warning_reaches_stderr(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The missing-slice warning ITK would print in C++ terms stays out of the output."""
    folder = write_dicom_series(series_image(), tmp_path / "dicom", slices=[0, 1, 2, 4, 5])
    with pytest.raises(InputError):
        read_scan(folder)
    assert "WARNING" not in capfd.readouterr().err


def test_what_itk_prints_stays_off_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """MetaIO writes "data not read completely" on the C++ error stream of a truncated
    file; it goes to the debug log, and the error is ours alone."""
    path = write_image(tmp_path / "scan.mha", np.zeros((20, 32, 32), np.int16))
    path.write_bytes(path.read_bytes()[:-500])
    with (
        caplog.at_level(logging.DEBUG, logger="stoic_ct.io.imageio"),
        pytest.raises(InputError, match="truncated or corrupt"),
    ):
        read_scan(path)
    err = capfd.readouterr().err
    assert "MetaImage" not in err and "data not read completely" not in err
    assert "ITK: MetaImage: M_ReadElementsData: data not read completely" in caplog.text


def test_log_lines_written_meanwhile_get_through(capfd: pytest.CaptureFixture[str]) -> None:
    """While a scan is read, another thread may log (process.py loads the models then)."""
    with _itk_chatter_kept_off_stderr():
        os.write(2, b"MetaImage: chatter\n12:00:00 WARNING a warning of ours\n")
    assert capfd.readouterr().err == "12:00:00 WARNING a warning of ours\n"


@pytest.mark.parametrize(
    ("line", "extra", "names"),
    [
        ("LOCAL", "", []),
        ("scan.raw", "", ["scan.raw"]),
        ("/data/scan.raw", "", ["/data/scan.raw"]),
        ("LIST", "a.raw\nb.raw\n", ["a.raw", "b.raw"]),
        ("slice%02d.raw 1 5 2", "", ["slice01.raw", "slice03.raw", "slice05.raw"]),
    ],
)
def test_the_voxel_files_a_metaimage_header_names(
    tmp_path: Path, line: str, extra: str, names: list[str]
) -> None:
    header = tmp_path / "scan.mhd"
    header.write_text(f"ObjectType = Image\nNDims = 3\nElementDataFile = {line}\n{extra}")
    assert metaimage_data_files(header) == [tmp_path / n for n in names]
