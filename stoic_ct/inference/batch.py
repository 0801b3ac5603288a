"""What `predict` needs to run hundreds of scans safely: a results table written as it goes,
resumable, quality-control file names that never collide, and each scan's warnings kept.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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
