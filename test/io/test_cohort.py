"""The STOIC training layout: reference.csv, the scan folder, shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoic_ct.errors import InputError
from stoic_ct.io.cohort import (
    UNKNOWN,
    Patient,
    check_shards,
    parse_shard,
    read_cohort,
    read_reference,
    shard,
    shard_record,
)


def write_reference(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_reference_is_read_by_patient(tmp_path: Path) -> None:
    path = write_reference(
        tmp_path / "reference.csv", "PatientID,probCOVID,probSevere\n12,1,0\n7,0,0\n9,1.0,1\n"
    )
    assert read_reference(path) == {"12": (1, 0), "7": (0, 0), "9": (1, 1)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("PatientID,probCOVID\n1,1\n", "lacks the column(s) probSevere"),
        (
            "PatientID,probCOVID,probSevere\n1,0.5,0\n",
            "line 2: probCOVID is '0.5'; expected 0 or 1",
        ),
        ("PatientID,probCOVID,probSevere\n1,1,\n", "line 2: probSevere is ''"),
        ("PatientID,probCOVID,probSevere\n1,1,0\n1,0,0\n", "line 3: patient 1 is listed twice"),
        ("PatientID,probCOVID,probSevere\n,1,0\n", "line 2: empty PatientID"),
    ],
)
def test_a_bad_reference_names_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = write_reference(tmp_path / "reference.csv", text)
    with pytest.raises(InputError, match="reference.csv") as raised:
        read_reference(path)
    assert message in str(raised.value)


def test_cohort_lists_scans_with_their_labels(tmp_path: Path) -> None:
    scans = tmp_path / "data" / "mha"
    scans.mkdir(parents=True)
    for name in ("3.mha", "1.mha", "2.mha", "notes.txt"):
        (scans / name).touch()
    write_reference(
        tmp_path / "metadata" / "reference.csv",
        "PatientID,probCOVID,probSevere\n1,1,1\n3,0,0\n4,1,0\n",
    )
    assert read_cohort(tmp_path) == [
        Patient("1", scans / "1.mha", 1, 1),
        Patient("2", scans / "2.mha", UNKNOWN, UNKNOWN),  # not in the reference
        Patient("3", scans / "3.mha", 0, 0),
    ]


def test_a_folder_without_the_layout_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no data/mha/ folder; expected the STOIC layout"):
        read_cohort(tmp_path)
    (tmp_path / "data" / "mha").mkdir(parents=True)
    with pytest.raises(InputError, match="holds no .mha or .mhd scan"):
        read_cohort(tmp_path)


def test_shards_are_disjoint_and_cover_the_cohort() -> None:
    patients = [Patient(f"{i:03d}", Path(f"{i}.mha")) for i in range(11)]
    shards = [shard(patients, i, 3) for i in (1, 2, 3)]
    ids = [p.id for s in shards for p in s]
    assert sorted(ids) == sorted(p.id for p in patients) and len(ids) == len(set(ids))
    assert [len(s) for s in shards] == [4, 4, 3]


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/2/3"])
def test_bad_shards_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="shard"):
        parse_shard(text)
    assert parse_shard("2/5") == (2, 5)


def test_shards_make_the_whole_or_the_merge_says_what_is_missing() -> None:
    ids = [f"p{i:02d}" for i in range(7)]
    records = [shard_record(ids, i, 3) for i in (1, 2, 3)]
    held = [set(r["shard_ids"]) for r in records]
    assert [len(h) for h in held] == [3, 2, 2] and set().union(*held) == set(ids)
    check_shards([(f"t{i}", r, h) for i, (r, h) in enumerate(zip(records, held, strict=True))])
    with pytest.raises(InputError, match=r"shard\(s\) 2/3 of 3 are missing"):
        check_shards([("t1", records[0], held[0]), ("t3", records[2], held[2])])
    with pytest.raises(InputError, match="shards given twice: 1/3 in t1, again"):
        check_shards([("t1", records[0], held[0]), ("again", records[0], set())])
    with pytest.raises(InputError, match="t2: lacks 1 of its shard's patients: p04"):
        check_shards(
            [("t1", records[0], held[0]), ("t2", records[1], {"p01"}), ("t3", records[2], held[2])]
        )
    with pytest.raises(InputError, match="1 patient\\(s\\) appear in more than one table: p00"):
        check_shards([("t1", records[0], held[0]), ("t2", records[1], held[1] | {"p00"})])
    other = shard_record([*ids, "p07"], 2, 3)
    with pytest.raises(InputError, match="shards of different runs"):
        check_shards([("t1", records[0], held[0]), ("t2", other, set(other["shard_ids"]))])
