"""The four logistic regressions of Balaïtous and their weighting (docs/pipeline.md,
Balaïtous step 12).

COVID: one regression on each encoder's feature; severity: one on each feature with age
and sex appended. Each output is alpha_full * p_full + alpha_lung * p_lung.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stoic_ct.atomic import atomic_write
from stoic_ct.errors import ModelFileError
from stoic_ct.io.cohort import STOIC_TASKS
from stoic_ct.weights.model_files import HEADS, problem

ENCODERS = ("full", "lung")
EXTRA_SEVERE_FEATURES = 2  # age, sex


@dataclass(frozen=True)
class Probabilities:
    """P(COVID-19) and P(severe COVID-19) for one scan."""

    covid: float
    severe: float


@dataclass(frozen=True)
class LogisticHeads:
    """Weights of the four regressions, keyed like balaitous.npz: `{kind}_{encoder}_{task}`.

    Attributes:
        coef: (D,) for covid, (D + 2,) for severe (age, sex last).
        intercept, alpha: scalars.
    """

    coef: dict[str, np.ndarray]
    intercept: dict[str, float]
    alpha: dict[str, float]

    @property
    def feature_dim(self) -> int:
        """Length of the encoder features the heads take."""
        return len(self.coef["full_covid"])

    @classmethod
    def load(cls, path: Path) -> LogisticHeads:
        """Read balaitous.npz; raises ModelFileError when keys or shapes are wrong."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: np.asarray(npz[k], dtype=np.float64) for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise ModelFileError(
                problem(HEADS, f"cannot be read as .npz ({error})"), path
            ) from None
        names = [
            f"{kind}_{enc}_{task}"
            for kind in ("coef", "intercept", "alpha")
            for enc in ENCODERS
            for task in STOIC_TASKS
        ]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise ModelFileError(problem(HEADS, f"lacks {', '.join(missing)}"), path)
        dim = arrays["coef_full_covid"].shape[0] if arrays["coef_full_covid"].ndim == 1 else -1
        for enc in ENCODERS:
            for task, length in (("covid", dim), ("severe", dim + EXTRA_SEVERE_FEATURES)):
                key = f"{enc}_{task}"
                if arrays[f"coef_{key}"].shape != (length,) or dim < 1:
                    raise ModelFileError(
                        problem(
                            HEADS,
                            f"coef_{key} has shape {arrays[f'coef_{key}'].shape}; the covid "
                            "coefficients must be (D,) and the severe ones (D + 2,)",
                        ),
                        path,
                    )
                for kind in ("intercept", "alpha"):
                    if arrays[f"{kind}_{key}"].shape not in ((), (1,)):
                        raise ModelFileError(problem(HEADS, f"{kind}_{key} is not a scalar"), path)
        if not all(np.all(np.isfinite(v)) for v in arrays.values()):
            raise ModelFileError(problem(HEADS, "holds NaN or infinite weights"), path)
        for task in STOIC_TASKS:
            alphas = [float(arrays[f"alpha_{enc}_{task}"].reshape(())) for enc in ENCODERS]
            if min(alphas) < 0 or sum(alphas) > 1 + 1e-9:
                raise ModelFileError(
                    problem(
                        HEADS,
                        f"alpha_*_{task} are {alphas}; they must be >= 0 and sum to at most 1",
                    ),
                    path,
                )
        keys = [f"{enc}_{task}" for enc in ENCODERS for task in STOIC_TASKS]
        return cls(
            coef={k: arrays[f"coef_{k}"] for k in keys},
            intercept={k: float(arrays[f"intercept_{k}"].reshape(())) for k in keys},
            alpha={k: float(arrays[f"alpha_{k}"].reshape(())) for k in keys},
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The published balaitous.npz layout: (D,) / (D + 2,) coefficients, 0-d scalars."""
        out: dict[str, np.ndarray] = {}
        for key, coef in self.coef.items():
            out[f"coef_{key}"] = np.asarray(coef, dtype=np.float64)
            out[f"intercept_{key}"] = np.array(self.intercept[key], dtype=np.float64)
            out[f"alpha_{key}"] = np.array(self.alpha[key], dtype=np.float64)
        return out

    def save(self, path: Path) -> Path:
        """Write balaitous.npz atomically (a temporary file beside it, then a rename)."""
        return atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **self.arrays()))

    def __call__(
        self, features: dict[str, np.ndarray], age_feature: float, sex_feature: float
    ) -> Probabilities:
        """Probabilities from the "full" and "lung" features (D,) and the encoded age and sex."""
        result = {}
        for task in STOIC_TASKS:
            result[task] = 0.0
            for enc in ENCODERS:
                x = np.asarray(features[enc], dtype=np.float64)
                if task == "severe":
                    x = np.concatenate([x, [age_feature, sex_feature]])
                logit = float(x @ self.coef[f"{enc}_{task}"]) + self.intercept[f"{enc}_{task}"]
                result[task] += self.alpha[f"{enc}_{task}"] * _sigmoid(logit)
        return Probabilities(covid=result["covid"], severe=result["severe"])


def _sigmoid(x: float) -> float:
    # Written so that neither branch overflows for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + float(np.exp(-x)))
    e = float(np.exp(x))
    return e / (1.0 + e)
