"""A model folder's record, `system.json`: what the folder holds, and where it came from.

    {"format": 1, "system": "ensemble", "encoder": "vit",
     "files": ["vitl_16_ct.pth", ..., "ensemble.json"],
     "history": [{"command": "train.py --system ensemble", "written": "2026-12-01T22:10:00+00:00",
                  "what": "...", "cohort": {"patients": 2000}, "auc": {...}}, ...]}

`system` is what process.py, predict, bench and the server run from the folder unless told
otherwise; `files` are the model files that system needs (`system_files`), each of which
must be in the folder; `history` lists, oldest first, every command that wrote the folder.
A folder without the record holds the published Balaïtous files. Standard library only.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stoic_ct.atomic import atomic_write_text
from stoic_ct.errors import ModelFileError
from stoic_ct.weights.model_files import (
    ENCODER_KINDS,
    SYSTEM_RECORD,
    SYSTEMS,
    encoder_kind,
    problem,
    read_manifest,
    sha256_of,
    system_files,
    update_manifest,
)

logger = logging.getLogger(__name__)

RECORD_FORMAT = 1
# What a folder without a record holds: the four published files.
PUBLISHED_SYSTEM, PUBLISHED_ENCODER = "balaitous", "vit"


@dataclass(frozen=True)
class SystemRecord:
    """The contents of system.json.

    Attributes:
        system: one of SYSTEMS.
        encoder: the frozen encoders under the heads (ENCODER_KINDS).
        files: the names of the model files the system needs.
        history: what wrote the folder, oldest first (command, written, what, ...).
    """

    system: str
    encoder: str
    files: tuple[str, ...]
    history: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(
        cls, system: str, encoder: str, history: tuple[dict[str, Any], ...] = ()
    ) -> SystemRecord:
        """The record of `system` with `encoder`, naming the files they need."""
        files = tuple(spec.name for spec in system_files(system, encoder))
        return cls(system, encoder_kind(encoder).name, files, history)

    def describe(self) -> str:
        """One line for logs: "ensemble (encoder vit), written by train.py ... on ..."."""
        last = self.history[-1] if self.history else {}
        origin = f", written by `{last['command']}` on {last['written']}" if last else ""
        return f"{self.system} (encoder {self.encoder}){origin}"


def read_system_record(model_dir: Path) -> SystemRecord | None:
    """The record of `model_dir`; None when it has none (the published files).

    Raises:
        ModelFileError: naming system.json when it is unreadable or malformed, or naming
            the first file it lists that the folder lacks.
    """
    record = _load(model_dir)
    if record is None:
        return None
    for name in record.files:
        if not (model_dir / name).is_file():
            raise ModelFileError(
                f"names {name} for the {record.system} system, but the folder lacks it",
                model_dir / SYSTEM_RECORD.name,
            )
    return record


def _load(model_dir: Path) -> SystemRecord | None:
    """The record as written, its files not checked; None when there is none."""
    path = model_dir / SYSTEM_RECORD.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ModelFileError(problem(SYSTEM_RECORD, f"cannot be read ({error})"), path) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelFileError(problem(SYSTEM_RECORD, f"is not JSON ({error})"), path) from None
    return _parse(document, path)


def _parse(document: object, path: Path) -> SystemRecord:
    def bad(what: str) -> ModelFileError:
        return ModelFileError(problem(SYSTEM_RECORD, what), path)

    if not isinstance(document, dict) or document.get("format") != RECORD_FORMAT:
        raise bad(f"must be a JSON object with format {RECORD_FORMAT}")
    system, encoder = document.get("system"), document.get("encoder", PUBLISHED_ENCODER)
    if system not in SYSTEMS:
        raise bad(f"system must be one of {', '.join(SYSTEMS)}, not {system!r}")
    try:
        encoder = encoder_kind(encoder).name
    except (ValueError, TypeError):
        raise bad(f"encoder must be one of {', '.join(ENCODER_KINDS)}, not {encoder!r}") from None
    files, history = document.get("files"), document.get("history", [])
    if not isinstance(files, list) or not all(
        isinstance(f, str) and f and Path(f).name == f for f in files
    ):
        raise bad("files must be a list of file names in the folder")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise bad("history must be a list of objects")
    return SystemRecord(system, encoder, tuple(files), tuple(history))


@dataclass(frozen=True)
class FolderChoice:
    """What runs from a model folder: its record's system and encoder, or the overrides.

    Attributes:
        record: the folder's record; None for the published files.
    """

    system: str
    encoder: str
    record: SystemRecord | None

    def describe(self, model_dir: Path) -> str:
        """One line for logs: what runs, and what the folder says of it."""
        held = (
            f"{model_dir / SYSTEM_RECORD.name}: {self.record.describe()}"
            if self.record
            else f"{model_dir} has no {SYSTEM_RECORD.name}: the published Balaitous files"
        )
        return f"system {self.system} (encoder {self.encoder}); {held}"


def choose(model_dir: Path, system: str | None = None, encoder: str | None = None) -> FolderChoice:
    """The system and encoder to run from `model_dir`: the folder's (its record's, else the
    published Balaitous with the ViTs), each replaced by `system` or `encoder` when given;
    an override of what the folder holds is logged.

    Raises:
        ModelFileError: as read_system_record.
    """
    record = read_system_record(model_dir)
    held = (record.system, record.encoder) if record else (PUBLISHED_SYSTEM, PUBLISHED_ENCODER)
    where = model_dir / SYSTEM_RECORD.name if record else f"{model_dir} (no {SYSTEM_RECORD.name})"
    for flag, given, recorded in (("--system", system, held[0]), ("--encoder", encoder, held[1])):
        if given is not None and given != recorded:
            logger.info("%s %s overrides what %s holds: %s", flag, given, where, recorded)
    return FolderChoice(system or held[0], encoder or held[1], record)


_COMMAND: list[str] = []


def invoked_as(program: str, argv: Sequence[str]) -> None:
    """Record the command line this process runs (an entry point's `main` calls it: its
    `argv` may not be sys.argv), for the history entries written from now on."""
    _COMMAND[:] = [*shlex.split(program), *argv]


def current_command() -> str:
    """The command line of this process, as a user would type it: what the entry point
    recorded (invoked_as), else sys.argv."""
    if _COMMAND:
        return shlex.join(_COMMAND)
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if program.name == "__main__.py":
        head = ["python", "-m", program.parent.name]
    else:
        head = [program.name]
    return shlex.join([*head, *sys.argv[1:]])


def origin(what: str, **details: Any) -> dict[str, Any]:
    """A history entry: this process's command, the time, what it did, and `details`
    (for example cohort={"patients": 48}, auc={...})."""
    return {
        "command": current_command(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "what": what,
        **details,
    }


def write_system_record(
    model_dir: Path, system: str, encoder: str, entry: dict[str, Any]
) -> SystemRecord:
    """Write or update `model_dir/system.json`: `system` with `encoder`, and `entry` added to
    the history the folder's record had; its MANIFEST line updated where there is one.

    Raises:
        ModelFileError: when the folder lacks a file that `system` needs, or its record is
            malformed (it is left as it is).
    """
    record = SystemRecord.of(system, encoder)
    missing = [name for name in record.files if not (model_dir / name).is_file()]
    if missing:
        raise ModelFileError(
            f"lacks {', '.join(missing)}, which the {system} system needs; "
            f"{SYSTEM_RECORD.name} was not written",
            model_dir,
        )
    earlier = _load(model_dir)  # a malformed record stops here: its history is not lost
    history = (*(earlier.history if earlier else ()), entry)
    record = replace(record, history=history)
    document = {
        "format": RECORD_FORMAT,
        "system": record.system,
        "encoder": record.encoder,
        "files": list(record.files),
        "history": list(record.history),
    }
    path = atomic_write_text(model_dir / SYSTEM_RECORD.name, json.dumps(document, indent=1) + "\n")
    if read_manifest(model_dir):
        update_manifest(model_dir, {path.name: sha256_of(path)})
    return record


def check_model_folder(model_dir: Path) -> FolderChoice:
    """Check that `model_dir` holds, checked, every file of the system it says it holds:
    each is there and its MANIFEST line (what export.sh packs) has its sha256.

    Raises:
        ModelFileError: naming the first file that is missing, unlisted or changed.
    """
    choice = choose(model_dir)
    names = (
        list(choice.record.files)
        if choice.record
        else [spec.name for spec in system_files(PUBLISHED_SYSTEM, PUBLISHED_ENCODER)]
    )
    if choice.record:
        names.append(SYSTEM_RECORD.name)
    manifest = read_manifest(model_dir)
    for name in names:
        path = model_dir / name
        if not path.is_file():
            raise ModelFileError(f"is missing, and {choice.system} needs it", path)
        if name not in manifest:
            raise ModelFileError(
                "is not listed in the folder's MANIFEST, so export.sh would leave it out", path
            )
        if sha256_of(path) != manifest[name]:
            raise ModelFileError("differs from the sha256 its MANIFEST line gives", path)
    return choice
