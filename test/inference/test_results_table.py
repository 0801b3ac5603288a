"""The batch helpers of `predict`: the results table, QC file names, collected warnings."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from stoic_ct.inference.results_table import (
    CSV_COLUMNS,
    append_row,
    collected_warnings,
    qc_file_names,
    start_csv,
)


def test_qc_names_are_the_stems_when_they_differ() -> None:
    assert qc_file_names([Path("a/lung1.nii.gz"), Path("b/lung2.mha"), Path("dicom/")]) == [
        "lung1.png",
        "lung2.png",
        "dicom.png",
    ]


def test_qc_names_never_collide(tmp_path: Path) -> None:
    images = [
        tmp_path / "a" / "ct.mha",
        tmp_path / "b" / "ct.mha",
        tmp_path / "lung1.mha",
        tmp_path / "lung1.nii.gz",
        tmp_path / "other.mha",
    ]
    names = qc_file_names(images)
    assert names == [
        "a_ct.mha.png",
        "b_ct.mha.png",
        "lung1.mha.png",
        "lung1.nii.gz.png",
        "other.png",
    ]


def test_a_table_starts_empty_or_keeps_its_results_when_resumed(tmp_path: Path) -> None:
    table = tmp_path / "out" / "results.csv"
    assert start_csv(table, resume=True) == set()  # no file yet
    append_row(table, {"image": "a.mha", "probability_covid_19": "0.5"})
    append_row(table, {"image": "b.mha", "error": "b.mha: cannot read it"})
    assert start_csv(table, resume=True) == {"a.mha"}
    rows = list(csv.DictReader(table.open()))
    assert [r["image"] for r in rows] == ["a.mha"]  # the failed scan will run again
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert start_csv(table, resume=False) == set()
    assert list(csv.DictReader(table.open())) == []


def test_resuming_from_another_file_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "notes.csv"
    table.write_text("name,value\nx,1\n")
    with pytest.raises(ValueError, match="not a results table of predict"):
        start_csv(table, resume=True)


def test_collected_warnings() -> None:
    log = logging.getLogger("stoic_ct.some_stage")
    with collected_warnings() as warnings:
        log.info("not a warning")
        log.warning("no lung found in %s", "scan.mha")
        log.error("an error is collected too")
    log.warning("after the block")
    assert warnings == ["no lung found in scan.mha", "an error is collected too"]
