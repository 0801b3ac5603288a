"""The logistic heads against the published ones, with the published coefficients."""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.published import published_heads_path
from stoic_ct.errors import ModelFileError
from stoic_ct.models.heads import LogisticHeads
from stoic_ct.weights.network_files import load_heads
from stoic_ct.weights.random_weights import random_heads


@pytest.mark.parametrize(("age", "sex"), [(0.25, 0.0), (0.65, 0.5), (0.95, 1.0)])
def test_matches_published_heads(published: types.ModuleType, age: float, sex: float) -> None:
    heads = load_heads(published_heads_path())
    apply = published.ApplySTOICLogisticRegressions()
    rng = np.random.default_rng(int(age * 100))
    for _ in range(5):
        features = {
            "full": rng.normal(0, 0.3, 1024).astype(np.float32),
            "lung": rng.normal(0, 0.3, 1024).astype(np.float32),
        }
        expected = apply({"features": features, "age": age, "sex": sex})["prediction"]
        got = heads(features, age, sex)
        assert got.covid == pytest.approx(float(expected["covid"]), abs=1e-12)
        assert got.severe == pytest.approx(float(expected["severe"]), abs=1e-12)
        assert 0.01 < got.covid < 0.99 and 0.01 < got.severe < 0.99  # not saturated


def test_published_file_shapes() -> None:
    heads = load_heads(published_heads_path())
    assert heads.feature_dim == 1024
    assert heads.coef["lung_severe"].shape == (1026,)
    assert heads.alpha["full_covid"] + heads.alpha["lung_covid"] == pytest.approx(1.0)


def test_severity_uses_age_and_sex_covid_does_not() -> None:
    heads = LogisticHeads(**_split(random_heads(8, seed=1)))
    features = {"full": np.ones(8), "lung": np.zeros(8)}
    young, old = heads(features, 0.25, 0.0), heads(features, 0.95, 1.0)
    assert young.covid == old.covid
    assert young.severe != old.severe


def test_extreme_logits_do_not_overflow() -> None:
    arrays = random_heads(4, seed=2)
    heads = LogisticHeads(**_split(arrays))
    p = heads({"full": np.full(4, 1e6), "lung": np.full(4, -1e6)}, 0.5, 0.5)
    assert 0.0 <= p.covid <= 1.0 and 0.0 <= p.severe <= 1.0


def _split(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    keys = ["full_covid", "full_severe", "lung_covid", "lung_severe"]
    return {
        "coef": {k: arrays[f"coef_{k}"] for k in keys},
        "intercept": {k: float(arrays[f"intercept_{k}"]) for k in keys},
        "alpha": {k: float(arrays[f"alpha_{k}"]) for k in keys},
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("coef_lung_severe"), "lacks coef_lung_severe"),
        (lambda a: a.update(coef_lung_severe=np.zeros(10)), r"coef_lung_severe has shape \(10,\)"),
        (
            lambda a: a.update(intercept_full_covid=np.zeros(3)),
            "intercept_full_covid is not a scalar",
        ),
        (lambda a: a.update(coef_full_covid=np.full(16, np.nan)), "NaN or infinite"),
        (lambda a: a.update(alpha_full_covid=np.array(0.9)), "sum to at most 1"),
    ],
)
def test_malformed_heads(
    tmp_path: Path, change: Callable[[dict[str, np.ndarray]], object], message: str
) -> None:
    arrays = random_heads(16)
    change(arrays)
    np.savez(tmp_path / "balaitous.npz", allow_pickle=False, **arrays)
    with pytest.raises(ModelFileError, match=message) as error:
        load_heads(tmp_path / "balaitous.npz")
    assert "balaitous.npz" in str(error.value) and "the balaitous 1.2 wheel" in str(error.value)


def test_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "balaitous.npz").write_text("hello")
    with pytest.raises(ModelFileError, match="cannot be read as .npz"):
        load_heads(tmp_path / "balaitous.npz")
