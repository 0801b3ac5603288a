"""A cohort in the STOIC training layout: scans, labels and how to split them among workers.

    DATA_DIR/data/mha/<PatientID>.mha
    DATA_DIR/metadata/reference.csv      PatientID,probCOVID,probSevere   (0 or 1)

This is the layout of the STOIC2021 final-phase training container (`/input`). Age and
sex come from each scan's header, as at inference time. An optional `severity` column
holds COV19-CT-DB's four grades (1 mild, 2 moderate, 3 severe, 4 critical) for the
4-class task; lesion masks for segmentation pretraining lie in DATA_DIR/data/lesions/.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from stoic_ct.errors import InputError

T = TypeVar("T")

REFERENCE_COLUMNS = ("PatientID", "probCOVID", "probSevere")
GRADE_COLUMN = "severity"
GRADES = ("mild", "moderate", "severe", "critical")
UNKNOWN = -1  # a label the reference does not give
REFERENCE = Path("metadata", "reference.csv")  # the labels, within a cohort's folder


@dataclass(frozen=True)
class Patient:
    """One scan of the cohort and its labels (1, 0, or UNKNOWN when not in the reference)."""

    id: str
    image: Path
    covid: int = UNKNOWN
    severe: int = UNKNOWN


# The challenge's two tasks: P(COVID-19) and P(severe COVID-19) among the COVID-positive.
STOIC_TASKS = ("covid", "severe")


def task_rows(covid: np.ndarray, severe: np.ndarray, task: str) -> np.ndarray:
    """(N,) bool: the patients a task is fitted and scored on (the STOIC rule).

    covid: every patient with a COVID label; severe: the COVID-positive patients with a
    severity label.
    """
    if task == "covid":
        return np.asarray(covid != UNKNOWN)
    if task == "severe":
        return np.asarray((covid == 1) & (severe != UNKNOWN))
    raise ValueError(f"unknown task {task!r}")


def read_reference(path: Path) -> dict[str, tuple[int, int]]:
    """PatientID -> (covid, severe) from a STOIC reference.csv.

    Raises:
        InputError: naming the file and line when a column is missing, a label is not 0
            or 1, or a patient is listed twice.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REFERENCE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(
                    f"lacks the column(s) {', '.join(missing)}; expected a header "
                    f"{','.join(REFERENCE_COLUMNS)}",
                    path,
                )
            labels: dict[str, tuple[int, int]] = {}
            for line, row in enumerate(reader, start=2):
                patient = (row["PatientID"] or "").strip()
                if not patient:
                    raise InputError(f"line {line}: empty PatientID", path)
                if patient in labels:
                    raise InputError(f"line {line}: patient {patient} is listed twice", path)
                labels[patient] = (
                    _label(row["probCOVID"], "probCOVID", line, path),
                    _label(row["probSevere"], "probSevere", line, path),
                )
    except OSError as error:
        raise InputError(f"cannot be read ({error.strerror or error})", path) from None
    except UnicodeDecodeError:
        raise InputError("is not a UTF-8 text file", path) from None
    return labels


def read_grades(path: Path) -> dict[str, int]:
    """PatientID -> severity grade as a class index 0-3, for rows whose `severity` is set.

    Raises:
        InputError: naming the file and line when the column is missing or a grade is not
            1, 2, 3 or 4.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if GRADE_COLUMN not in (reader.fieldnames or []) or "PatientID" not in (
                reader.fieldnames or []
            ):
                raise InputError(
                    f"lacks the columns PatientID and {GRADE_COLUMN} (grades 1-4: "
                    f"{', '.join(GRADES)}) that the severity4 task needs",
                    path,
                )
            grades = {}
            for line, row in enumerate(reader, start=2):
                text = (row[GRADE_COLUMN] or "").strip()
                if not text:
                    continue
                if text not in ("1", "2", "3", "4"):
                    raise InputError(
                        f"line {line}: {GRADE_COLUMN} is {text!r}; expected 1, 2, 3 or 4", path
                    )
                grades[(row["PatientID"] or "").strip()] = int(text) - 1
    except OSError as error:
        raise InputError(f"cannot be read ({error.strerror or error})", path) from None
    return grades


def _label(text: str | None, column: str, line: int, path: Path) -> int:
    value = (text or "").strip()
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number not in (0.0, 1.0):
        raise InputError(f"line {line}: {column} is {value!r}; expected 0 or 1", path)
    return int(number)


def read_cohort(data_dir: Path) -> list[Patient]:
    """Every scan under DATA_DIR/data/mha, sorted by PatientID, with its labels.

    Scans missing from the reference keep UNKNOWN labels (they can still be extracted);
    reference rows without a scan are ignored by the caller, which can compare counts.

    Raises:
        InputError: when the folder does not have the STOIC layout.
    """
    scans = data_dir / "data" / "mha"
    reference = data_dir / REFERENCE
    if not scans.is_dir():
        raise InputError(
            "has no data/mha/ folder; expected the STOIC layout DATA_DIR/data/mha/<PatientID>.mha "
            "and DATA_DIR/metadata/reference.csv",
            data_dir,
        )
    labels = read_reference(reference) if reference.exists() else {}
    images = sorted(p for p in scans.iterdir() if p.name.endswith((".mha", ".mhd")))
    if not images:
        raise InputError("holds no .mha or .mhd scan", scans)
    patients = []
    for image in images:
        patient = image.name.rsplit(".", 1)[0]
        covid, severe = labels.get(patient, (UNKNOWN, UNKNOWN))
        patients.append(Patient(patient, image, covid, severe))
    return patients


def parse_shard(text: str) -> tuple[int, int]:
    """ "I/N" (1 <= I <= N) -> (I, N).

    Raises:
        ValueError: when the text is not of that form.
    """
    parts = text.split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"shard {text!r} is not of the form I/N, e.g. 1/4") from None
    if not 1 <= index <= count:
        raise ValueError(f"shard {text!r}: I must be between 1 and N")
    return index, count


def shard(patients: list[Patient], index: int, count: int) -> list[Patient]:
    """The `index`-th of `count` disjoint shards (1-based), every count-th patient by ID.

    Interleaving keeps the shards balanced when scan sizes drift with the ID.
    """
    return take_shard(patients, index, count, lambda p: p.id)


def take_shard(items: Sequence[T], index: int, count: int, key: Callable[[T], str]) -> list[T]:
    """The `index`-th of `count` disjoint shards (1-based): every count-th item in the
    order of `key`, the one rule every sharded command and its merge check share."""
    return sorted(items, key=key)[index - 1 :: count]


def shard_record(ids: Sequence[str], index: int, count: int) -> dict[str, Any]:
    """What a shard's output records so that a merge can check it: the shard ("I/N"), the
    whole list it was cut from (its size and digest) and the ids of this shard."""
    ordered = sorted(ids)
    return {
        "shard": f"{index}/{count}",
        "cohort": {"size": len(ordered), "digest": _digest(ordered)},
        "shard_ids": take_shard(ordered, index, count, str),
    }


def check_shards(records: Sequence[tuple[str, dict[str, Any], set[str]]]) -> None:
    """That the shards' outputs make the whole: (name, shard_record, ids it holds) each,
    the ids held including failures.

    Raises:
        InputError: naming the missing or repeated shards, the ids of a shard missing
            from its output, or the ids in two outputs.
    """
    seen: dict[str, str] = {}
    twice = sorted(
        {i for name, _, held in records for i in held if seen.setdefault(i, name) != name}
    )
    if twice:
        raise InputError(
            f"{len(twice)} patient(s) appear in more than one table: {_few(twice)}; "
            "merge each shard once"
        )
    sharded = [(name, record) for name, record, _ in records if record.get("cohort")]
    if not sharded:
        return
    if len(sharded) < len(records):
        raise InputError("some tables are shards and some are not; merge the shards of one run")
    cohorts = {json.dumps(record["cohort"], sort_keys=True) for _, record in sharded}
    counts = {record["shard"].split("/")[1] for _, record in sharded}
    if len(cohorts) > 1 or len(counts) > 1:
        raise InputError(
            "the tables are shards of different runs (other cohorts or shard counts: "
            + ", ".join(f"{name} {record['shard']}" for name, record in sharded)
            + ")"
        )
    count = int(counts.pop())
    given: dict[int, list[str]] = {}
    for name, record in sharded:
        given.setdefault(int(record["shard"].split("/")[0]), []).append(name)
    repeated = {i: names for i, names in given.items() if len(names) > 1}
    if repeated:
        raise InputError(
            "shards given twice: "
            + "; ".join(f"{i}/{count} in {', '.join(names)}" for i, names in repeated.items())
        )
    missing = [i for i in range(1, count + 1) if i not in given]
    if missing:
        raise InputError(
            f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} of {count} are missing; "
            "every shard must be run and merged (shards are numbered from 1)"
        )
    for name, record, held in records:
        lacking = sorted(set(record["shard_ids"]) - held)
        if lacking:
            raise InputError(
                f"lacks {len(lacking)} of its shard's patients: {_few(lacking)} (the run of "
                f"shard {record['shard']} did not finish)",
                name,
            )


def _digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _few(ids: Sequence[str], shown: int = 10) -> str:
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more
