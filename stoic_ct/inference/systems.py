"""The three systems a model folder can hold: balaitous, convnext3d, ensemble.

Each takes a CT volume and the patient's demographics and gives P(COVID-19) and
P(severe COVID-19) with per-stage times. `convnext3d` is the fine-tuned 3D ConvNeXt
(one fold ensemble per task); `ensemble` averages the two systems' probabilities with
the weights of the model folder's ensemble.json. `load_model_folder` is the one way the
entry points load a system: the one the folder's system.json names, unless overridden.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from stoic_ct.device_memory import GB, free_memory
from stoic_ct.errors import ModelFileError, StoicError
from stoic_ct.inference.fold_ensemble import FoldEnsemble
from stoic_ct.inference.gpu_memory import (
    check_fits,
    fit_batches,
    modelled_peak,
    set_batches,
    workload_of,
)
from stoic_ct.inference.pipeline import Balaitous, BalaitousPrediction, LungMasks
from stoic_ct.inference.precision import EXACT_ON_CPU, ModelSettings
from stoic_ct.inference.prediction import Prediction, System
from stoic_ct.io.contract import Probabilities
from stoic_ct.io.demographics import Demographics
from stoic_ct.io.volume import Volume
from stoic_ct.weights.model_files import (
    CONVNEXT_COVID,
    CONVNEXT_SEVERE,
    ENSEMBLE_MEMBERS,
    ENSEMBLE_WEIGHTS,
    SYSTEMS,
    ModelFiles,
    problem,
)
from stoic_ct.weights.system_record import FolderChoice, choose

logger = logging.getLogger(__name__)


class ConvNeXtSystem:
    """The fine-tuned ConvNeXt: P(COVID-19) and P(severe) from two fold ensembles."""

    def __init__(self, covid: FoldEnsemble, severe: FoldEnsemble) -> None:
        for ensemble, task in ((covid, "covid"), (severe, "severe")):
            if ensemble.task != task or len(ensemble.classes) != 2:
                raise StoicError(
                    f"the {task} ensemble was fine-tuned for {ensemble.task!r} with "
                    f"{len(ensemble.classes)} classes; it must be the binary {task} task"
                )
        self.covid, self.severe = covid, severe

    @classmethod
    def from_model_dir(
        cls, model_dir: Path, settings: ModelSettings = EXACT_ON_CPU
    ) -> ConvNeXtSystem:
        """convnext3d_covid.pth and convnext3d_severe.pth from `model_dir` (settings.encoder
        and batch_size do not apply)."""
        files = ModelFiles(model_dir)
        device, precision = settings.device, settings.precision
        return cls(
            FoldEnsemble.load(files.path(CONVNEXT_COVID), CONVNEXT_COVID, device, precision),
            FoldEnsemble.load(files.path(CONVNEXT_SEVERE), CONVNEXT_SEVERE, device, precision),
        )

    def predict(
        self, volume: Volume, demographics: Demographics, lung_labels: Volume | None = None
    ) -> Prediction:
        """Both probabilities; age and sex go to the networks that take them (metadata).

        Raises:
            StoicError: when given a lung mask: the ConvNeXt sees the whole volume.
        """
        if lung_labels is not None:
            raise StoicError("the convnext3d system takes no lung mask: it sees the whole scan")
        started = time.perf_counter()
        cube = self.covid.cube(volume)
        same_input = (self.severe.input_size, self.severe.window) == (
            self.covid.input_size,
            self.covid.window,
        )
        severe_cube = cube if same_input else self.severe.cube(volume)
        prepared = time.perf_counter()
        covid = float(self.covid.probabilities(cube, demographics)[1])
        severe = float(self.severe.probabilities(severe_cube, demographics)[1])
        return Prediction(
            Probabilities(covid=covid, severe=severe),
            {"cube": prepared - started, "convnext3d": time.perf_counter() - prepared},
        )


def read_ensemble_weights(path: Path) -> dict[str, dict[str, float]]:
    """{"covid": {"balaitous": w, "convnext3d": w}, "severe": {...}}, each task's summing to 1.

    Weights must be >= 0 with a positive sum; they are divided by their sum.

    Raises:
        ModelFileError: naming the file and what is wrong with it.
    """

    def bad(what: str) -> ModelFileError:
        return ModelFileError(problem(ENSEMBLE_WEIGHTS, what), path)

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise bad("is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"cannot be read as JSON ({error})") from None
    weights: dict[str, dict[str, float]] = {}
    for task in ("covid", "severe"):
        given = document.get(task) if isinstance(document, dict) else None
        if not isinstance(given, dict) or set(given) != set(ENSEMBLE_MEMBERS):
            raise bad(f"needs {task!r}: {{{', '.join(repr(m) + ': w' for m in ENSEMBLE_MEMBERS)}}}")
        values = {m: given[m] for m in ENSEMBLE_MEMBERS}
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values.values()):
            raise bad(f"the {task} weights must be numbers, not {values}")
        total = sum(values.values())
        if min(values.values()) < 0 or total <= 0:
            raise bad(f"the {task} weights must be >= 0 with a positive sum, not {values}")
        weights[task] = {m: float(v) / total for m, v in values.items()}
    return weights


@dataclass(frozen=True)
class EnsemblePrediction(Prediction):
    """The ensemble's Prediction, with each member's (by name)."""

    members: dict[str, Prediction]


class EnsembleSystem:
    """Balaitous and the fine-tuned ConvNeXt, their probabilities averaged with weights."""

    def __init__(self, members: dict[str, System], weights: dict[str, dict[str, float]]) -> None:
        self.members, self.weights = members, weights

    def predict(
        self, volume: Volume, demographics: Demographics, lung_labels: Volume | None = None
    ) -> EnsemblePrediction:
        """The weighted average; a given lung mask goes to Balaitous."""
        outcomes = {
            name: m.predict(volume, demographics, lung_labels if name == "balaitous" else None)
            for name, m in self.members.items()
        }
        return self.combine(outcomes)

    def combine(self, outcomes: dict[str, Prediction]) -> EnsemblePrediction:
        """The weighted average of the members' predictions (by member name)."""
        covid = sum(self.weights["covid"][n] * o.probabilities.covid for n, o in outcomes.items())
        severe = sum(
            self.weights["severe"][n] * o.probabilities.severe for n, o in outcomes.items()
        )
        seconds = {f"{n}: {k}": v for n, o in outcomes.items() for k, v in o.seconds.items()}
        return EnsemblePrediction(Probabilities(covid=covid, severe=severe), seconds, outcomes)


def members_of(system: System) -> dict[str, System]:
    """The systems that predict within `system`: an ensemble's members by name, else the
    system itself (named "")."""
    return dict(system.members) if isinstance(system, EnsembleSystem) else {"": system}


def balaitous_of(system: System) -> Balaitous | None:
    """The Balaitous within `system` (the system itself or an ensemble's member), if any."""
    return next((m for m in members_of(system).values() if isinstance(m, Balaitous)), None)


def balaitous_part(prediction: Prediction) -> BalaitousPrediction | None:
    """What Balaitous saw and gave, in a prediction of Balaitous or of the ensemble."""
    if isinstance(prediction, EnsemblePrediction):
        prediction = prediction.members.get("balaitous", prediction)
    return prediction if isinstance(prediction, BalaitousPrediction) else None


def fit_to_gpu(system: System, settings: ModelSettings, budget: int | None = None) -> None:
    """On a GPU, set the batch sizes of a loaded system to the largest the memory model
    says fit `budget` bytes (default: what this process has left, with the loaded weights
    counted back in); a batch size the user gave is checked instead. Nothing on a CPU.

    Raises:
        StoicError: when even the smallest batches, or the user's, do not fit.
    """
    device = settings.device
    if device.type != "cuda":
        return
    balaitous = balaitous_of(system)
    ensembles = [
        e
        for m in members_of(system).values()
        if isinstance(m, ConvNeXtSystem)
        for e in (m.covid, m.severe)
    ]
    workload = workload_of(balaitous, ensembles, settings.precision)
    if budget is None:
        budget = free_memory(device) + torch.cuda.memory_allocated(device)
    if settings.batch_size is not None:
        needed = check_fits(workload, budget)
    else:
        workload = fit_batches(workload, budget)
        needed = modelled_peak(workload)
        if balaitous is not None:
            set_batches(balaitous, workload)
    logger.info(
        "GPU memory: %s; %s; this process may use %.1f GB",
        workload.describe(),
        needed.summary(),
        budget / GB,
    )


def load_system(
    kind: str,
    model_dir: Path,
    settings: ModelSettings = EXACT_ON_CPU,
    *,
    lung_masks: LungMasks = "r231",
) -> System:
    """The system `kind` (SYSTEMS) with its files from `model_dir`, whatever the folder's
    record says (load_model_folder reads it).

    Args:
        lung_masks: Balaitous's lung segmenter ("r231", "given" or a segmenter).

    Raises:
        ModelFileError: when a file it needs is missing or malformed.
    """
    if kind not in SYSTEMS:
        raise StoicError(f"system must be one of {', '.join(SYSTEMS)}, not {kind!r}")
    system: System
    if kind == "balaitous":
        system = Balaitous.from_model_dir(model_dir, settings, lung_masks=lung_masks)
    elif kind == "convnext3d":
        system = ConvNeXtSystem.from_model_dir(model_dir, settings)
    else:
        weights = read_ensemble_weights(model_dir / ENSEMBLE_WEIGHTS.name)
        logger.info("ensemble weights: covid %s; severe %s", weights["covid"], weights["severe"])
        members: dict[str, System] = {
            "balaitous": Balaitous.from_model_dir(model_dir, settings, lung_masks=lung_masks),
            "convnext3d": ConvNeXtSystem.from_model_dir(model_dir, settings),
        }
        system = EnsembleSystem(members, weights)
    fit_to_gpu(system, settings)
    return system


def load_model_folder(
    model_dir: Path,
    settings: ModelSettings = EXACT_ON_CPU,
    *,
    system: str | None = None,
    lung_masks: LungMasks = "r231",
) -> tuple[System, FolderChoice]:
    """The system `model_dir` holds (its system.json's; the published Balaitous without
    one), or `system` and `settings.encoder` where given instead, loaded once.

    Returns:
        the loaded system, and what was chosen (logged, with the record's origin).

    Raises:
        ModelFileError: when system.json is malformed or names a file the folder lacks, or
            a file the system needs is missing or malformed.
    """
    choice = choose(model_dir, system, settings.encoder)
    logger.info("model folder %s: %s", model_dir, choice.describe(model_dir))
    loaded = load_system(
        choice.system, model_dir, replace(settings, encoder=choice.encoder), lung_masks=lung_masks
    )
    return loaded, choice
