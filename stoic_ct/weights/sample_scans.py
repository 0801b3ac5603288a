"""Two public chest CTs for tests and trials, fetched from the package index.

The pyradiomics 3.1.0 source distribution (BSD-3-Clause; its data/ folder holds CTs of the
NSCLC-Radiomics / Lung1 collection shared through The Cancer Imaging Archive) carries:

- `lung1`: `data/lung1_image.nrrd`, 512 x 512 x 48 at 0.57 x 0.57 x 5 mm, neck to
  mid-thorax;
- `lung2`: `data/lung2_image.nrrd`, 512 x 512 x 61 at 0.63 x 0.63 x 5 mm, the whole chest,
  with a ground-glass patch in the right lung.

`pip download pyradiomics==3.1.0` fails on the package's own metadata, so the archive is
fetched as a file from the index pip uses (stoic_ct.weights.fetch.configured_index),
checked against the sha256 pinned here, and the two scans are extracted into a cache
folder with a MANIFEST; later calls find them there without the network.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from stoic_ct.atomic import atomic_write
from stoic_ct.weights.fetch import FetchError, download, index_file_location
from stoic_ct.weights.model_files import read_manifest, sha256_of, write_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexArchive:
    """Files inside one source archive of a project on a package index.

    Attributes:
        project, filename: where the index lists the archive.
        sha256: the archive's pinned digest; anything else is rejected.
        members: name -> path of a file inside the archive.
    """

    project: str
    filename: str
    sha256: str
    members: dict[str, str]


PYRADIOMICS = IndexArchive(
    project="pyradiomics",
    filename="pyradiomics-3.1.0.tar.gz",
    sha256="24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4",
    members={
        "lung1": "pyradiomics-3.1.0/data/lung1_image.nrrd",
        "lung2": "pyradiomics-3.1.0/data/lung2_image.nrrd",
    },
)


def sample_scans(cache: Path, index: str, source: IndexArchive = PYRADIOMICS) -> dict[str, Path]:
    """The archive's members, from `cache` when its MANIFEST vouches for them, else fetched.

    Returns:
        name -> path of the extracted file in `cache`.

    Raises:
        UnreachableError: when the index cannot be reached and the cache lacks a file.
        FetchError: when the archive differs from the pinned sha256 or lacks a member.
    """
    paths = {name: cache / Path(member).name for name, member in source.members.items()}
    manifest = read_manifest(cache)
    if all(
        path.is_file() and manifest.get(path.name) == sha256_of(path) for path in paths.values()
    ):
        return paths
    cache.mkdir(parents=True, exist_ok=True)
    url, published = index_file_location(index, source.project, source.filename)
    if published != source.sha256:
        raise FetchError(f"{url}: the index gives sha256 {published}, not the pinned one")
    part = cache / f".{source.filename}.part"
    logger.info("fetching %s", url)
    download(url, part, source.filename, again="run it again")
    try:
        digest = sha256_of(part)
        if digest != source.sha256:
            raise FetchError(f"{url}: sha256 {digest} differs from the pinned {source.sha256}")
        with tarfile.open(part, "r:gz") as archive:
            for name, member in source.members.items():
                extracted = archive.extractfile(member)
                if extracted is None:
                    raise FetchError(f"{url}: {member} is not a file in the archive")
                with extracted:
                    atomic_write(paths[name], partial(shutil.copyfileobj, extracted))
    except (tarfile.TarError, KeyError) as error:
        raise FetchError(f"{url}: cannot extract {source.filename} ({error})") from None
    finally:
        part.unlink(missing_ok=True)
    write_manifest(cache, {path.name: sha256_of(path) for path in paths.values()})
    return paths
