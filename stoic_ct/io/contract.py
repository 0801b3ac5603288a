"""The STOIC2021 container contract: where the input is, where the outputs go, in what form.

Two input layouts. Today's grand-challenge lists a job's inputs in /input/inputs.json: one
entry per socket, each with `interface.slug`, `interface.kind` (and `super_kind`),
`interface.relative_path` and, for simple values, the `value` itself; images lie under
/input/<relative_path>/. Without inputs.json, the STOIC layout: the image under
/input/images/ct/, age and sex in /input/patient-age.json and /input/patient-sex.json.
Outputs are written atomically (temporary file, then rename), and stale outputs are removed
before a run starts, so a failed run leaves no result behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stoic_ct.atomic import READABLE
from stoic_ct.errors import InputError
from stoic_ct.io.demographics import Demographics, resolve_demographics
from stoic_ct.io.imageio import Scan
from stoic_ct.io.output_names import COVID_OUTPUT, SEVERE_OUTPUT

logger = logging.getLogger(__name__)

INPUT_DIR = Path("/input")
OUTPUT_DIR = Path("/output")
IMAGE_SUBDIR = Path("images/ct")
IMAGE_SUFFIXES = (".mha", ".mhd")
AGE_JSON = "patient-age.json"
SEX_JSON = "patient-sex.json"
INPUTS_JSON = "inputs.json"
# The sockets STOIC2021 defined for age and sex; their JSON files are <slug>.json.
AGE_SOCKET = "patient-age"
SEX_SOCKET = "patient-sex"


@dataclass(frozen=True)
class Probabilities:
    """P(COVID-19) and P(severe COVID-19) for one scan."""

    covid: float
    severe: float


def find_input_image(image_dir: Path) -> Path:
    """The single .mha (or .mhd) image in `image_dir`.

    Raises:
        InputError: when the folder is missing, holds no image, or holds several.
    """
    if not image_dir.is_dir():
        raise InputError("the input image folder does not exist", image_dir)
    images = sorted(
        p
        for p in image_dir.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not images:
        present = sorted(p.name for p in image_dir.iterdir())
        listing = f" (it holds: {', '.join(present[:5])})" if present else " (it is empty)"
        raise InputError(f"no .mha or .mhd image found{listing}", image_dir)
    if len(images) > 1:
        names = ", ".join(p.name for p in images[:5]) + (", ..." if len(images) > 5 else "")
        raise InputError(
            f"{len(images)} images found ({names}); the algorithm takes exactly one", image_dir
        )
    return images[0]


@dataclass(frozen=True)
class JobInputs:
    """One job's inputs: the folder holding the CT, and the raw age and sex values.

    `age` and `sex` are (where the value came from, the value or None when absent); the
    values are parsed, checked and defaulted by `demographics_for`.
    """

    image_dir: Path
    age: tuple[str, object | None]
    sex: tuple[str, object | None]


def read_job_inputs(input_dir: Path) -> JobInputs:
    """The job's inputs from INPUT_DIR/inputs.json when it exists, else from the STOIC layout.

    Raises:
        InputError: naming inputs.json, when it is unreadable, is not a list of sockets,
            or lists no image socket or several.
    """
    listing = input_dir / INPUTS_JSON
    if not listing.exists():
        age_json, sex_json = input_dir / AGE_JSON, input_dir / SEX_JSON
        return JobInputs(
            image_dir=input_dir / IMAGE_SUBDIR,
            age=(str(age_json), read_json_input(age_json)),
            sex=(str(sex_json), read_json_input(sex_json)),
        )
    sockets = _read_sockets(listing)
    images = [s for s in sockets if _is_image(s)]
    if len(images) != 1:
        slugs = ", ".join(str(s["slug"]) for s in images)
        found = f"{len(images)} image sockets ({slugs})" if images else "no image socket"
        raise InputError(f"lists {found}; the algorithm takes exactly one, the CT", listing)
    by_slug = {s["slug"]: s for s in sockets}
    return JobInputs(
        image_dir=input_dir / str(images[0]["relative_path"]),
        age=_simple_value(by_slug.get(AGE_SOCKET), input_dir, listing, AGE_SOCKET),
        sex=_simple_value(by_slug.get(SEX_SOCKET), input_dir, listing, SEX_SOCKET),
    )


def _read_sockets(listing: Path) -> list[dict[str, object]]:
    """Each entry of inputs.json as its interface's fields plus `value`; checked."""
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"not readable as JSON ({error})", listing) from None
    if not isinstance(entries, list):
        raise InputError("is not a list of socket values", listing)
    sockets = []
    for index, entry in enumerate(entries):
        interface = entry.get("interface") if isinstance(entry, dict) else None
        if not isinstance(interface, dict) or not all(
            isinstance(interface.get(key), str) for key in ("slug", "relative_path")
        ):
            raise InputError(
                f"entry {index} has no interface with a slug and a relative_path", listing
            )
        relative = Path(interface["relative_path"])
        if relative.is_absolute() or ".." in relative.parts:
            raise InputError(
                f"socket {interface['slug']}: relative_path {str(relative)!r} leaves /input",
                listing,
            )
        sockets.append({**interface, "value": entry.get("value")})
    return sockets


def _is_image(socket: dict[str, object]) -> bool:
    """An image socket: super_kind "Image", or kind "Image" where super_kind is not given."""
    kind = socket.get("super_kind", socket.get("kind"))
    return isinstance(kind, str) and kind.lower() == "image"


def _simple_value(
    socket: dict[str, object] | None, input_dir: Path, listing: Path, slug: str
) -> tuple[str, object | None]:
    """A simple socket's value: inline in inputs.json, else in its JSON file; None if absent."""
    if socket is None:
        return (f"{listing} (no {slug} socket)", None)
    if socket["value"] is not None:
        return (f"{listing} socket {slug}", socket["value"])
    path = input_dir / str(socket["relative_path"])
    return (str(path), read_json_input(path))


def read_json_input(path: Path) -> object | None:
    """The value in an optional JSON input file; None (with a warning) when it is unreadable."""
    if not path.exists():
        return None
    try:
        value: object = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("%s: not readable as JSON (%s); ignoring it", path, error)
        return None
    return value


def demographics_for(scan: Scan, inputs: JobInputs) -> Demographics:
    """Age and sex from the job's inputs, else the image header, else the defaults."""
    return resolve_demographics(
        ages=[inputs.age, (f"{scan.path} header PatientAge", scan.header.get("PatientAge"))],
        sexes=[inputs.sex, (f"{scan.path} header PatientSex", scan.header.get("PatientSex"))],
    )


def prepare_output_dir(output_dir: Path) -> None:
    """Create `output_dir` if needed, check it is writable, and remove stale outputs.

    Raises:
        InputError: naming the folder, when it cannot be created or written to.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise InputError(
            f"the output folder is not writable ({error.strerror})", output_dir
        ) from None
    for name in (COVID_OUTPUT, SEVERE_OUTPUT):
        stale = output_dir / name
        if stale.exists():
            logger.info("removing %s from an earlier run", stale)
            stale.unlink()


def write_outputs(output_dir: Path, probabilities: Probabilities) -> dict[str, Path]:
    """Write both probabilities as bare JSON floats (and a newline), each through a temporary
    file and a rename.

    Raises:
        InputError: when the folder cannot be written to; no output is left behind then.
        ValueError: when a probability is not a finite number in [0, 1].
    """
    values = {COVID_OUTPUT: probabilities.covid, SEVERE_OUTPUT: probabilities.severe}
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: {value!r} is not a probability")
    staged: dict[Path, Path] = {}
    try:
        for name, value in values.items():
            handle, staging = tempfile.mkstemp(dir=output_dir, prefix=f".{name}.", suffix=".tmp")
            staged[Path(staging)] = output_dir / name
            os.fchmod(handle, READABLE)
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                f.write(json.dumps(float(value)) + "\n")
                f.flush()
                os.fsync(f.fileno())
        for temporary, final in staged.items():
            temporary.replace(final)
    except OSError as error:
        for temporary, final in staged.items():
            for leftover in (temporary, final):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        raise InputError(f"cannot write the outputs ({error.strerror})", output_dir) from None
    return {name: output_dir / name for name in values}
