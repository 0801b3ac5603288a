"""Fitting the heads: scikit-learn's regressions, folded standardisation, C and alpha choices,
the written files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stoic_ct.errors import InputError, ModelFileError
from stoic_ct.head_training.features import FeatureTable, labelled
from stoic_ct.head_training.training import (
    FitSettings,
    choose_alpha,
    design_matrix,
    fit_heads,
    fit_task,
    heads_document,
    install_heads,
    to_logistic_heads,
    write_heads,
)
from stoic_ct.weights.model_files import MANIFEST, read_manifest, sha256_of, write_manifest
from stoic_ct.weights.network_files import load_heads

FAST = FitSettings(inner_folds=3, c_grid=(0.01, 0.1, 1.0, 10.0))


def gaussian_table(n: int = 120, dim: int = 6, seed: int = 0) -> FeatureTable:
    """Features on very different scales; covid shifts the first, severity follows age."""
    rng = np.random.default_rng(seed)
    covid = rng.integers(0, 2, n)
    age = rng.choice([35, 45, 55, 65, 75, 85], n).astype(float)
    severe = ((covid == 1) & (age + rng.normal(0, 10, n) > 62)).astype(int)
    scales = np.logspace(-2, 3, dim)
    features = {}
    for enc, shift in (("full", 1.5), ("lung", 0.7)):
        x = rng.normal(size=(n, dim))
        x[:, 0] += shift * covid
        features[enc] = x * scales + 100.0
    sex = rng.choice(["M", "F"], n)
    return FeatureTable(
        patient_id=np.array([f"{i:04d}" for i in range(n)]),
        feature_full=features["full"],
        feature_lung=features["lung"],
        age_years=age,
        sex=sex,
        age_feature=np.clip(age / 100, 0.25, 0.95),
        sex_feature=(sex == "M").astype(float),
        covid=covid.astype(np.int8),
        severe=np.where(covid == 1, severe, 0).astype(np.int8),
        provenance={"encoder_key": "k", "model_files": {}},
    )


def test_written_heads_reproduce_scikit_learn_within_1e_9(tmp_path: Path) -> None:
    table = gaussian_table()
    fits = fit_heads(table, FAST)
    path = write_heads(tmp_path, to_logistic_heads(fits), heads_document(fits, table, FAST))
    heads = load_heads(path)  # as process.py loads them
    for task, fit in fits.items():
        rows = labelled(table, task)
        y = (table.covid if task == "covid" else table.severe)[rows]
        expected = np.zeros(rows.sum())
        for enc in ("full", "lung"):
            x = design_matrix(table, enc, task)[rows]
            model = make_pipeline(
                StandardScaler(), LogisticRegression(C=fit.heads[enc].c, max_iter=FAST.max_iter)
            ).fit(x, y)
            expected += fit.alpha[enc] * model.predict_proba(x)[:, 1]
        got = [
            getattr(
                heads(
                    {"full": table.feature_full[i], "lung": table.feature_lung[i]},
                    table.age_feature[i],
                    table.sex_feature[i],
                ),
                task,
            )
            for i in np.flatnonzero(rows)
        ]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_severity_is_fitted_on_covid_positive_patients_with_age_and_sex() -> None:
    table = gaussian_table()
    fit = fit_task(table, "severe", FAST)
    assert fit.patients == int((table.covid == 1).sum())
    assert fit.heads["full"].coef.shape == (table.dim + 2,)
    assert fit.scores["cv_auc_combined"] > 0.75  # age carries the signal


def test_c_is_chosen_by_cross_validated_auc() -> None:
    table = gaussian_table()
    fit = fit_task(table, "covid", FAST)
    for head in fit.heads.values():
        assert head.cv_auc[head.c] == max(head.cv_auc.values())
        assert head.c == min(
            c for c, auc in head.cv_auc.items() if auc == max(head.cv_auc.values())
        )


def test_alpha_follows_the_better_head() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    informative, noise = y + rng.normal(0, 0.3, 200), rng.random(200)
    alpha, auc = choose_alpha(y, noise, informative, FAST)
    assert alpha < 0.5 and auc > 0.95
    alpha, _ = choose_alpha(y, informative, noise, FAST)
    assert alpha > 0.5


def test_too_few_patients_of_a_class_is_a_clear_error() -> None:
    table = gaussian_table(n=30)
    table = table.take(np.argsort(table.covid)[: int((table.covid == 0).sum()) + 1])
    with pytest.raises(InputError, match="1 positive and .* negative patients; .* at least 2"):
        fit_task(table, "covid", FAST)


def test_heads_json_records_data_settings_and_choices(tmp_path: Path) -> None:
    table = gaussian_table()
    fits = fit_heads(table, FAST)
    write_heads(tmp_path, to_logistic_heads(fits), heads_document(fits, table, FAST))
    document = json.loads((tmp_path / "heads.json").read_text())
    assert document["data"]["patients"] == 120
    assert document["fit"]["settings"]["inner_folds"] == 3
    covid = document["fit"]["tasks"]["covid"]
    assert covid["c"]["full"] == fits["covid"].heads["full"].c
    assert covid["alpha"]["full"] + covid["alpha"]["lung"] == pytest.approx(1)


def test_fitting_into_a_model_folder_updates_its_manifest(
    tiny_model_dir: Path, cohort_table: FeatureTable, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    write_manifest(model_dir, {p.name: sha256_of(p) for p in model_dir.glob("*.pth")})
    fits = fit_heads(cohort_table, FAST)
    path = write_heads(model_dir, to_logistic_heads(fits), heads_document(fits, cohort_table, FAST))
    assert read_manifest(model_dir)["balaitous.npz"] == sha256_of(path)
    assert (model_dir / MANIFEST).read_text().count("\n") == 4


def test_heads_are_refused_beside_other_encoders(
    tiny_model_dir: Path, cohort_table: FeatureTable, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    fits = fit_heads(cohort_table, FAST)
    document = heads_document(fits, cohort_table, FAST)
    document["data"]["model_files"]["vitl_16_ct.pth"] = "0" * 64
    before = sha256_of(model_dir / "balaitous.npz")
    with pytest.raises(ModelFileError, match="not the file the heads' features were extracted"):
        write_heads(model_dir, to_logistic_heads(fits), document)
    assert sha256_of(model_dir / "balaitous.npz") == before  # nothing overwritten

    wrong_size = to_logistic_heads(fit_heads(gaussian_table(dim=6), FAST))
    with pytest.raises(ModelFileError, match="features of length 64, but the heads take 6"):
        write_heads(model_dir, wrong_size, {})


def test_installed_heads_are_the_fitted_ones(
    tiny_model_dir: Path, cohort_table: FeatureTable, tmp_path: Path
) -> None:
    fits = fit_heads(cohort_table, FAST)
    write_heads(
        tmp_path / "out",
        to_logistic_heads(fits),
        heads_document(fits, cohort_table, FAST),
        expect_model_files=False,
    )
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    install_heads(tmp_path / "out", model_dir)
    installed = load_heads(model_dir / "balaitous.npz").arrays()
    fitted = to_logistic_heads(fits).arrays()
    assert installed.keys() == fitted.keys()
    for key, value in fitted.items():
        np.testing.assert_array_equal(installed[key], value)
    assert json.loads((model_dir / "heads.json").read_text())["data"]["patients"] == 48
