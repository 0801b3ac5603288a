"""Age and sex parsing, fallbacks and encodings, against the published ParseAgeSex."""

from __future__ import annotations

import types

import pytest
import SimpleITK as sitk

from stoic_ct.io.demographics import Demographics, parse_age, parse_sex, resolve_demographics


@pytest.mark.parametrize(
    ("raw", "years"),
    [
        ("065Y", 65.0),
        ("85", 85.0),
        (" 45Y ", 45.0),
        (72, 72.0),
        (35.5, 35.5),
        ("018M", 1.5),
        ("104W", 104 * 7 / 365.25),
        ("003D", 3 / 365.25),
    ],
)
def test_parse_age(raw: object, years: float) -> None:
    assert parse_age(raw) == pytest.approx(years)


@pytest.mark.parametrize(
    "raw", ["", "old", "65 years", "-5", "NaN", "inf", "200", True, None, [65]]
)
def test_parse_age_refuses(raw: object) -> None:
    with pytest.raises(ValueError, match="age"):
        parse_age(raw)


@pytest.mark.parametrize("raw", ["000Y", "0y", "0", 0, 0.0])
def test_an_age_of_zero_is_a_placeholder(raw: object) -> None:
    with pytest.raises(ValueError, match="is 0, the placeholder of anonymised scans"):
        parse_age(raw)


def test_a_placeholder_age_gives_the_default_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    result = resolve_demographics([("header PatientAge", "000Y")], [("header PatientSex", "F")])
    assert (result.age_years, result.age_source) == (65.0, "default")
    assert "header PatientAge: age '000Y' is 0, the placeholder" in caplog.text


@pytest.mark.parametrize(
    ("raw", "sex"),
    [("M", "M"), ("f", "F"), (" Female ", "F"), ("O", None), ("", None), ("male", "M")],
)
def test_parse_sex(raw: str, sex: str | None) -> None:
    assert parse_sex(raw) == sex


@pytest.mark.parametrize("raw", ["X", "yes", 1, None])
def test_parse_sex_refuses(raw: object) -> None:
    with pytest.raises(ValueError, match="sex"):
        parse_sex(raw)


@pytest.mark.parametrize(
    ("header", "age", "sex"),
    [
        ({"PatientAge": "065Y", "PatientSex": "M"}, 0.65, 1.0),
        ({"PatientAge": "015Y", "PatientSex": "F"}, 0.25, 0.0),
        ({"PatientAge": "099Y", "PatientSex": "O"}, 0.95, 0.5),
        ({}, 0.65, 0.5),
    ],
)
def test_header_encoding_matches_published(
    published: types.ModuleType, header: dict[str, str], age: float, sex: float
) -> None:
    image = sitk.Image(2, 2, 2, sitk.sitkInt16)
    for key, value in header.items():
        image.SetMetaData(key, value)
    expected = published.ParseAgeSex()({"image": image})
    ours = resolve_demographics(
        [("header", header.get("PatientAge"))], [("header", header.get("PatientSex"))]
    )
    assert ours.age_feature == pytest.approx(float(expected["age"])) == pytest.approx(age)
    assert ours.sex_feature == expected["sex"] == sex


def test_first_valid_source_wins_and_bad_ones_warn(caplog: pytest.LogCaptureFixture) -> None:
    result = resolve_demographics(
        ages=[("patient-age.json", "sixty"), ("header", "070Y")],
        sexes=[("patient-sex.json", None), ("header", "Q")],
    )
    assert result == Demographics(70.0, None, "header", "default")
    assert "patient-age.json: age 'sixty'" in caplog.text
    assert "header: sex 'Q' is not 'M' or 'F'" in caplog.text


def test_defaults() -> None:
    result = resolve_demographics([], [])
    assert (result.age_years, result.age_feature, result.sex_feature) == (65.0, 0.65, 0.5)
