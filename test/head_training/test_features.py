"""Feature extraction: one row per scan, the cache (resume, recompute), failures, the table file."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stoic_ct.errors import InputError
from stoic_ct.head_training.features import (
    FeatureTable,
    encoder_key,
    extract,
    labelled,
    merge_tables,
)
from stoic_ct.inference.pipeline import Balaitous, EncodedScan
from stoic_ct.io.cohort import read_cohort
from stoic_ct.io.volume import Volume
from stoic_ct.phantom import PhantomSpec, make_phantom, write_phantom


class Interrupting:
    """The model, counting its scans, and interrupted (Ctrl-C) after `after` of them."""

    def __init__(self, model: Balaitous, after: int = 10**6) -> None:
        self.model, self.after, self.calls = model, after, 0

    def encode(self, volume: Volume, lung_labels: Volume | None = None) -> EncodedScan:
        if self.calls == self.after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.model.encode(volume, lung_labels)


def assert_same_rows(table: FeatureTable, expected: FeatureTable) -> None:
    for name in FeatureTable.ARRAYS:
        np.testing.assert_array_equal(getattr(table, name), getattr(expected, name), err_msg=name)


def small_cohort(source: Path, dest: Path, count: int) -> Path:
    """The first `count` scans of a cohort, with the whole reference."""
    (dest / "data" / "mha").mkdir(parents=True)
    for patient in read_cohort(source)[:count]:
        shutil.copy(patient.image, dest / "data" / "mha")
    shutil.copytree(source / "metadata", dest / "metadata")
    return dest


def test_one_row_per_scan_with_labels_and_demographics(
    cohort_table: FeatureTable, phantom_cohort: Path
) -> None:
    patients = read_cohort(phantom_cohort)
    assert list(cohort_table.patient_id) == sorted(p.id for p in patients)
    assert cohort_table.feature_full.shape == cohort_table.feature_lung.shape == (48, 64)
    assert np.isfinite(cohort_table.feature_full).all()
    assert list(cohort_table.covid) == [p.covid for p in patients]
    # Ages from the headers (STOIC's bin midpoints), sex M/F, encoded as the heads take them.
    assert set(cohort_table.age_years) <= {35, 45, 55, 65, 75, 85}
    np.testing.assert_allclose(
        cohort_table.age_feature, np.clip(cohort_table.age_years / 100, 0.25, 0.95)
    )
    assert set(cohort_table.sex) == {"M", "F"}
    np.testing.assert_array_equal(cohort_table.sex_feature, (cohort_table.sex == "M").astype(float))
    assert cohort_table.provenance["failures"] == []
    # Severity is labelled among COVID-positive patients only.
    assert labelled(cohort_table, "severe").sum() == (cohort_table.covid == 1).sum()


def test_an_interrupted_extraction_resumes_from_the_cache(
    phantom_cohort: Path,
    tiny_model: Balaitous,
    tiny_model_dir: Path,
    cohort_table: FeatureTable,
    tmp_path: Path,
) -> None:
    patients = read_cohort(phantom_cohort)[:10]
    key = encoder_key(tiny_model_dir, "exact", with_r231=False)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        extract(patients, Interrupting(tiny_model, after=4), cache, key, progress=False)
    assert len(list(cache.glob("*.npz"))) == 4
    assert not list(cache.glob(".*"))  # nothing half-written

    counting = Interrupting(tiny_model)
    table = extract(patients, counting, cache, key, progress=False)
    assert counting.calls == 6
    ids = [p.id for p in patients]
    assert_same_rows(table, cohort_table.take(np.isin(cohort_table.patient_id, ids)))


def test_a_changed_scan_is_computed_again(
    phantom_cohort: Path, tiny_model: Balaitous, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cohort = small_cohort(phantom_cohort, tmp_path / "cohort", 3)
    key = encoder_key(tiny_model_dir, "exact", with_r231=False)
    first = extract(read_cohort(cohort), tiny_model, tmp_path / "cache", key, progress=False)
    changed = read_cohort(cohort)[1]
    spec = PhantomSpec(size=(64, 64, 12), spacing=(5.6, 5.6, 10.0), lesion_burden=0.3, seed=99)
    write_phantom(make_phantom(spec), str(changed.image), spec)

    counting = Interrupting(tiny_model)
    second = extract(read_cohort(cohort), counting, tmp_path / "cache", key, progress=False)
    assert counting.calls == 1
    same = second.patient_id != changed.id
    np.testing.assert_array_equal(second.feature_full[same], first.feature_full[same])
    assert not np.allclose(second.feature_full[~same], first.feature_full[~same])


def test_other_model_files_do_not_reuse_the_cache(
    phantom_cohort: Path, tiny_model: Balaitous, tiny_model_dir: Path, tmp_path: Path
) -> None:
    patients = read_cohort(phantom_cohort)[:2]
    key = encoder_key(tiny_model_dir, "exact", with_r231=False)
    extract(patients, tiny_model, tmp_path, key, progress=False)
    counting = Interrupting(tiny_model)
    extract(patients, counting, tmp_path, key | {"encoder_key": "0" * 64}, progress=False)
    assert counting.calls == 2


def test_a_failing_scan_is_reported_and_the_others_extracted(
    phantom_cohort: Path,
    tiny_model: Balaitous,
    tiny_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cohort = small_cohort(phantom_cohort, tmp_path / "cohort", 3)
    broken = read_cohort(cohort)[0]
    broken.image.write_bytes(broken.image.read_bytes()[:300])  # truncated
    key = encoder_key(tiny_model_dir, "exact", with_r231=False)
    table = extract(read_cohort(cohort), tiny_model, tmp_path / "cache", key, progress=False)
    assert len(table) == 2 and broken.id not in table.patient_id
    (failure,) = table.provenance["failures"]
    assert failure["patient_id"] == broken.id and str(broken.image) in failure["error"]
    assert "1 failed" in caplog.text


def test_no_scan_at_all_is_an_error(
    tiny_model: Balaitous, tiny_model_dir: Path, tmp_path: Path
) -> None:
    scans = tmp_path / "data" / "mha"
    scans.mkdir(parents=True)
    (scans / "1.mha").write_text("not an image")
    key = encoder_key(tiny_model_dir, "exact", with_r231=False)
    with pytest.raises(InputError, match="no scan gave features"):
        extract(read_cohort(tmp_path), tiny_model, tmp_path / "cache", key, progress=False)


def test_the_table_file_round_trips(cohort_table: FeatureTable, tmp_path: Path) -> None:
    loaded = FeatureTable.load(cohort_table.save(tmp_path / "features.npz"))
    assert_same_rows(loaded, cohort_table)
    assert loaded.provenance == cohort_table.provenance


def test_other_files_are_not_taken_for_tables(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(InputError, match="not a feature table written by extract-features"):
        FeatureTable.load(tmp_path / "other.npz")
    (tmp_path / "garbage.npz").write_text("garbage")
    with pytest.raises(InputError, match="cannot be read as a feature table"):
        FeatureTable.load(tmp_path / "garbage.npz")


def test_shards_merge_into_the_whole_table(cohort_table: FeatureTable) -> None:
    rows = np.arange(len(cohort_table))
    shards = [cohort_table.take(rows % 3 == i) for i in range(3)]
    assert_same_rows(merge_tables(shards[::-1]), cohort_table)


def test_merging_refuses_mixed_runs_and_repeated_patients(cohort_table: FeatureTable) -> None:
    other = replace(cohort_table, provenance=cohort_table.provenance | {"encoder_key": "f" * 64})
    with pytest.raises(InputError, match="different model files or precisions"):
        merge_tables([cohort_table.take(slice(0, 5)), other.take(slice(5, 10))])
    with pytest.raises(InputError, match="appear in more than one table"):
        merge_tables([cohort_table.take(slice(0, 5)), cohort_table.take(slice(4, 10))])
