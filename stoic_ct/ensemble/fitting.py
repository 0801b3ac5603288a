"""Fitting the ensemble's weights on out-of-fold predictions of Balaïtous and the ConvNeXt.

For each task the ensemble is P = w * P_balaitous + (1 - w) * P_convnext3d, with w on a
grid of WEIGHT_STEPS + 1 values in [0, 1], chosen to maximise the ROC-AUC (ties: the w
nearest 0.5). Its AUC is estimated by nested cross-validation: in each of `repeats`
stratified `folds`-fold splits, w is chosen on the training folds and applied to the held
out fold; the reported AUC is the mean over repeats of the pooled out-of-fold AUC, with a
95 % stratified bootstrap interval (stoic_ct.head_training.evaluation). The weights
written to ensemble.json are chosen on all patients.

Inputs are tables of out-of-fold probabilities, one or more per system:

    PatientID,probCOVID,probSevere            (what `evaluate FEATURES` writes as oof.csv;
                                               a blank cell: no prediction for that task)
    PatientID,label,fold,p_negative,p_positive       (`finetune --task covid`'s oof.csv)
    PatientID,label,fold,p_not_severe,p_severe       (`finetune --task severe`'s oof.csv)

Labels come from the cohort's reference.csv, by the STOIC rule (severity among
COVID-positive patients only).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from stoic_ct.atomic import atomic_write_text
from stoic_ct.ensemble.defaults import FOLDS, REPEATS
from stoic_ct.errors import InputError, ModelFileError
from stoic_ct.head_training.evaluation import TaskResult, report
from stoic_ct.inference.systems import read_ensemble_weights
from stoic_ct.io.cohort import STOIC_TASKS, read_reference, task_rows
from stoic_ct.weights.model_files import (
    ENSEMBLE_MEMBERS,
    ENSEMBLE_WEIGHTS,
    read_manifest,
    sha256_of,
    system_files,
    update_manifest,
)
from stoic_ct.weights.system_record import SystemRecord, choose, origin, write_system_record

logger = logging.getLogger(__name__)

WEIGHT_STEPS = 20  # w in 0, 0.05, ..., 1
# The probability columns of each accepted table, per task.
COLUMNS = {
    "covid": ("probCOVID", "p_positive"),
    "severe": ("probSevere", "p_severe"),
}

Predictions = dict[str, dict[str, float]]  # task -> PatientID -> probability


def read_oof_predictions(paths: Sequence[Path]) -> Predictions:
    """task -> PatientID -> out-of-fold probability, from the tables of one system.

    Raises:
        InputError: naming the file, when it has none of the accepted columns, a value is
            not a probability, or two tables give the same patient's task.
    """
    merged: Predictions = {task: {} for task in STOIC_TASKS}
    for path in paths:
        for task, values in _read_table(path).items():
            twice = sorted(set(values) & set(merged[task]))
            if twice:
                raise InputError(
                    f"gives {task} predictions of patients an earlier table gives too: "
                    + ", ".join(twice[:5]),
                    path,
                )
            merged[task].update(values)
    return merged


def _read_table(path: Path) -> Predictions:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or [])
            found = {
                task: column
                for task, names in COLUMNS.items()
                for column in names
                if column in columns
            }
            if "PatientID" not in columns or not found:
                raise InputError(
                    f"has the columns {sorted(columns)}; expected PatientID with probCOVID "
                    "and probSevere (evaluate's oof.csv) or p_positive or p_severe "
                    "(finetune's oof.csv)",
                    path,
                )
            rows = list(enumerate(reader, start=2))
    except OSError as error:
        raise InputError(f"cannot be read ({error.strerror or error})", path) from None
    table: Predictions = {task: {} for task in found}
    for line, row in rows:
        for task, column in found.items():
            cell = (row.get(column) or "").strip()
            if cell:
                table[task][row["PatientID"].strip()] = _probability(cell, line, path)
    return table


def _probability(cell: str, line: int, path: Path) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise InputError(f"line {line}: {cell!r} is not a number", path) from None
    if not 0.0 <= value <= 1.0:
        raise InputError(f"line {line}: {value} is not a probability", path)
    return value


@dataclass(frozen=True)
class TaskEnsemble:
    """One task's fitted weight and its nested out-of-fold predictions.

    Attributes:
        weight: w of Balaïtous (the ConvNeXt's is 1 - w), chosen on all patients.
        chosen: the w chosen in each outer training split, (repeats * folds,).
        result: the patients' labels and the predictions of each system and of the
            ensemble ((1, N) for a system, (repeats, N) for the nested ensemble).
    """

    weight: float
    chosen: np.ndarray
    result: TaskResult


def best_weight(y: np.ndarray, first: np.ndarray, second: np.ndarray) -> float:
    """The w of the grid that maximises the AUC of w * first + (1 - w) * second.

    Ties go to the w nearest 0.5 (an even mix, when the data cannot tell).
    """
    grid = np.linspace(0.0, 1.0, WEIGHT_STEPS + 1)
    aucs = np.array([roc_auc_score(y, w * first + (1 - w) * second) for w in grid])
    best = np.flatnonzero(aucs >= aucs.max() - 1e-12)
    return round(float(grid[best[np.argmin(np.abs(grid[best] - 0.5))]]), 6)


def fit_task(
    task: str,
    patients: np.ndarray,
    y: np.ndarray,
    balaitous: np.ndarray,
    convnext: np.ndarray,
    *,
    folds: int = FOLDS,
    repeats: int = REPEATS,
    seed: int = 0,
) -> TaskEnsemble:
    """Nested cross-validation of the weight choice on (N,) labels and probabilities."""
    outer = min(folds, int(y.sum()), int(len(y) - y.sum()))
    if outer < 2:
        raise InputError(
            f"the {task} task has {int(y.sum())} positive and {int(len(y) - y.sum())} "
            "negative patients predicted by both systems; fitting the ensemble needs at "
            "least 2 of each"
        )
    nested = np.zeros((repeats, len(y)))
    chosen = []
    for r in range(repeats):
        splitter = StratifiedKFold(outer, shuffle=True, random_state=seed + r)
        for train, test in splitter.split(y, y):
            if len(np.unique(y[train])) < 2:
                w = 0.5
            else:
                w = best_weight(y[train], balaitous[train], convnext[train])
            nested[r, test] = w * balaitous[test] + (1 - w) * convnext[test]
            chosen.append(w)
    predictions = {"balaitous": balaitous[None], "convnext3d": convnext[None], "ensemble": nested}
    return TaskEnsemble(
        best_weight(y, balaitous, convnext),
        np.array(chosen),
        TaskResult(task, patients, y, predictions),
    )


def task_data(
    reference: Path,
    labels: dict[str, tuple[int, int]],
    systems: dict[str, Predictions],
    task: str,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The task's patients (by the STOIC rule) that every system predicts: (N,) IDs,
    (N,) labels and each system's (N,) probabilities.

    Args:
        reference, labels: the reference.csv and what read_reference read from it.

    Raises:
        InputError: when no such patient is left.
    """
    ids = np.array(sorted(labels), dtype=str)
    covid = np.array([labels[i][0] for i in ids])
    severe = np.array([labels[i][1] for i in ids])
    rows = task_rows(covid, severe, task)
    candidates = ids[rows]
    both = [
        p for p in candidates if all(p in predictions[task] for predictions in systems.values())
    ]
    left_out = len(candidates) - len(both)
    if left_out:
        logger.warning(
            "%s: %d of %d patients of the reference lack a prediction of one system; left out",
            task,
            left_out,
            len(candidates),
        )
    if not both:
        raise InputError(
            f"no {task} patient of the reference is predicted by both systems", reference
        )
    chosen = np.array(both, dtype=str)
    y = np.array([labels[p][STOIC_TASKS.index(task)] for p in chosen], dtype=int)
    probabilities = {
        name: np.array([predictions[task][p] for p in chosen])
        for name, predictions in systems.items()
    }
    return chosen, y, probabilities


def fit_ensemble(
    reference: Path,
    balaitous: Sequence[Path],
    convnext: Sequence[Path],
    out_dir: Path,
    *,
    folds: int = FOLDS,
    repeats: int = REPEATS,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit both tasks' weights; write OUT/ensemble.json and OUT/report.{json,md}, roc.png.

    Returns:
        the report's JSON document.

    Raises:
        InputError: naming the file at fault (see read_oof_predictions, task_data).
    """
    started = time.perf_counter()
    systems = {
        "balaitous": read_oof_predictions(balaitous),
        "convnext3d": read_oof_predictions(convnext),
    }
    labels = read_reference(reference)
    fitted: dict[str, TaskEnsemble] = {}
    for task in STOIC_TASKS:
        ids, y, p = task_data(reference, labels, systems, task)
        fitted[task] = fit_task(
            task, ids, y, p["balaitous"], p["convnext3d"], folds=folds, repeats=repeats, seed=seed
        )
        logger.info(
            "%s: %d patients; weight of balaitous %.2f (nested choices %.2f +- %.2f)",
            task,
            len(y),
            fitted[task].weight,
            fitted[task].chosen.mean(),
            fitted[task].chosen.std(),
        )
    weights = {
        task: dict(zip(ENSEMBLE_MEMBERS, (f.weight, round(1.0 - f.weight, 6)), strict=True))
        for task, f in fitted.items()
    }
    about = {
        "title": "The ensemble of Balaïtous and the fine-tuned 3D ConvNeXt",
        "protocol": {
            "inputs": {
                "reference": str(reference),
                "balaitous": [str(p) for p in balaitous],
                "convnext3d": [str(p) for p in convnext],
            },
            "ensemble": "w * P(balaitous) + (1 - w) * P(convnext3d), w on a grid of "
            f"{WEIGHT_STEPS + 1} values in [0, 1] maximising the ROC-AUC",
            "estimate": f"nested: w chosen on the training folds of {repeats} x stratified "
            f"{folds}-fold, applied to the held-out fold; the systems alone: their "
            "out-of-fold predictions as given",
            "seed": seed,
            "weights (chosen on all patients)": weights,
        },
    }
    document = report({t: f.result for t, f in fitted.items()}, about, out_dir, seed=seed)
    ensemble = {
        **weights,
        "fitted": {
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "by": "python -m stoic_ct fit-ensemble",
            "nested_auc": {t: document["tasks"][t]["heads"]["ensemble"]["auc"] for t in fitted},
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    text = json.dumps(ensemble, indent=1) + "\n"
    atomic_write_text(out_dir / ENSEMBLE_WEIGHTS.name, text)
    return document


def install_ensemble(weights: Path, model_dir: Path, document: dict[str, Any]) -> SystemRecord:
    """Put a fitted ensemble.json into a model folder that holds both systems, and record
    that the folder now holds the ensemble (system.json; where there is a MANIFEST, its
    lines for ensemble.json and the ConvNeXt files, so that export.sh packs them).

    Args:
        weights: the ensemble.json fit_ensemble wrote.
        document: fit_ensemble's report, whose AUCs the record keeps.

    Raises:
        ModelFileError: naming the folder and the files it lacks; nothing is written then.
    """
    encoder = choose(model_dir).encoder
    needed = [s for s in system_files("ensemble", encoder) if s != ENSEMBLE_WEIGHTS]
    missing = [spec.name for spec in needed if not (model_dir / spec.name).is_file()]
    if missing:
        raise ModelFileError(
            f"lacks {', '.join(missing)}: the ensemble needs both systems in the folder",
            model_dir,
        )
    read_ensemble_weights(weights)
    target = atomic_write_text(model_dir / ENSEMBLE_WEIGHTS.name, weights.read_text("utf-8"))
    if read_manifest(model_dir):  # the ConvNeXt files were copied in by hand: list them too
        added = [target, *(model_dir / s.name for s in system_files("convnext3d"))]
        update_manifest(model_dir, {path.name: sha256_of(path) for path in added})
    tasks = document["tasks"]
    entry = origin(
        f"ensemble weights fitted on out-of-fold predictions ({weights})",
        cohort={task: {"patients": entry["patients"]} for task, entry in tasks.items()},
        auc={
            "estimate": "out-of-fold; nested for the ensemble",
            **{
                name: {task: tasks[task]["heads"][name]["auc"] for task in tasks}
                for name in (*ENSEMBLE_MEMBERS, "ensemble")
            },
        },
    )
    return write_system_record(model_dir, "ensemble", encoder, entry)
