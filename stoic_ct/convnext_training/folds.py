"""One fold of the ConvNeXt's fine-tuning: the classifier, its weighted loss, its epochs.

`train_fold` trains one fold on one device, or, given a `Team`, together with other
ranks under DistributedDataParallel: each rank takes an interleaved share of every
batch, the loss of each share is normalised by the class weights of the whole batch (so
that the averaged gradient is that of the recipe's batch, whatever the split), each
rank validates a share of the validation patients (none twice, none padded in), and the
team's first rank writes the checkpoints. Augmentation is seeded per patient, so a team
sees the augmented volumes one process would; drop path draws per rank.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.utils.class_weight import compute_class_weight
from tqdm import tqdm

from stoic_ct.convnext_training.augmentation import Compose, augmentation
from stoic_ct.convnext_training.cube_cache import Cube, load_batch, metadata_batch
from stoic_ct.convnext_training.recipes import FinetuneSettings, class_names
from stoic_ct.convnext_training.trainer import Evaluation, Trainer, fit, seed_of
from stoic_ct.distributed import Team, interleave
from stoic_ct.errors import InputError
from stoic_ct.inference.fold_ensemble import head_outputs, head_probabilities
from stoic_ct.models.convnext3d import ConvNeXt3D
from stoic_ct.weights.network_files import load_encoder_of_size

logger = logging.getLogger(__name__)


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
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor,
    head: str,
    total_weight: float | None = None,
) -> torch.Tensor:
    """Cross-entropy weighted by class: softmax over C logits, or the binary cross-entropy
    of one logit (sigmoid); both sum(w_i l_i) / sum(w_i), or / `total_weight` when given
    (the weights of a whole batch of which these rows are a share)."""
    if head == "softmax" and total_weight is None:
        return F.cross_entropy(logits, target, class_weight)
    weight = class_weight[target]
    if head == "softmax":
        each = F.cross_entropy(logits, target, reduction="none")
    else:
        each = F.binary_cross_entropy_with_logits(
            logits[:, 0], target.to(logits.dtype), reduction="none"
        )
    return (weight * each).sum() / (weight.sum() if total_weight is None else total_weight)


@dataclass(frozen=True)
class FoldRun:
    """One fold's training data and network, with its epoch and its validation (the two
    steps `fit` calls), alone or as one rank of `team`.

    Attributes:
        weights: (C,) the training fold's balanced class weights; class_weight the same
            on the device.
        train, valid: the fold's rows of `labels`; train_cubes, valid_cubes their cubes.
    """

    fold: int
    settings: FinetuneSettings
    device: torch.device
    trainer: Trainer
    labels: np.ndarray
    train: np.ndarray
    valid: np.ndarray
    train_cubes: list[Cube]
    valid_cubes: list[Cube]
    weights: np.ndarray
    class_weight: torch.Tensor
    augment: Compose | None
    team: Team | None
    progress: bool

    @property
    def title(self) -> str:
        return f"fold {self.fold + 1}/{self.settings.folds}"

    @property
    def with_metadata(self) -> bool:
        return bool(self.settings.metadata_names)

    def loss(
        self,
        net: torch.nn.Module,
        images: torch.Tensor,
        metadata: torch.Tensor | None,
        target: torch.Tensor,
        scale: float = 1.0,
        normaliser: float | None = None,
    ) -> torch.Tensor:
        """The weighted loss of a batch (or of this rank's share of it, times `scale`)."""
        logits = net(images, metadata).float()
        return scale * weighted_loss(
            logits, target, self.class_weight, self.settings.head, normaliser
        )

    def train_epoch(self, epoch: int) -> float:
        """One epoch over the training fold; its mean loss per patient."""
        settings, fold, team = self.settings, self.fold, self.team
        torch.manual_seed(seed_of(settings.seed, fold, epoch, 1))  # drop path
        order = torch.randperm(
            len(self.train),
            generator=torch.Generator().manual_seed(seed_of(settings.seed, fold, epoch)),
        ).tolist()
        batches = [
            order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)
        ]
        train_labels = torch.from_numpy(self.labels[self.train]).to(self.device)
        total = 0.0
        bar = tqdm(
            batches,
            desc=f"{self.title} epoch {epoch + 1}",
            unit="batch",
            leave=False,
            disable=None if self.progress and (team is None or team.writes) else True,
        )
        for batch in bar:
            rows, scale, normaliser = batch, 1.0, None
            if team is not None:
                # The share's loss over the whole batch's weights, times the team's size
                # (DDP averages the ranks' gradients); a rank without a share steps on
                # its batch's first patient at weight 0, as DDP needs every rank's step.
                normaliser = float(self.weights[self.labels[self.train][batch]].sum()) / team.size
                share = team.share(batch)
                rows, scale = (share, 1.0) if share else (batch[:1], 0.0)
            seeds = [seed_of(settings.seed, fold, epoch, 2, i) for i in rows]
            images, _ = load_batch(self.train_cubes, rows, self.device, self.augment, seeds)
            metadata = (
                metadata_batch(self.train_cubes, rows, self.device) if self.with_metadata else None
            )
            step_loss = partial(self.loss, scale=scale, normaliser=normaliser)
            value = self.trainer.step(step_loss, images, metadata, train_labels[rows])
            total += value * (len(batch) if team is None else len(batch) / team.size)
        if team is not None:
            total = team.total(total)
        return total / len(order)

    def evaluate(self, net: torch.nn.Module) -> Evaluation:
        """The validation fold's loss, metric and (V, C) probabilities (the team's shares
        gathered in order)."""
        settings, team = self.settings, self.team
        mine = self.valid_cubes if team is None else team.share(self.valid_cubes)
        logits = (
            predict_cubes(
                net,
                mine,
                self.device,
                settings.batch_size,
                self.trainer.autocast(),
                self.with_metadata,
            )
            if mine
            else torch.zeros((0, 1))
        )
        if team is not None:
            parts = [list(part) for part in team.gather(logits)]
            logits = torch.stack(interleave(parts))
        valid_labels = torch.from_numpy(self.labels[self.valid])
        valid_loss = float(
            weighted_loss(logits, valid_labels, self.class_weight.cpu(), settings.head)
        )
        probabilities = head_probabilities(logits, settings.head)
        metric = task_metric(settings.task, valid_labels.numpy(), probabilities.numpy())
        return Evaluation(valid_loss, metric, probabilities)


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
    team: Team | None = None,
) -> tuple[torch.Tensor, float]:
    """Train one fold (alone, or as one rank of `team`); its best epoch's (V, C)
    validation probabilities and metric."""
    classes = len(class_names(settings.task))
    torch.manual_seed(seed_of(settings.seed, fold))  # the head's initial weights
    init = Path(settings.init) if settings.init else None
    trainer = Trainer(build_classifier(settings, init), device, settings.optimiser, team)
    weights = compute_class_weight("balanced", classes=np.arange(classes), y=labels[train]).astype(
        np.float32
    )
    run = FoldRun(
        fold=fold,
        settings=settings,
        device=device,
        trainer=trainer,
        labels=labels,
        train=train,
        valid=valid,
        train_cubes=[cubes[i] for i in train],
        valid_cubes=[cubes[i] for i in valid],
        weights=weights,
        class_weight=torch.from_numpy(weights).to(device),
        augment=augmentation(settings.augment),
        team=team,
        progress=progress,
    )
    says = logger.info if team is None or team.writes else logger.debug
    says(
        "%s: %d training, %d validation patients; class weights %s",
        run.title,
        len(train),
        len(valid),
        ", ".join(f"{w:.3g}" for w in weights),
    )
    outcome = fit(
        trainer,
        epochs=settings.epochs,
        train_epoch=run.train_epoch,
        evaluate=run.evaluate,
        out_dir=out_dir,
        metric_name=metric_name(settings.task),
        title=run.title,
        learning_rate=settings.learning_rate,
        writes=team is None or team.writes,
    )
    says(
        "%s: best epoch %d, %s %.4f",
        run.title,
        outcome.best_epoch + 1,
        metric_name(settings.task),
        outcome.best_metric,
    )
    return outcome.best_outputs, outcome.best_metric


def metric_name(task: str) -> str:
    """The metric column's name: auc, or macro_f1 for severity4."""
    return "macro_f1" if task == "severity4" else "auc"
