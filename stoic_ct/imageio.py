"""Reading a CT scan from disk: one image file or a DICOM folder, checked for use.

Everything SimpleITK can read is accepted (.mha, .mhd + raw, .nii.gz, .nrrd, a DICOM
series). What comes back is a 3D scalar `Volume` and the header fields the model uses;
anything else is refused with an `InputError` that says what was wrong.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from stoic_ct.errors import InputError
from stoic_ct.volume import Volume

logger = logging.getLogger(__name__)

# DICOM tags (group|element) for the header fields the MetaImage files of STOIC carry by name.
_DICOM_TAGS = {"PatientAge": "0010|1010", "PatientSex": "0010|0040"}
HEADER_KEYS = tuple(_DICOM_TAGS)

# Air. Non-finite voxels become air, which is also the value the pipeline pads with.
AIR_HU = -1024.0


@dataclass(frozen=True)
class Scan:
    """A CT as read: its voxels and geometry, and the header fields we use.

    Attributes:
        path: the file or DICOM folder it was read from.
        volume: voxels (z, y, x) in HU, in the file's own pixel type.
        header: `PatientAge` / `PatientSex` strings when the file has them.
    """

    path: Path
    volume: Volume
    header: dict[str, str] = field(default_factory=dict)


def read_scan(path: Path | str) -> Scan:
    """Read one CT from an image file or a DICOM folder.

    Raises:
        InputError: naming `path`, when it does not exist, cannot be read, is not a 3D
            scalar image, has a non-positive spacing, or has no finite voxel.
    """
    path = Path(path)
    try:
        if path.is_dir():
            image, header = _read_dicom_folder(path)
        elif path.is_file():
            image, header = _read_image_file(path)
        else:
            raise InputError("no such file or folder")
        volume = _checked_volume(image)
    except InputError as error:
        raise error.with_path(path) from None
    return Scan(path=path, volume=volume, header=header)


def _read_image_file(path: Path) -> tuple[sitk.Image, dict[str, str]]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"cannot read it as an image ({_itk_reason(error)})") from None
    _check_header(
        reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), reader.GetPixelID()
    )
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(
            f"cannot read its voxels; the file is truncated or corrupt ({_itk_reason(error)})"
        ) from None
    return image, header_of(image)


def header_of(image: sitk.Image) -> dict[str, str]:
    """`PatientAge` / `PatientSex` from an image's metadata, by name or by DICOM tag."""
    header = {k: image.GetMetaData(k).strip() for k in HEADER_KEYS if image.HasMetaDataKey(k)}
    for key, tag in _DICOM_TAGS.items():
        if key not in header and image.HasMetaDataKey(tag):
            header[key] = image.GetMetaData(tag).strip()
    return header


def scan_from_image(image: sitk.Image, path: Path) -> Scan:
    """Check an image already in memory as `read_scan` checks a file; `path` names it in errors."""
    try:
        _check_header(
            image.GetDimension(),
            image.GetSize(),
            image.GetNumberOfComponentsPerPixel(),
            image.GetPixelID(),
        )
        volume = _checked_volume(image)
    except InputError as error:
        raise error.with_path(path) from None
    return Scan(path=path, volume=volume, header=header_of(image))


def _read_dicom_folder(folder: Path) -> tuple[sitk.Image, dict[str, str]]:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError("the folder holds no DICOM series")
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    chosen = max(series, key=lambda sid: len(files[sid]))
    if len(series) > 1:
        logger.warning(
            "%s holds %d DICOM series; reading the largest (%s, %d slices)",
            folder,
            len(series),
            chosen,
            len(files[chosen]),
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    reader.SetMetaDataDictionaryArrayUpdate(True)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read its DICOM series ({_itk_reason(error)})") from None
    _check_header(
        image.GetDimension(),
        image.GetSize(),
        image.GetNumberOfComponentsPerPixel(),
        image.GetPixelID(),
    )
    header = {
        key: reader.GetMetaData(0, tag).strip()
        for key, tag in _DICOM_TAGS.items()
        if reader.HasMetaDataKey(0, tag)
    }
    return image, header


def _check_header(dimension: int, size: tuple[int, ...], components: int, pixel_id: int) -> None:
    shape = "x".join(str(s) for s in size)
    if pixel_id in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError("its voxels are complex numbers; a CT has real intensities")
    if dimension == 2:
        raise InputError(f"it is a 2D image ({shape} pixels); a CT scan is a 3D volume")
    if dimension != 3:
        raise InputError(f"it is a {dimension}D image ({shape} voxels); give one 3D volume")
    if components != 1:
        raise InputError(
            f"it has {components} components per voxel (a colour or vector image); "
            "a CT has one intensity per voxel"
        )


def _checked_volume(image: sitk.Image) -> Volume:
    spacing = np.asarray(image.GetSpacing())
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise InputError(f"its voxel spacing {tuple(spacing.tolist())} mm is not strictly positive")
    volume = Volume.from_sitk(image)
    if np.issubdtype(volume.voxels.dtype, np.floating):
        finite = np.isfinite(volume.voxels)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            if bad == finite.size:
                raise InputError("every voxel is NaN or infinite")
            logger.warning(
                "%d of %d voxels are NaN or infinite; they are read as air (%g HU)",
                bad,
                finite.size,
                AIR_HU,
            )
            volume = volume.with_voxels(
                np.where(finite, volume.voxels, AIR_HU).astype(volume.voxels.dtype)
            )
    return volume


def _itk_reason(error: RuntimeError) -> str:
    """The informative part of a SimpleITK exception, without C++ file names."""
    for line in str(error).splitlines():
        match = re.search(r"(?:ITK ERROR|sitk::ERROR): (?:\w+\(0x[0-9a-f]+\): )?(.*)", line)
        if match:
            return match.group(1).strip().rstrip(".")
    return str(error).strip().splitlines()[-1]


def image_stem(path: Path) -> str:
    """A file name without its image suffixes: scan.nii.gz -> scan."""
    name = path.name
    for suffix in (".nii.gz", ".mha", ".mhd", ".nii", ".nrrd", ".gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
