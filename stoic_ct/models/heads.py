"""The four logistic regressions of Balaïtous and their weighting (docs/explanation/pipeline.md,
Balaïtous step 12).

COVID: one regression on each encoder's feature; severity: one on each feature with age
and sex appended. Each output is alpha_full * p_full + alpha_lung * p_lung.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stoic_ct.io.cohort import STOIC_TASKS
from stoic_ct.io.contract import Probabilities

ENCODERS = ("full", "lung")
EXTRA_SEVERE_FEATURES = 2  # age, sex


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

    def arrays(self) -> dict[str, np.ndarray]:
        """The published balaitous.npz layout: (D,) / (D + 2,) coefficients, 0-d scalars."""
        out: dict[str, np.ndarray] = {}
        for key, coef in self.coef.items():
            out[f"coef_{key}"] = np.asarray(coef, dtype=np.float64)
            out[f"intercept_{key}"] = np.array(self.intercept[key], dtype=np.float64)
            out[f"alpha_{key}"] = np.array(self.alpha[key], dtype=np.float64)
        return out

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
