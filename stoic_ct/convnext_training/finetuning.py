"""Fine-tuning the 3D ConvNeXt end to end, as Kienzle et al.
(docs/explanation/pipeline.md, section 3).

Stratified k-fold cross-validation (default 5). In each fold: a ConvNeXt3D with a class
head, started from `--init` (inflated ImageNet weights or a `pretrain` checkpoint),
AdamW, cross-entropy weighted by the training fold's class frequencies (scikit-learn's
"balanced" weights), the paper's augmentation, an EMA of the weights that is validated,
kept and shipped, and the best epoch chosen by the task's metric: ROC-AUC for the binary
STOIC tasks, macro F1 for the 4-class severity grade.

    OUT/settings.json           what was asked; a resumed run must ask the same
    OUT/fold-K/                 the trainer's folder (last.pt, best.pt, metrics.csv, PNG)
    OUT/oof.csv                 every patient's out-of-fold probabilities (best epochs)
    OUT/finetune.json           per-fold and out-of-fold metrics, class weights, times
    OUT/convnext3d_<task>.pth   the fold ensemble for `process.py --system convnext3d`

The out-of-fold metric is that of the epochs chosen on the same folds: slightly
optimistic, as in the paper; the best epoch is the only thing chosen on them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from stoic_ct.atomic import atomic_write_text
from stoic_ct.claims import Board
from stoic_ct.convnext_training.cube_cache import Cube
from stoic_ct.convnext_training.folds import metric_name, task_metric, train_fold
from stoic_ct.convnext_training.recipes import FinetuneSettings, class_names
from stoic_ct.convnext_training.sharing import CLAIMS, settings_key, shared_cubes
from stoic_ct.convnext_training.trainer import BEST, LAST, start_run
from stoic_ct.distributed import ONE_PROCESS, Ranks, Team, gather, on_leader, share_units
from stoic_ct.errors import InputError
from stoic_ct.inference.fold_ensemble import save_fold_ensemble
from stoic_ct.io.cohort import Patient
from stoic_ct.preprocessing.convnext_preprocessing import DEFAULT_WINDOW
from stoic_ct.weights.model_files import FINE_TUNED_NAME

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    """Out-of-fold probabilities (N, C), the fold of each patient, and the metrics."""

    probabilities: np.ndarray
    fold: np.ndarray
    metric: float
    fold_metrics: list[float]
    ensemble: Path


def _check_classes(labels: np.ndarray, classes: int, folds: int, task: str) -> None:
    counts = np.bincount(labels, minlength=classes)
    if (counts < folds).any():
        detail = ", ".join(f"{c} x {n}" for n, c in zip(class_names(task), counts, strict=True))
        raise InputError(
            f"the {task} task needs at least {folds} patients of each class for {folds} folds; "
            f"there are {detail}"
        )


@dataclass(frozen=True)
class FoldPlan:
    """One task's cross-validated fine-tuning, as every rank of the run sees it.

    Attributes:
        splits: (fold, training rows, validation rows) of each fold.
        devices: the device of every rank of the run.
    """

    patients: list[Patient]
    labels: np.ndarray
    settings: FinetuneSettings
    out_dir: Path
    cubes: list[Cube]
    splits: list[tuple[int, np.ndarray, np.ndarray]]
    devices: list[str]

    @property
    def units(self) -> list[tuple[Board, str]]:
        """Each fold's unit, done for these settings only (the epochs included)."""
        board = Board(self.out_dir / CLAIMS, settings_key(self.settings))
        return [(board, f"fold-{fold + 1}") for fold, _, _ in self.splits]


def plan_folds(
    patients: Sequence[Patient],
    labels: np.ndarray,
    settings: FinetuneSettings,
    out_dir: Path,
    *,
    device: torch.device,
    ranks: Ranks = ONE_PROCESS,
    cache_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> FoldPlan:
    """Check the task, open the run folder (the leader), prepare the cubes (the ranks
    together) and split the folds.

    Raises:
        InputError: too few patients per class, an unreadable scan, or a run in `out_dir`
            with other settings (on every rank).
    """
    classes = len(class_names(settings.task))
    _check_classes(labels, classes, settings.folds, settings.task)
    on_leader(lambda: start_run(out_dir, settings, resume, "fine-tuning"), ranks)
    cache = cache_dir or out_dir / "cubes"
    cubes = shared_cubes(patients, cache, settings.input_size, ranks, progress=progress)
    splitter = StratifiedKFold(settings.folds, shuffle=True, random_state=settings.seed % 2**32)
    splits = [
        (fold, train, valid)
        for fold, (train, valid) in enumerate(splitter.split(np.zeros(len(labels)), labels))
    ]
    devices = gather(str(device))
    return FoldPlan(list(patients), labels, settings, out_dir, cubes, splits, devices)


def train_plans(
    plans: Sequence[FoldPlan], device: torch.device, ranks: Ranks, progress: bool = True
) -> None:
    """Train every fold of the plans not done yet, shared among the ranks (stoic_ct.
    distributed.share_units): each fold by one rank, or by a team of ranks when there
    are fewer folds left than ranks. Returns on the leader once every fold is done."""
    units = [(plan, fold) for plan in plans for fold, _, _ in plan.splits]

    def work(i: int, team: Team | None) -> None:
        plan, fold = units[i]
        _, train, valid = plan.splits[fold]
        train_fold(
            fold,
            plan.cubes,
            plan.labels,
            train,
            valid,
            plan.settings,
            device,
            plan.out_dir / f"fold-{fold + 1}",
            progress and ranks.alone,
            team,
        )

    share_units(
        [unit for plan in plans for unit in plan.units],
        work,
        ranks,
        largest_team=min(plan.settings.batch_size for plan in plans),
    )


def assemble(plan: FoldPlan, seconds: float) -> FinetuneResult:
    """The run's results from its folds' checkpoints: the fold ensemble, the out-of-fold
    table and finetune.json (the module docstring); written by the leader."""
    settings, out_dir = plan.settings, plan.out_dir
    classes = len(class_names(settings.task))
    probabilities = np.full((len(plan.cubes), classes), np.nan)
    fold_of = np.full(len(plan.cubes), -1, dtype=np.int64)
    fold_metrics = [float("nan")] * settings.folds
    for fold, _, valid in plan.splits:
        last = out_dir / f"fold-{fold + 1}" / LAST
        state = torch.load(last, map_location="cpu", weights_only=True)
        probabilities[valid] = state["best"]["outputs"].numpy()
        fold_of[valid], fold_metrics[fold] = fold, float(state["best"]["metric"])
    metric = task_metric(settings.task, plan.labels, probabilities)
    ensemble = save_fold_ensemble(
        out_dir / FINE_TUNED_NAME.format(task=settings.task),
        folds=[
            torch.load(out_dir / f"fold-{k + 1}" / BEST, map_location="cpu", weights_only=True)
            for k in range(settings.folds)
        ],
        size=settings.size,
        input_size=settings.input_size,
        window=DEFAULT_WINDOW,
        task=settings.task,
        classes=class_names(settings.task),
        head=settings.head,
        metadata=settings.metadata_names,
    )
    _write_oof(
        out_dir / "oof.csv", plan.patients, plan.labels, fold_of, probabilities, settings.task
    )
    summary: dict[str, Any] = {
        "task": settings.task,
        "patients": len(plan.patients),
        "class_counts": np.bincount(plan.labels, minlength=classes).tolist(),
        metric_name(settings.task): {"out_of_fold": metric, "folds": fold_metrics},
        "devices": plan.devices,
        "seconds": seconds,
        "settings": asdict(settings),
        "ensemble": ensemble.name,
    }
    atomic_write_text(out_dir / "finetune.json", json.dumps(summary, indent=2) + "\n")
    logger.info(
        "%s: out-of-fold %s %.4f (folds: %s); wrote %s",
        settings.task,
        metric_name(settings.task),
        metric,
        ", ".join(f"{m:.3f}" for m in fold_metrics),
        ensemble,
    )
    return FinetuneResult(probabilities, fold_of, metric, fold_metrics, ensemble)


def finetune(
    patients: Sequence[Patient],
    labels: np.ndarray,
    settings: FinetuneSettings,
    out_dir: Path,
    *,
    device: torch.device,
    cache_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Cross-validated fine-tuning in this process; writes the files of the module
    docstring. See `finetune_on_ranks` for the arguments."""
    result = finetune_on_ranks(
        patients,
        labels,
        settings,
        out_dir,
        device=device,
        ranks=ONE_PROCESS,
        cache_dir=cache_dir,
        resume=resume,
        progress=progress,
    )
    assert result is not None  # the only rank leads
    return result


def finetune_on_ranks(
    patients: Sequence[Patient],
    labels: np.ndarray,
    settings: FinetuneSettings,
    out_dir: Path,
    *,
    device: torch.device,
    ranks: Ranks,
    cache_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult | None:
    """Cross-validated fine-tuning on this rank, with the others of its run.

    Args:
        patients, labels: the task's patients and (N,) class indices (`task_patients`).
        device: where this process trains.
        ranks: this process's place among the ranks that run together (torchrun); the
            folds are shared among them, and the leader writes the results.
        cache_dir: where the cubes are kept (default OUT/cubes).

    Returns:
        The results on the leader, None on the other ranks.

    Raises:
        InputError: too few patients per class, an unreadable scan, or a run in `out_dir`
            with other settings.
    """
    started = time.perf_counter()
    plan = plan_folds(
        patients,
        labels,
        settings,
        out_dir,
        device=device,
        ranks=ranks,
        cache_dir=cache_dir,
        resume=resume,
        progress=progress,
    )
    train_plans([plan], device, ranks, progress)
    return assemble(plan, time.perf_counter() - started) if ranks.leader else None


def _write_oof(
    path: Path,
    patients: Sequence[Patient],
    labels: np.ndarray,
    fold: np.ndarray,
    probabilities: np.ndarray,
    task: str,
) -> None:
    names = class_names(task)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["PatientID", "label", "fold", *(f"p_{n.replace(' ', '_')}" for n in names)])
    for patient, label, k, p in zip(patients, labels, fold, probabilities, strict=True):
        writer.writerow([patient.id, int(label), int(k) + 1, *(f"{v:.6f}" for v in p)])
    atomic_write_text(path, text.getvalue())
