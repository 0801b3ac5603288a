"""What every system gives for one scan, and what makes a system.

`Prediction` is both probabilities with the wall time per stage; the Balaïtous pipeline
returns a `BalaitousPrediction`, which adds what led to them (features, slices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from stoic_ct.io.contract import Probabilities
from stoic_ct.io.demographics import Demographics
from stoic_ct.io.volume import Volume


@dataclass(frozen=True)
class Prediction:
    """P(COVID-19) and P(severe COVID-19) for one scan, and the wall time per stage (s)."""

    probabilities: Probabilities
    seconds: dict[str, float]


class System(Protocol):
    """A model that predicts both outputs for one CT (`process.py --system`).

    `lung_labels` is a lung label image of any geometry to use instead of the system's lung
    segmenter, for the systems that segment the lungs.
    """

    def predict(
        self, volume: Volume, demographics: Demographics, lung_labels: Volume | None = None
    ) -> Prediction: ...
