"""Evaluation: AUC and its interval, calibration, nested cross-validation, scoring given
predictions by the STOIC rule, the report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stoic_ct.errors import InputError
from stoic_ct.head_training.evaluation import (
    auc_with_interval,
    calibration,
    cross_validate,
    read_predictions,
    report,
    score_predictions,
)
from stoic_ct.head_training.features import FeatureTable
from stoic_ct.head_training.training import FitSettings

FAST = FitSettings(inner_folds=3, c_grid=(0.01, 0.1, 1.0, 10.0))


def test_auc_interval_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    perfect = auc_with_interval(y, y + 0.1 * rng.random(400))
    assert (perfect.auc, perfect.low, perfect.high) == pytest.approx((1.0, 1.0, 1.0))
    noisy = auc_with_interval(y, y + rng.normal(0, 1.0, 400))
    assert noisy.low < noisy.auc < noisy.high and 0.7 < noisy.auc < 0.85
    chance = auc_with_interval(y, rng.random(400))
    assert chance.low < 0.5 < chance.high
    assert chance.patients == 400 and chance.positives == y.sum()


def test_calibration_bins_cover_every_patient() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(20_000)
    y = (rng.random(20_000) < p).astype(int)  # calibrated by construction
    bins = calibration(y, p)
    assert sum(b["patients"] for b in bins) == 20_000 and len(bins) == 10
    for b in bins:  # about 2000 patients a bin: a standard error near 0.011
        assert abs(b["observed"] - b["predicted"]) < 0.05
    overconfident = calibration(y, np.where(p > 0.5, 0.99, 0.01), bins=2)
    assert overconfident[0]["observed"] == pytest.approx(0.25, abs=0.02)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_severity_is_scored_among_covid_positive_patients_only(tmp_path: Path) -> None:
    reference = write_csv(
        tmp_path / "reference.csv",
        "PatientID,probCOVID,probSevere\n1,1,1\n2,1,0\n3,0,0\n4,0,0\n5,1,1\n6,1,0\n",
    )
    # Patients 3 and 4 (COVID-negative) get high severity: counted, they would lower the AUC.
    predictions = write_csv(
        tmp_path / "predictions.csv",
        "PatientID,probCOVID,probSevere\n1,0.9,0.8\n2,0.8,0.2\n3,0.2,0.95\n4,0.1,0.9\n"
        "5,0.7,0.7\n6,0.85,0.1\n",
    )
    results = score_predictions(predictions, reference)
    assert list(results["severe"].patient_id) == ["1", "2", "5", "6"]
    document = report(results, {"title": "t"}, tmp_path / "report")
    assert document["tasks"]["severe"]["heads"]["given"]["auc"] == 1.0
    assert document["tasks"]["covid"]["patients"] == 6


def test_predict_csv_output_can_be_scored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    predictions = write_csv(
        tmp_path / "out.csv",
        "image,probability_covid_19,probability_severe_covid_19,age_years,error\n"
        "/data/1.mha,0.9,0.8,65,\n/data/2.nii.gz,0.2,0.1,65,\n/data/3.mha,,,,unreadable\n",
    )
    assert read_predictions(predictions) == {"1": (0.9, 0.8), "2": (0.2, 0.1)}
    reference = write_csv(
        tmp_path / "reference.csv", "PatientID,probCOVID,probSevere\n1,1,1\n2,0,0\n3,1,0\n4,1,0\n"
    )
    with pytest.raises(InputError, match="severe task has 1 positive and 0 negative"):
        score_predictions(predictions, reference)
    assert "2 of 4 patients of" in caplog.text and "have no prediction" in caplog.text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,p\n1,0.5\n", "has the columns \\['id', 'p'\\]; expected PatientID,probCOVID"),
        ("PatientID,probCOVID,probSevere\n1,1.5,0\n", "line 2: .* are not probabilities"),
        ("PatientID,probCOVID,probSevere\n1,high,0\n", "line 2: a probability is not a number"),
    ],
)
def test_bad_predictions_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write_csv(tmp_path / "predictions.csv", text)
    with pytest.raises(InputError, match=message) as raised:
        read_predictions(path)
    assert str(path) in str(raised.value)


def test_nested_cross_validation_predicts_every_patient_out_of_fold(
    cohort_table: FeatureTable, tmp_path: Path
) -> None:
    results = cross_validate(cohort_table, FAST, folds=3, repeats=2, progress=False)
    covid = results["covid"]
    assert len(covid.y) == 48 and set(covid.predictions) == {"full", "lung", "combined"}
    assert all(runs.shape == (2, 48) for runs in covid.predictions.values())
    assert all(((p > 0) & (p < 1)).all() for p in covid.predictions.values())
    # The two repetitions split the patients differently: their predictions differ.
    assert not np.allclose(*covid.predictions["combined"])
    assert len(results["severe"].y) == int((cohort_table.covid == 1).sum())

    document = report(results, {"title": "cv", "protocol": {"outer": "2 x 3"}}, tmp_path)
    for task, result in results.items():
        for head in result.predictions:
            score = document["tasks"][task]["heads"][head]
            assert len(score["auc_per_repeat"]) == 2
            assert score["auc"] == pytest.approx(np.mean(score["auc_per_repeat"]))
            assert score["ci95"][0] <= score["auc"] <= score["ci95"][1]
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(document))
    markdown = (tmp_path / "report.md").read_text()
    assert "| weighted average |" in markdown and "- outer: 2 x 3" in markdown
    for name in ("roc.png", "calibration.png"):
        with Image.open(tmp_path / name) as image:
            assert image.width > 2 * image.height * 0.9  # two panels, covid and severe
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16) or []
            assert len(colours) > 5  # curves drawn, not a blank canvas
