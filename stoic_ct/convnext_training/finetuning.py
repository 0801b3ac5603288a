"""Fine-tuning the 3D ConvNeXt end to end, as Kienzle et al. (docs/pipeline.md, section 3).

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
    OUT/convnext3d_<task>.pth   the fold ensemble for `process.py --model convnext3d`

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
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.class_weight import compute_class_weight
from tqdm import tqdm

from stoic_ct.atomic import atomic_write_text
from stoic_ct.convnext_training.augmentation import augmentation
from stoic_ct.convnext_training.recipes import FinetuneSettings, class_names
from stoic_ct.convnext_training.trainer import (
    BEST,
    Evaluation,
    Trainer,
    fit,
    seed_of,
    start_run,
)
from stoic_ct.errors import InputError
from stoic_ct.inference.classifier import (
    head_outputs,
    head_probabilities,
    save_fold_ensemble,
)
from stoic_ct.io.cohort import Patient
from stoic_ct.models.convnext3d import ConvNeXt3D, load_encoder_of_size
from stoic_ct.parallel import on_devices
from stoic_ct.preprocessing.convnext_preprocessing import DEFAULT_WINDOW
from stoic_ct.preprocessing.cubes import (
    Cube,
    cached_cubes,
    load_batch,
    metadata_batch,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    """Out-of-fold probabilities (N, C), the fold of each patient, and the metrics."""

    probabilities: np.ndarray
    fold: np.ndarray
    metric: float
    fold_metrics: list[float]
    ensemble: Path


def task_metric(task: str, labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC-AUC of the positive class for binary tasks, macro F1 of the argmax for severity4.

    NaN when the labels hold one class only (AUC undefined).
    """
    if task == "severity4":
        return float(
            f1_score(labels, probabilities.argmax(axis=1), average="macro", labels=range(4))
        )
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probabilities[:, 1]))


def build_classifier(settings: FinetuneSettings, init: Path | None) -> ConvNeXt3D:
    """A ConvNeXt3D with a fresh class head (and metadata inputs when asked), its encoder
    from `init` when given.

    Raises:
        ModelFileError: when `init` cannot be loaded; InputError when its size differs.
    """
    model = ConvNeXt3D(
        settings.size,
        num_classes=head_outputs(settings.head, len(class_names(settings.task))),
        drop_path_rate=settings.drop_path,
        metadata_dim=len(settings.metadata_names),
    )
    if init is None:
        return model
    encoder = load_encoder_of_size(init, settings.size)
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise InputError(f"does not fit the classifier (missing {missing})", init)
    return model


def _check_classes(labels: np.ndarray, classes: int, folds: int, task: str) -> None:
    counts = np.bincount(labels, minlength=classes)
    if (counts < folds).any():
        detail = ", ".join(f"{c} x {n}" for n, c in zip(class_names(task), counts, strict=True))
        raise InputError(
            f"the {task} task needs at least {folds} patients of each class for {folds} folds; "
            f"there are {detail}"
        )


@torch.inference_mode()
def predict_cubes(
    model: torch.nn.Module,
    cubes: Sequence[Cube],
    device: torch.device,
    batch_size: int,
    autocast: torch.autocast,
    with_metadata: bool = False,
) -> torch.Tensor:
    """(N, outputs) float32 logits of the cubes, no augmentation, under `autocast`."""
    model.eval()
    outputs = []
    for start in range(0, len(cubes), batch_size):
        batch = range(start, min(start + batch_size, len(cubes)))
        images, _ = load_batch(cubes, batch, device)
        metadata = metadata_batch(cubes, batch, device) if with_metadata else None
        with autocast:
            outputs.append(model(images, metadata).float())
    return torch.cat(outputs).cpu()


def weighted_loss(
    logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor, head: str
) -> torch.Tensor:
    """Cross-entropy weighted by class: softmax over C logits, or the binary cross-entropy
    of one logit (sigmoid); both the weighted mean sum(w_i l_i) / sum(w_i)."""
    if head == "softmax":
        return F.cross_entropy(logits, target, class_weight)
    weight = class_weight[target]
    each = F.binary_cross_entropy_with_logits(
        logits[:, 0], target.to(logits.dtype), reduction="none"
    )
    return (weight * each).sum() / weight.sum()


def train_fold(
    fold: int,
    cubes: Sequence[Cube],
    labels: np.ndarray,
    train: np.ndarray,
    valid: np.ndarray,
    settings: FinetuneSettings,
    device: torch.device,
    out_dir: Path,
    progress: bool = True,
) -> tuple[torch.Tensor, float]:
    """Train one fold; its best epoch's (V, C) validation probabilities and metric."""
    classes = len(class_names(settings.task))
    torch.manual_seed(seed_of(settings.seed, fold))  # the head's initial weights
    init = Path(settings.init) if settings.init else None
    trainer = Trainer(build_classifier(settings, init), device, settings.optimiser)
    weights = compute_class_weight("balanced", classes=np.arange(classes), y=labels[train]).astype(
        np.float32
    )
    class_weight = torch.from_numpy(weights).to(device)
    augment = augmentation(settings.augment)
    train_cubes = [cubes[i] for i in train]
    valid_cubes = [cubes[i] for i in valid]
    train_labels = torch.from_numpy(labels[train]).to(device)
    valid_labels = torch.from_numpy(labels[valid])
    with_metadata = bool(settings.metadata_names)
    title = f"fold {fold + 1}/{settings.folds}"
    logger.info(
        "%s: %d training, %d validation patients; class weights %s",
        title,
        len(train),
        len(valid),
        ", ".join(f"{w:.3g}" for w in weights),
    )

    def loss(
        net: torch.nn.Module,
        images: torch.Tensor,
        metadata: torch.Tensor | None,
        target: torch.Tensor,
    ) -> torch.Tensor:
        return weighted_loss(net(images, metadata).float(), target, class_weight, settings.head)

    def train_epoch(epoch: int) -> float:
        torch.manual_seed(seed_of(settings.seed, fold, epoch, 1))  # drop path
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(seed_of(settings.seed, fold, epoch))
        ).tolist()
        batches = [
            order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)
        ]
        total = 0.0
        bar = tqdm(
            batches,
            desc=f"{title} epoch {epoch + 1}",
            unit="batch",
            leave=False,
            disable=None if progress else True,
        )
        for batch in bar:
            seeds = [seed_of(settings.seed, fold, epoch, 2, i) for i in batch]
            images, _ = load_batch(train_cubes, batch, device, augment, seeds)
            metadata = metadata_batch(train_cubes, batch, device) if with_metadata else None
            total += trainer.step(loss, images, metadata, train_labels[batch]) * len(batch)
        return total / len(order)

    def evaluate(net: torch.nn.Module) -> Evaluation:
        logits = predict_cubes(
            net, valid_cubes, device, settings.batch_size, trainer.autocast(), with_metadata
        )
        valid_loss = float(weighted_loss(logits, valid_labels, class_weight.cpu(), settings.head))
        probabilities = head_probabilities(logits, settings.head)
        metric = task_metric(settings.task, valid_labels.numpy(), probabilities.numpy())
        return Evaluation(valid_loss, metric, probabilities)

    outcome = fit(
        trainer,
        epochs=settings.epochs,
        train_epoch=train_epoch,
        evaluate=evaluate,
        out_dir=out_dir,
        metric_name=metric_name(settings.task),
        title=title,
        learning_rate=settings.learning_rate,
    )
    logger.info(
        "%s: best epoch %d, %s %.4f",
        title,
        outcome.best_epoch + 1,
        metric_name(settings.task),
        outcome.best_metric,
    )
    return outcome.best_outputs, outcome.best_metric


def metric_name(task: str) -> str:
    """The metric column's name: auc, or macro_f1 for severity4."""
    return "macro_f1" if task == "severity4" else "auc"


@dataclass(frozen=True)
class FoldJob:
    """The folds one device trains: (fold, training rows, validation rows) each."""

    folds: list[tuple[int, np.ndarray, np.ndarray]]
    cubes: list[Cube]
    labels: np.ndarray
    settings: FinetuneSettings
    out_dir: Path
    progress: bool


def train_folds(device: torch.device, job: FoldJob) -> list[tuple[int, np.ndarray, float]]:
    """Train `job`'s folds on `device`, one after the other: (fold, (V, C) best validation
    probabilities, metric) each. Runs in a process of its own when there are several
    devices (stoic_ct.parallel)."""
    results = []
    for fold, train, valid in job.folds:
        best, metric = train_fold(
            fold,
            job.cubes,
            job.labels,
            train,
            valid,
            job.settings,
            device,
            job.out_dir / f"fold-{fold + 1}",
            job.progress,
        )
        results.append((fold, best.numpy(), metric))
    return results


def finetune(
    patients: Sequence[Patient],
    labels: np.ndarray,
    settings: FinetuneSettings,
    out_dir: Path,
    *,
    device: torch.device | Sequence[torch.device],
    cache_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Cross-validated fine-tuning; writes the files of the module docstring.

    Args:
        patients, labels: the task's patients and (N,) class indices (`task_patients`).
        device: where to train; with several, the folds are shared out among them (fold k
            on device k mod n), each device training its folds in a process of its own.
        cache_dir: where the cubes are kept (default OUT/cubes).

    Raises:
        InputError: too few patients per class, an unreadable scan, or a run in `out_dir`
            with other settings.
    """
    started = time.perf_counter()
    devices = [device] if isinstance(device, torch.device) else list(device)
    classes = len(class_names(settings.task))
    _check_classes(labels, classes, settings.folds, settings.task)
    start_run(out_dir, settings, resume, "fine-tuning")
    cubes = cached_cubes(
        patients, cache_dir or out_dir / "cubes", settings.input_size, progress=progress
    )
    splitter = StratifiedKFold(settings.folds, shuffle=True, random_state=settings.seed % 2**32)
    splits = [
        (fold, train, valid)
        for fold, (train, valid) in enumerate(splitter.split(np.zeros(len(labels)), labels))
    ]
    alone = len(devices) == 1
    jobs = [
        (
            d,
            FoldJob(
                splits[i :: len(devices)], cubes, labels, settings, out_dir, progress and alone
            ),
        )
        for i, d in enumerate(devices[: settings.folds])
    ]
    probabilities = np.full((len(cubes), classes), np.nan)
    fold_of = np.full(len(cubes), -1, dtype=np.int64)
    fold_metrics = [float("nan")] * settings.folds
    for results in on_devices(train_folds, jobs):
        for fold, best, metric in results:
            valid = splits[fold][2]
            probabilities[valid], fold_of[valid] = best, fold
            fold_metrics[fold] = metric
    metric = task_metric(settings.task, labels, probabilities)
    ensemble = save_fold_ensemble(
        out_dir / f"convnext3d_{settings.task}.pth",
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
    _write_oof(out_dir / "oof.csv", patients, labels, fold_of, probabilities, settings.task)
    summary: dict[str, Any] = {
        "task": settings.task,
        "patients": len(patients),
        "class_counts": np.bincount(labels, minlength=classes).tolist(),
        metric_name(settings.task): {"out_of_fold": metric, "folds": fold_metrics},
        "devices": [str(d) for d in devices],
        "seconds": time.perf_counter() - started,
        "settings": asdict(settings),
        "ensemble": ensemble.name,
    }
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write_text(out_dir / "finetune.json", text)
    logger.info(
        "%s: out-of-fold %s %.4f (folds: %s); wrote %s",
        settings.task,
        metric_name(settings.task),
        metric,
        ", ".join(f"{m:.3f}" for m in fold_metrics),
        ensemble,
    )
    return FinetuneResult(probabilities, fold_of, metric, fold_metrics, ensemble)


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
