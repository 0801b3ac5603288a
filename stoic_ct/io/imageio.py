"""Reading a CT scan from disk: one image file or a DICOM folder, checked for use.

Everything SimpleITK can read is accepted (.mha, .mhd + raw, .nii.gz, .nrrd, a DICOM
series). What comes back is a 3D scalar `Volume` and the header fields the model uses;
anything else is refused with an `InputError` that says what was wrong.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from stoic_ct.errors import InputError
from stoic_ct.io.orientation import CANONICAL, Orientation, orientation_code, to_canonical
from stoic_ct.io.volume import Volume

logger = logging.getLogger(__name__)

# ITK prints its warnings on stderr, in C++ terms, before our one-line errors; the one that
# carries information (a DICOM series with missing slices) is checked here instead.
sitk.ProcessObject.SetGlobalWarningDisplay(False)

# DICOM tags (group|element) for the header fields the MetaImage files of STOIC carry by name.
_DICOM_TAGS = {"PatientAge": "0010|1010", "PatientSex": "0010|0040"}
HEADER_KEYS = tuple(_DICOM_TAGS)

# Air. Non-finite voxels become air, which is also the value the pipeline pads with.
AIR_HU = -1024.0
# A DICOM series whose slice gaps differ from their median by more than this fraction has
# missing or unevenly spaced slices (positions rounded to 0.1 mm stay well within it).
SLICE_GAP_TOLERANCE = 0.2
METAIMAGE_SUFFIXES = (".mha", ".mhd")


@dataclass(frozen=True)
class Scan:
    """A CT as read: its voxels and geometry, and the header fields we use.

    Attributes:
        path: the file or DICOM folder it was read from.
        volume: voxels (z, y, x) in HU, in the file's own pixel type; in LPS order unless
            read with orientation "as-stored".
        header: `PatientAge` / `PatientSex` strings when the file has them.
        stored_as: the orientation code of the file's own storage, e.g. "LPS", "RAS".
    """

    path: Path
    volume: Volume
    header: dict[str, str] = field(default_factory=dict)
    stored_as: str = CANONICAL

    def describe(self) -> str:
        """One line for logs: "PATH: 512x512x61 voxels at 0.627x0.627x5 mm" (x, y, z)."""
        size = "x".join(str(n) for n in self.volume.size)
        spacing = "x".join(f"{s:.3g}" for s in self.volume.spacing)
        stored = "" if self.stored_as == CANONICAL else f", stored {self.stored_as}"
        return f"{self.path}: {size} voxels at {spacing} mm{stored}"


def read_scan(
    path: Path | str, orientation: Orientation = "canonical", *, within: Path | None = None
) -> Scan:
    """Read one CT from an image file or a DICOM folder.

    Args:
        orientation: "canonical" reorients the voxels to LPS, as STOIC stores its scans
            (stoic_ct.io.orientation; logged when it changes anything); "as-stored" keeps the
            file's order, as the published package does.
        within: a folder every file read must lie in, symbolic links resolved (a job's
            input folder); None: anywhere.

    Raises:
        InputError: naming `path`, when it does not exist, cannot be read, is not a 3D
            scalar image, has a non-positive spacing, or has no finite voxel; or when it
            would read a file outside `within`.
    """
    path = Path(path)
    try:
        if within is not None:
            _check_within(path, within)
        with _itk_chatter_kept_off_stderr():
            if path.is_dir():
                image, header = _read_dicom_folder(path)
            elif path.is_file():
                image, header = _read_image_file(path)
            else:
                raise InputError("no such file or folder")
        volume = _checked_volume(image)
    except InputError as error:
        raise error.with_path(path) from None
    stored_as = orientation_code(volume)
    if orientation == "canonical" and stored_as != CANONICAL:
        volume = to_canonical(volume)
        logger.info(
            "%s: stored %s; reoriented to %s as STOIC stores scans (axes permuted and "
            "flipped, no interpolation)",
            path,
            stored_as,
            CANONICAL,
        )
    return Scan(path=path, volume=volume, header=header, stored_as=stored_as)


# A line of this package's log format (stoic_ct.logs.LOG_FORMAT).
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


@contextmanager
def _itk_chatter_kept_off_stderr() -> Iterator[None]:
    """Keep what ITK's readers print straight on the process's stderr off the output.

    MetaIO and GDCM write to the C++ error stream ("MetaImage: M_ReadElementsData: data
    not read completely"), beside the error we raise for the same cause. Inside the block
    file descriptor 2 goes to a temporary file; afterwards lines in our log format (another
    thread's, meanwhile) are written back, and the rest is logged at DEBUG.
    """
    try:
        sink = tempfile.TemporaryFile()  # noqa: SIM115 (entered below, once it exists)
    except OSError:  # nowhere to write: leave stderr as it is
        yield
        return
    with sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode("utf-8", "replace").splitlines():
                if _LOG_LINE.match(line):
                    os.write(2, f"{line}\n".encode())
                elif line.strip():
                    logger.debug("ITK: %s", line.strip())


def _check_within(path: Path, folder: Path) -> None:
    """Every file reading `path` would open lies inside `folder`, links resolved."""
    root = folder.resolve()
    if path.is_dir():
        opened = [path, *(p for p in path.iterdir() if not p.is_dir())]
    elif path.suffix.lower() in METAIMAGE_SUFFIXES and path.is_file():
        opened = [path, *metaimage_data_files(path)]
    else:
        opened = [path]
    for item in opened:
        target = item.resolve()
        if not target.is_relative_to(root):
            what = "it is" if item == path else f"it names {item.name}, which is"
            raise InputError(
                f"{what} {target}, outside the input folder {folder}: a job reads only "
                "its own input"
            )


def metaimage_data_files(header: Path) -> list[Path]:
    """The voxel files a MetaImage header (.mha, .mhd) names: none when its voxels are in
    the file itself (LOCAL), one file, a LIST of files, or a numbered pattern
    ("slice%03d.raw 1 40 1"). Relative names are relative to the header's folder.

    Raises:
        InputError: when the header cannot be read.
    """
    try:
        with header.open("rb") as f:
            text = f.read(1 << 20).decode("latin-1")
    except OSError as error:
        raise InputError(f"cannot read it ({error.strerror})") from None
    match = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", text, flags=re.MULTILINE)
    if match is None or match.group(1).upper() == "LOCAL":
        return []
    value = match.group(1)
    words = value.split()
    names = [value]
    if words[0].upper() == "LIST":
        names = [line.strip() for line in text[match.end() :].splitlines() if line.strip()]
    elif "%" in words[0] and len(words) >= 3:
        try:
            first, last = int(words[1]), int(words[2])
            step = int(words[3]) if len(words) > 3 else 1
            names = [words[0] % i for i in range(first, last + 1, step or 1)]
        except (TypeError, ValueError):
            names = [value]
    return [header.parent / name for name in names]


def _read_image_file(path: Path) -> tuple[sitk.Image, dict[str, str]]:
    if path.suffix.lower() in METAIMAGE_SUFFIXES:
        _check_data_files(path)
    if path.suffix.lower() == ".gz":
        _check_gzip(path)
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


def _check_data_files(header: Path) -> None:
    """The voxel files a MetaImage header names must exist."""
    for data in metaimage_data_files(header):
        if not data.is_file():
            raise InputError(f"its voxel file {data.name} is missing (expected at {data})")


def _check_gzip(path: Path) -> None:
    """A gzip file must decompress to its end: ITK fills a truncated one with zeros."""
    try:
        with gzip.open(path) as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"its compressed data is truncated or corrupt ({error})") from None


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
        nested = sorted(
            d.name
            for d in folder.iterdir()
            if d.is_dir() and sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d))
        )
        hint = f"; its subfolders {', '.join(nested[:5])} do: give one of them" if nested else ""
        raise InputError(f"the folder holds no DICOM series{hint}")
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
    if len(files[chosen]) == 1:
        raise InputError(
            "its DICOM series has a single slice, a 2D image; a CT scan is a 3D volume"
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
    _check_slice_gaps(reader, image)
    header = {
        key: reader.GetMetaData(0, tag).strip()
        for key, tag in _DICOM_TAGS.items()
        if reader.HasMetaDataKey(0, tag)
    }
    return image, header


def _check_slice_gaps(reader: sitk.ImageSeriesReader, image: sitk.Image) -> None:
    """The slices of a series must be evenly spaced: a missing one would shift the grid.

    Positions (Image Position Patient) are measured along the slice normal, in the order
    the series reader sorted the files.
    """
    count = len(reader.GetFileNames())
    if not all(reader.HasMetaDataKey(i, "0020|0032") for i in range(count)):
        return
    normal = np.reshape(image.GetDirection(), (3, 3))[:, 2]
    positions = np.array(
        [
            np.dot(normal, [float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
            for i in range(count)
        ]
    )
    gaps = np.abs(np.diff(positions))
    typical = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - typical)))
    if typical <= 0 or abs(gaps[worst] - typical) > SLICE_GAP_TOLERANCE * typical:
        raise InputError(
            f"its DICOM series has missing or unevenly spaced slices: {gaps[worst]:.3g} mm "
            f"between slices {worst + 1} and {worst + 2} of {count}, where the others are "
            f"{typical:.3g} mm apart"
        )


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
