"""How well the heads do: nested repeated cross-validation on a feature table, or a score
of given predictions against a reference, reported as JSON, Markdown and PNG plots.

The STOIC rule applies throughout: COVID-19 AUC over every labelled patient, severity AUC
over COVID-positive patients only. Confidence intervals are 95 % percentile intervals of
a stratified bootstrap over patients (positives and negatives resampled separately).
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold
from tqdm import tqdm

from stoic_ct.atomic import atomic_write_text
from stoic_ct.errors import InputError
from stoic_ct.head_training.defaults import OUTER_FOLDS, REPEATS
from stoic_ct.head_training.features import FeatureTable, labelled
from stoic_ct.head_training.training import FitSettings, fit_task, fold_count
from stoic_ct.io.cohort import STOIC_TASKS, read_reference, task_rows
from stoic_ct.io.imageio import image_stem
from stoic_ct.plots import Panel, Series, line_panels

logger = logging.getLogger(__name__)

TASK_TITLES = {"covid": "COVID-19", "severe": "severe COVID-19 (COVID-positive patients)"}
HEAD_LABELS = {
    "full": "full-image encoder",
    "lung": "lung encoder",
    "combined": "weighted average",
    "given": "predictions",
    "balaitous": "Balaïtous",
    "convnext3d": "fine-tuned 3D ConvNeXt",
    "ensemble": "ensemble (nested)",
}
# The prediction whose calibration a report shows: the heads' combination, the ensemble,
# or the given predictions.
MAIN_PREDICTIONS = ("combined", "ensemble", "given")


@dataclass(frozen=True)
class Score:
    """ROC-AUC with its 95 % bootstrap interval, on `patients` of which `positives` positive."""

    auc: float
    low: float
    high: float
    patients: int
    positives: int
    per_repeat: tuple[float, ...] = ()


def auc_with_interval(
    y: np.ndarray, p: np.ndarray, *, resamples: int = 2000, seed: int = 0
) -> Score:
    """ROC-AUC of probabilities `p` for (N,) 0/1 labels `y`, with a stratified bootstrap CI.

    `p` is (N,), or (R, N) for R repetitions of a cross-validation: the AUC is then the
    mean of the R AUCs, and each bootstrap resample draws the same patients for all R.
    A resample draws the positives and the negatives with replacement, separately; its
    AUC is the Mann-Whitney U statistic over n_pos x n_neg (ties count one half).
    """
    y = np.asarray(y, dtype=int)
    runs = np.atleast_2d(p)
    per_repeat = tuple(float(roc_auc_score(y, run)) for run in runs)
    rng = np.random.default_rng(seed)
    positive, negative = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    aucs = []
    for start in range(0, resamples, 250):  # in chunks, to bound memory on large cohorts
        count = min(250, resamples - start)
        drawn_pos = positive[rng.integers(0, len(positive), (count, len(positive)))]
        drawn_neg = negative[rng.integers(0, len(negative), (count, len(negative)))]
        u = [
            mannwhitneyu(run[drawn_pos], run[drawn_neg], axis=1, method="asymptotic").statistic
            for run in runs
        ]
        aucs.append(np.mean(u, axis=0) / (len(positive) * len(negative)))
    low, high = np.percentile(np.concatenate(aucs), [2.5, 97.5])
    auc = float(np.mean(per_repeat))
    return Score(auc, float(low), float(high), len(y), len(positive), per_repeat)


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Observed positive fraction per bin of predicted probability (equal-width bins)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            out.append(
                {
                    "predicted": float(p[in_bin].mean()),
                    "observed": float(y[in_bin].mean()),
                    "patients": int(in_bin.sum()),
                }
            )
    return out


@dataclass(frozen=True)
class TaskResult:
    """Out-of-fold (or given) probabilities of each head for one task's patients.

    Attributes:
        y: (N,) labels.
        predictions: head -> (R, N) probabilities, one row per repetition of the
            cross-validation (R = 1 for given predictions).
    """

    task: str
    patient_id: np.ndarray
    y: np.ndarray
    predictions: dict[str, np.ndarray]

    def mean_prediction(self, head: str) -> np.ndarray:
        """(N,) probabilities of `head`, averaged over the repetitions."""
        mean: np.ndarray = self.predictions[head].mean(axis=0)
        return mean


def cross_validate(
    table: FeatureTable,
    settings: FitSettings,
    folds: int = OUTER_FOLDS,
    repeats: int = REPEATS,
    progress: bool = True,
) -> dict[str, TaskResult]:
    """Nested cross-validation: out-of-fold predictions of the whole fitting procedure.

    For each of `repeats` stratified `folds`-fold splits (seeds settings.seed + r), the
    heads are fitted on the training folds exactly as `fit-heads` fits them (C and
    alpha chosen by the inner cross-validation there) and predict the held-out fold.
    """
    results = {}
    for task in STOIC_TASKS:
        data = table.take(labelled(table, task))
        y = (data.covid if task == "covid" else data.severe).astype(int)
        outer = fold_count(task, len(y), int(y.sum()), folds)
        oof = {h: np.zeros((repeats, len(y))) for h in ("full", "lung", "combined")}
        bar = tqdm(
            total=repeats * outer,
            desc=f"{task} cross-validation",
            unit="fit",
            disable=None if progress else True,
            file=sys.stderr,
        )
        for r in range(repeats):
            splitter = StratifiedKFold(outer, shuffle=True, random_state=settings.seed + r)
            for train, test in splitter.split(y, y):
                inner = replace(settings, seed=settings.seed + r)
                fit = fit_task(data.take(train), task, inner, quiet=True)
                for head, p in fit.predict(data.take(test)).items():
                    oof[head][r, test] = p
                bar.update()
        bar.close()
        results[task] = TaskResult(task, data.patient_id, y, oof)
    return results


def nested_auc(results: dict[str, TaskResult], head: str = "combined") -> dict[str, float]:
    """Each task's ROC-AUC of `head`'s out-of-fold probabilities, the mean over repetitions
    (as `report` gives it, without its intervals)."""
    return {
        task: float(np.mean([roc_auc_score(result.y, run) for run in result.predictions[head]]))
        for task, result in results.items()
    }


def write_oof(results: dict[str, TaskResult], path: Path) -> Path:
    """PatientID,probCOVID,probSevere: each patient's out-of-fold probability of the heads'
    weighted average (mean over repetitions), blank for a task the patient is not scored
    on; what `fit-ensemble` takes as Balaïtous's predictions."""
    values: dict[str, dict[str, float]] = {}
    for task, result in results.items():
        for patient, p in zip(result.patient_id, result.mean_prediction("combined"), strict=True):
            values.setdefault(str(patient), {})[task] = float(p)
    lines = ["PatientID,probCOVID,probSevere"]
    for patient in sorted(values):
        cells = [f"{values[patient][t]:.6f}" if t in values[patient] else "" for t in STOIC_TASKS]
        lines.append(",".join([patient, *cells]))
    text = "\n".join(lines) + "\n"
    return atomic_write_text(path, text)


def protocol(settings: FitSettings, folds: int, repeats: int) -> dict[str, Any]:
    """How `cross_validate` estimated the scores, for the report."""
    return {
        "outer": f"{repeats} x stratified {folds}-fold",
        "inner": f"stratified {settings.inner_folds}-fold, choosing C and alpha",
        "seed": settings.seed,
        "AUC": "the mean over repetitions of the out-of-fold AUC",
        "confidence intervals": "95 % stratified bootstrap over patients (the same "
        "patients drawn for every repetition)",
        "curves": "out-of-fold probabilities averaged over repetitions",
    }


def read_predictions(path: Path) -> dict[str, tuple[float, float]]:
    """PatientID -> (P(COVID-19), P(severe)) from a CSV.

    Accepted: STOIC's columns `PatientID,probCOVID,probSevere`, or what `predict --csv`
    writes (`image,probability_covid_19,probability_severe_covid_19`; the ID is the file
    name without its suffixes). Rows without probabilities (failed scans) are skipped.

    Raises:
        InputError: when the columns are neither, or a probability is not in [0, 1].
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            stoic = {"PatientID", "probCOVID", "probSevere"} <= set(columns)
            ours = {"image", "probability_covid_19", "probability_severe_covid_19"} <= set(columns)
            if not (stoic or ours):
                raise InputError(
                    f"has the columns {columns}; expected PatientID,probCOVID,probSevere or "
                    "the columns that predict --csv writes",
                    path,
                )
            covid, severe = (
                ("probCOVID", "probSevere")
                if stoic
                else ("probability_covid_19", "probability_severe_covid_19")
            )
            out = {}
            for line, row in enumerate(reader, start=2):
                if not (row[covid] or "").strip():
                    continue
                try:
                    values = float(row[covid]), float(row[severe])
                except ValueError:
                    raise InputError(f"line {line}: a probability is not a number", path) from None
                if not all(0.0 <= v <= 1.0 for v in values):
                    raise InputError(f"line {line}: {values} are not probabilities", path)
                patient = row["PatientID"].strip() if stoic else image_stem(Path(row["image"]))
                out[patient] = values
    except OSError as error:
        raise InputError(f"cannot be read ({error.strerror or error})", path) from None
    return out


def score_predictions(predictions: Path, reference: Path) -> dict[str, TaskResult]:
    """Given predictions against a reference.csv, by the STOIC rule.

    Raises:
        InputError: when no patient of the reference has a prediction, or a task lacks
            one of its classes.
    """
    given = read_predictions(predictions)
    labels = read_reference(reference)
    missing = sorted(set(labels) - set(given))
    if missing:
        logger.warning(
            "%d of %d patients of %s have no prediction and are left out: %s%s",
            len(missing),
            len(labels),
            reference,
            ", ".join(missing[:5]),
            ", ..." if len(missing) > 5 else "",
        )
    ids = np.array(sorted(set(labels) & set(given)), dtype=str)
    if len(ids) == 0:
        raise InputError(f"no patient of {reference} has a prediction", predictions)
    covid = np.array([labels[i][0] for i in ids])
    severe = np.array([labels[i][1] for i in ids])
    results = {}
    for task, rows, y, column in (
        ("covid", task_rows(covid, severe, "covid"), covid, 0),
        ("severe", task_rows(covid, severe, "severe"), severe, 1),
    ):
        p = np.array([given[i][column] for i in ids[rows]])
        positives = int(y[rows].sum())
        if positives in (0, rows.sum()):
            raise InputError(
                f"the {task} task has {positives} positive and {rows.sum() - positives} "
                "negative patients with predictions; an AUC needs both",
                reference,
            )
        results[task] = TaskResult(task, ids[rows], y[rows].astype(int), {"given": p[None]})
    return results


def report(
    results: dict[str, TaskResult], about: dict[str, Any], out_dir: Path, seed: int = 0
) -> dict[str, Any]:
    """Write report.json, report.md, roc.png and calibration.png to `out_dir`; return the JSON."""
    tasks: dict[str, Any] = {}
    for task, result in results.items():
        heads = {}
        for head, runs in result.predictions.items():
            score = auc_with_interval(result.y, runs, seed=seed)
            repeats = list(score.per_repeat)
            heads[head] = {
                "auc": score.auc,
                "ci95": [score.low, score.high],
                "auc_per_repeat": repeats,
                "auc_sd_over_repeats": float(np.std(repeats)) if len(repeats) > 1 else None,
            }
        main = _main_prediction(result)
        tasks[task] = {
            "patients": len(result.y),
            "positives": int(result.y.sum()),
            "heads": heads,
            "calibration": calibration(result.y, result.mean_prediction(main)),
        }
    document = about | {"tasks": tasks}
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=1) + "\n"
    atomic_write_text(out_dir / "report.json", text)
    markdown = _markdown(document)
    atomic_write_text(out_dir / "report.md", markdown)
    _plots(results, out_dir)
    return document


def _main_prediction(result: TaskResult) -> str:
    return next(name for name in MAIN_PREDICTIONS if name in result.predictions)


def _markdown(document: dict[str, Any]) -> str:
    lines = [f"# {document.get('title', 'Evaluation')}", ""]
    lines += [f"- {k}: {v}" for k, v in document.get("protocol", {}).items()]
    lines.append("")
    for task, entry in document["tasks"].items():
        lines += [
            f"## {TASK_TITLES[task]}: {entry['patients']} patients, {entry['positives']} positive",
            "",
            "| prediction | ROC-AUC | 95 % CI | SD over repeats |",
            "|---|---:|---:|---:|",
        ]
        for head, score in entry["heads"].items():
            sd = score["auc_sd_over_repeats"]
            lines.append(
                f"| {HEAD_LABELS[head]} | {score['auc']:.3f} | "
                f"{score['ci95'][0]:.3f} - {score['ci95'][1]:.3f} | "
                f"{'-' if sd is None else f'{sd:.3f}'} |"
            )
        lines.append("")
    lines += ["![ROC curves](roc.png)", "", "![calibration](calibration.png)", ""]
    return "\n".join(lines)


def _plots(results: dict[str, TaskResult], out_dir: Path) -> None:
    roc, calibrated = [], []
    for task, result in results.items():
        curves = []
        for head in result.predictions:
            fpr, tpr, _ = roc_curve(result.y, result.mean_prediction(head))
            curves.append(Series(HEAD_LABELS[head], fpr, tpr))
        roc.append(Panel(TASK_TITLES[task], "false positive rate", "true positive rate", curves))
        main = _main_prediction(result)
        bins = calibration(result.y, result.mean_prediction(main))
        calibrated.append(
            Panel(
                TASK_TITLES[task],
                "predicted probability",
                "observed fraction",
                [
                    Series(
                        HEAD_LABELS[main],
                        np.array([b["predicted"] for b in bins]),
                        np.array([b["observed"] for b in bins]),
                        points=True,
                    )
                ],
            )
        )
    line_panels(roc, out_dir / "roc.png")
    line_panels(calibrated, out_dir / "calibration.png")
