"""Patient age and sex: parsing from headers, JSON files and flags, and the model's encoding.

The severity heads take age / 100 clipped to [0.25, 0.95] (default 65 years) and sex as
M -> 1, F -> 0, unknown -> 0.5 (docs/explanation/pipeline.md, Balaïtous step 1). A value
that cannot be parsed is reported and the next source is used: flag, then JSON file, then
header, then the default.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

Sex = Literal["M", "F"]
T = TypeVar("T")

DEFAULT_AGE_YEARS = 65.0
AGE_FEATURE_RANGE = (0.25, 0.95)
SEX_FEATURE = {"M": 1.0, "F": 0.0, None: 0.5}
MAX_PLAUSIBLE_AGE_YEARS = 130.0

# DICOM age strings (AS): nnnD, nnnW, nnnM or nnnY. STOIC writes e.g. "065Y".
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}
_AGE_PATTERN = re.compile(r"^(\d+(?:\.\d*)?)\s*([DWMY]?)$", re.IGNORECASE)
_SEX_WORDS: dict[str, Sex | None] = {
    "M": "M",
    "MALE": "M",
    "F": "F",
    "FEMALE": "F",
    # DICOM "O" (other) and empty or unknown values: the model's "unknown", no warning.
    "O": None,
    "OTHER": None,
    "U": None,
    "UNKNOWN": None,
    "": None,
}


@dataclass(frozen=True)
class Demographics:
    """Age and sex as the model uses them, with where each came from.

    Attributes:
        age_years: age in years (the default when no source had a valid one).
        sex: "M", "F" or None for unknown.
        age_source, sex_source: a short description, e.g. "header PatientAge".
    """

    age_years: float = DEFAULT_AGE_YEARS
    sex: Sex | None = None
    age_source: str = "default"
    sex_source: str = "default"

    def describe(self) -> str:
        """One line for logs: "age 65 (header PatientAge), sex M (header PatientSex)"."""
        return (
            f"age {self.age_years:g} ({self.age_source}), "
            f"sex {self.sex or 'unknown'} ({self.sex_source})"
        )

    @property
    def age_feature(self) -> float:
        """Age / 100, clipped to [0.25, 0.95], as the severity heads take it."""
        return float(np.clip(self.age_years / 100.0, *AGE_FEATURE_RANGE))

    @property
    def sex_feature(self) -> float:
        """1 for male, 0 for female, 0.5 when unknown."""
        return SEX_FEATURE[self.sex]

    @property
    def features(self) -> tuple[float, float]:
        """(age_feature, sex_feature): what a network with metadata takes beside the image."""
        return self.age_feature, self.sex_feature


def parse_age(value: object) -> float:
    """Age in years from a number or a string such as "065Y", "65", "18M".

    Raises:
        ValueError: when the value is not a finite age in (0, 130] years. An age of 0
            ("000Y") is the placeholder anonymisation tools write, not an age.
    """
    if isinstance(value, bool):
        raise ValueError(f"age must be a number of years, not {value!r}")
    if isinstance(value, int | float):
        years = float(value)
    elif isinstance(value, str):
        match = _AGE_PATTERN.match(value.strip())
        if match is None:
            raise ValueError(f"age {value!r} is neither a number nor a DICOM age such as '065Y'")
        years = float(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()]
    else:
        raise ValueError(f"age must be a number of years, not {type(value).__name__} {value!r}")
    if not math.isfinite(years) or not 0 <= years <= MAX_PLAUSIBLE_AGE_YEARS:
        raise ValueError(f"age {value!r} is not an age in years between 0 and 130")
    if years == 0:
        raise ValueError(f"age {value!r} is 0, the placeholder of anonymised scans, not an age")
    return years


def parse_sex(value: object) -> Sex | None:
    """ "M" or "F" from "M", "F", "male", "female" (any case); None for other or unknown.

    Raises:
        ValueError: when the value is not one of those words.
    """
    if not isinstance(value, str):
        raise ValueError(f"sex must be 'M' or 'F', not {type(value).__name__} {value!r}")
    word = value.strip().upper()
    if word not in _SEX_WORDS:
        raise ValueError(f"sex {value!r} is not 'M' or 'F'")
    return _SEX_WORDS[word]


def resolve_demographics(
    ages: Iterable[tuple[str, object]], sexes: Iterable[tuple[str, object]]
) -> Demographics:
    """Take age and sex from the first source that has a valid value.

    Args:
        ages, sexes: (source description, raw value) pairs, most trusted first; a value
            of None means the source does not have it. Invalid values are logged as
            warnings and skipped.
    """
    age, age_source = _first_valid(ages, parse_age, "age", DEFAULT_AGE_YEARS)
    sex, sex_source = _first_valid(sexes, parse_sex, "sex", None)
    return Demographics(age, sex, age_source, sex_source)


def header_demographics(header: Mapping[str, str]) -> Demographics:
    """Age and sex from an image header's PatientAge and PatientSex (defaults otherwise)."""
    return resolve_demographics(
        [("header PatientAge", header.get("PatientAge"))],
        [("header PatientSex", header.get("PatientSex"))],
    )


def _first_valid(
    sources: Iterable[tuple[str, object]], parse: Callable[[object], T], what: str, default: T
) -> tuple[T, str]:
    """The first value `parse` accepts, with its source; else `default` and "default"."""
    for source, raw in sources:
        if raw is None:
            continue
        try:
            return parse(raw), source
        except ValueError as error:
            logger.warning("%s: %s; using the next source of the %s", source, error, what)
    return default, "default"
