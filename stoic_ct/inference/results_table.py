"""What `predict` needs to run hundreds of scans safely: a results table written as it goes,
resumable, quality-control file names that never collide, each scan's warnings kept, and
the tables of a sharded run (`--shard I/N`, each with its TABLE.shard.json) merged only
when they make the whole.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from stoic_ct.atomic import atomic_write_text
from stoic_ct.errors import InputError
from stoic_ct.io.cohort import check_shards
from stoic_ct.io.imageio import image_stem

logger = logging.getLogger(__name__)

CSV_COLUMNS = (
    "image",
    "probability_covid_19",
    "probability_severe_covid_19",
    "age_years",
    "age_source",
    "sex",
    "sex_source",
    "lung_found",
    "system",
    "warnings",
    "error",
)


def start_csv(path: Path, resume: bool) -> set[str]:
    """Prepare the results table; returns the images it already has results for.

    Without `resume` the table starts empty (header only). With it, the rows that hold
    probabilities are kept and their images returned, so that they are skipped; rows of
    scans that failed are dropped, so that those scans run again.

    Raises:
        ValueError: when `resume` finds a file that is not a table of these columns.
    """
    kept: list[dict[str, str]] = []
    if resume and path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "image" not in reader.fieldnames:
                raise ValueError(f"{path}: not a results table of predict (no 'image' column)")
            kept = [row for row in reader if row.get("probability_covid_19")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
    return {row["image"] for row in kept}


def append_row(path: Path, row: dict[str, object]) -> None:
    """Add one scan's row to the table, flushed to disk: an interruption loses no result."""
    with path.open("a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(row)


def qc_file_names(images: Sequence[Path]) -> list[str]:
    """One PNG name per image, distinct across the batch.

    The file stem where it is unique (lung1.nii.gz -> lung1.png); the whole file name where
    stems collide (lung1.mha.png, lung1.nii.gz.png); then as many parent folders as it
    takes, joined by "_" (a/ct.mha, b/ct.mha -> a_ct.mha.png, b_ct.mha.png).
    """
    resolved = [path.resolve() for path in images]
    names = [image_stem(path) for path in resolved]
    depth = 0
    while len(set(names)) < len(names) and depth <= max(len(p.parts) for p in resolved):
        counts = {name: names.count(name) for name in names}
        names = [
            "_".join(path.parts[len(path.parts) - depth - 1 :]) if counts[name] > 1 else name
            for name, path in zip(names, resolved, strict=True)
        ]
        depth += 1
    return [f"{name}.png" for name in names]


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """The warnings logged inside the block (by any module), in order."""
    collector = _Collector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        yield collector.messages
    finally:
        root.removeHandler(collector)


def shard_file(table: Path) -> Path:
    """Where a shard's record lies beside its results table: TABLE.shard.json."""
    return table.with_name(table.name + ".shard.json")


def write_shard_record(table: Path, record: dict[str, object]) -> None:
    """Record beside `table` which shard of which image list it holds (io.cohort.shard_record)."""
    atomic_write_text(shard_file(table), json.dumps(record) + "\n")


def merge_results(tables: Sequence[Path], out: Path) -> int:
    """One results table from the tables of every shard of a run, in the order of the
    image paths; returns its number of rows.

    Raises:
        InputError: naming the table without a shard record, or (io.cohort.check_shards)
            the missing or repeated shards and images.
    """
    rows: list[dict[str, str]] = []
    records = []
    for table in tables:
        try:
            record = json.loads(shard_file(table).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(
                f"has no {shard_file(table).name} beside it: merge the tables that predict "
                "--shard wrote",
                table,
            ) from None
        with table.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "image" not in reader.fieldnames:
                raise InputError("is not a results table of predict (no 'image' column)", table)
            held = list(reader)
        records.append((str(table), record, {row["image"] for row in held}))
        rows += held
    check_shards(records)
    rows.sort(key=lambda row: row["image"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)
