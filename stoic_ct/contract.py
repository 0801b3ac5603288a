"""The STOIC2021 container contract: where the input is, where the outputs go, in what form.

See DESIGN.md section 2. Outputs are written atomically (temporary file, then rename), and
stale outputs are removed before a run starts, so a failed run leaves no result behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from stoic_ct.atomic import READABLE
from stoic_ct.demographics import Demographics, resolve_demographics
from stoic_ct.errors import InputError
from stoic_ct.heads import Probabilities
from stoic_ct.imageio import Scan

logger = logging.getLogger(__name__)

INPUT_DIR = Path("/input")
OUTPUT_DIR = Path("/output")
IMAGE_SUBDIR = Path("images/ct")
IMAGE_SUFFIXES = (".mha", ".mhd")
AGE_JSON = "patient-age.json"
SEX_JSON = "patient-sex.json"
COVID_OUTPUT = "probability-covid-19.json"
SEVERE_OUTPUT = "probability-severe-covid-19.json"


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


def demographics_for(scan: Scan, input_dir: Path) -> Demographics:
    """Age and sex from the JSON inputs, else the image header, else the defaults."""
    return resolve_demographics(
        ages=[
            (str(input_dir / AGE_JSON), read_json_input(input_dir / AGE_JSON)),
            (f"{scan.path} header PatientAge", scan.header.get("PatientAge")),
        ],
        sexes=[
            (str(input_dir / SEX_JSON), read_json_input(input_dir / SEX_JSON)),
            (f"{scan.path} header PatientSex", scan.header.get("PatientSex")),
        ],
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
    """Write both probabilities as bare JSON floats, each through a temporary file and a rename.

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
                f.write(json.dumps(float(value)))
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
