"""Pretraining the 3D ConvNeXt before fine-tuning: lesion segmentation, or multitask.

Kienzle et al. pretrain the encoder on lesion segmentation (an UperNet-like head over
the four stages, Dice + cross-entropy) and on a multitask of classification and
segmentation with pseudo-labels (masks a segmentation model made). Both write an encoder
file in the `convnext3d.pth` format, which `finetune --init` starts from; the
segmentation one keeps its head, so that it can make the multitask's pseudo-labels.

    OUT/settings.json, OUT/last.pt, best.pt, metrics.csv, learning-curves.png (trainer)
    OUT/pretrained.pth       the encoder (+ segmentation head) for finetune --init
    OUT/pseudo-labels/       the multitask's lesion masks, one .npy per patient

A seeded fifth of the patients is held out to validate: Dice for segmentation, the mean
of ROC-AUC and Dice for the multitask.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from tqdm import tqdm

from stoic_ct.convnext_training.augmentation import Compose, augmentation
from stoic_ct.convnext_training.cube_cache import Cube, load_batch, save_array
from stoic_ct.convnext_training.sharing import shared_cubes
from stoic_ct.convnext_training.trainer import (
    BEST,
    Evaluation,
    NetworkSettings,
    Trainer,
    fit,
    seed_of,
    start_run,
)
from stoic_ct.distributed import (
    ONE_PROCESS,
    Ranks,
    Team,
    first_team,
    in_chunks,
    interleave,
    on_leader,
)
from stoic_ct.errors import InputError, ModelFileError
from stoic_ct.io.cohort import Patient
from stoic_ct.models.convnext3d import ConvNeXt3D, ConvNeXt3DSegmenter, UperNetHead3D
from stoic_ct.weights.checkpoints import load_checkpoint
from stoic_ct.weights.model_files import CONVNEXT3D, problem, sha256_of
from stoic_ct.weights.network_files import convnext3d_of, load_encoder_of_size, save_convnext3d

MODES = ("segmentation", "multitask")
PRETRAINED = "pretrained.pth"


@dataclass(frozen=True, kw_only=True)
class PretrainSettings(NetworkSettings):
    """What decides a pretraining run (OUT/settings.json): the network settings (with a
    smaller batch and a larger learning rate by default), the mode and where the
    pseudo-labels come from."""

    batch_size: int = 2
    lr: float = 1e-4
    mode: str = "segmentation"
    pseudo_labels_from: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")


class MultiTaskConvNeXt(nn.Module):
    """One encoder, two heads: (N, 1, D, H, W) -> (N, classes) and (N, 2, D, H, W) logits."""

    def __init__(self, backbone: ConvNeXt3D, classes: int = 2) -> None:
        super().__init__()
        self.backbone = backbone
        self.classify = nn.Linear(backbone.feature_dim, classes)
        self.segment = UperNetHead3D(backbone.size.dims, num_classes=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stages = self.backbone.forward_stages(x)
        logits = self.classify(self.backbone.pool(stages[-1]))
        return logits, self.segment(stages, tuple(x.shape[2:]))


def soft_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean soft Dice of the lesion class: (N, 2, ...) logits, (N, ...) 0/1 target."""
    p = logits.float().softmax(dim=1)[:, 1].flatten(1)
    t = target.float().flatten(1)
    return ((2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice) of the lesion class."""
    return F.cross_entropy(logits.float(), target.long()) + 1.0 - soft_dice(logits, target)


def dice_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """(|predicted & truth|, |predicted| + |truth|) of the argmax lesion masks."""
    predicted, truth = logits.argmax(dim=1).bool(), target.bool()
    return int((predicted & truth).sum()), int(predicted.sum() + truth.sum())


def _dice_of(counts: Sequence[tuple[int, int]]) -> float:
    """Dice of argmax masks from their counts, summed over patients (1 when all are empty)."""
    intersection, total = (sum(c[i] for c in counts) for i in (0, 1))
    return 1.0 if total == 0 else 2 * intersection / total


def load_segmenter(path: Path) -> ConvNeXt3DSegmenter:
    """The segmentation-pretrained network (encoder and head) of a `pretrain` file.

    Raises:
        ModelFileError: when the file holds no segmentation head.
    """
    checkpoint = load_checkpoint(path, CONVNEXT3D)
    backbone, _ = convnext3d_of(checkpoint, path)
    head = checkpoint.get("segmentation_head")
    if head is None:
        raise ModelFileError(
            problem(
                CONVNEXT3D,
                "has no segmentation head: use the pretrained.pth of "
                "`pretrain --mode segmentation`",
            ),
            path,
        )
    model = ConvNeXt3DSegmenter(ConvNeXt3D(backbone.size_name), num_classes=2)
    model.backbone.load_state_dict(backbone.state_dict())
    model.head.load_state_dict(head)
    return model.eval().requires_grad_(False)


def _backbone(settings: PretrainSettings) -> ConvNeXt3D:
    model = ConvNeXt3D(settings.size, drop_path_rate=settings.drop_path)
    if settings.init is not None:
        model.load_state_dict(load_encoder_of_size(Path(settings.init), settings.size).state_dict())
    return model


@torch.inference_mode()
def pseudo_labels(
    segmenter: ConvNeXt3DSegmenter,
    cubes: Sequence[Cube],
    out_dir: Path,
    device: torch.device,
    key: str,
    ranks: Ranks = ONE_PROCESS,
    progress: bool = True,
) -> list[Cube]:
    """Each cube's lesion mask by `segmenter` (argmax), saved as OUT/<patient>.npy uint8,
    made by the ranks together in chunks; `key` names the segmenter (its file's digest)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    segmenter = segmenter.to(device)
    paths = [out_dir / f"{cube.patient}.npy" for cube in cubes]

    def label(name: str, rows: range) -> None:
        bar = tqdm(rows, desc="pseudo-labels", unit="scan", disable=None if progress else True)
        for i in bar:
            if not paths[i].exists():
                image, _ = cubes[i].load()
                mask = segmenter(image[None].to(device)).argmax(dim=1)[0].to(torch.uint8).cpu()
                save_array(paths[i], mask.numpy())

    in_chunks([c.patient for c in cubes], out_dir, key, label, ranks)
    return [Cube(c.patient, c.image, path) for c, path in zip(cubes, paths, strict=True)]


def _batch(
    cubes: Sequence[Cube],
    indices: Sequence[int],
    device: torch.device,
    augment: Compose | None = None,
    seeds: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, S, S, S) images and (B, S, S, S) lesion masks, augmented alike when asked."""
    images, masks = load_batch(cubes, indices, device, augment, seeds, with_lesions=True)
    assert masks is not None  # load_batch gives masks when with_lesions is set
    return images, masks


def pretrain(
    patients: Sequence[Patient],
    labels: np.ndarray | None,
    settings: PretrainSettings,
    out_dir: Path,
    *,
    device: torch.device,
    lesion_dir: Path | None,
    cache_dir: Path | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Path:
    """Pretrain in this process; returns OUT/pretrained.pth (see the module docstring and
    `pretrain_on_ranks` for the arguments)."""
    path = pretrain_on_ranks(
        patients,
        labels,
        settings,
        out_dir,
        device=device,
        lesion_dir=lesion_dir,
        ranks=ONE_PROCESS,
        cache_dir=cache_dir,
        progress=progress,
        resume=resume,
    )
    assert path is not None  # the only rank leads
    return path


def pretrain_on_ranks(
    patients: Sequence[Patient],
    labels: np.ndarray | None,
    settings: PretrainSettings,
    out_dir: Path,
    *,
    device: torch.device,
    lesion_dir: Path | None,
    ranks: Ranks,
    cache_dir: Path | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Path | None:
    """Pretrain on this rank, with the others of its run; returns OUT/pretrained.pth on
    the leader, None on the other ranks.

    Args:
        labels: (N,) class indices for the multitask's classification (None for segmentation).
        lesion_dir: lesion masks <PatientID>.mha; for the multitask, used when no
            `pseudo_labels_from` segmenter is set.
        ranks: this process's place among the ranks that run together (torchrun): the
            first `batch_size` of them train as one team; the others only prepare.
        resume: continue the run OUT holds (its last.pt), with the same settings.

    Raises:
        InputError: when lesion masks or labels are missing, a setting does not fit, or
            OUT holds a run and `resume` is False or its settings differ.
    """
    if settings.mode == "multitask" and labels is None:
        raise InputError("the multitask needs class labels (reference.csv)")
    on_leader(lambda: start_run(out_dir, settings, resume, "pretraining"), ranks)
    cubes = _pretraining_cubes(
        patients, settings, out_dir, cache_dir or out_dir / "cubes", lesion_dir, device, ranks
    )
    order = np.random.default_rng(settings.seed).permutation(len(cubes))
    held_out = max(1, len(cubes) // 5)
    valid, train = order[:held_out], order[held_out:]
    if len(train) == 0:
        raise InputError(f"{len(cubes)} patient(s) are too few to pretrain on (at least 2)")
    team = first_team(ranks, settings.batch_size)
    if team is None and not ranks.alone:
        return None  # a rank beyond the batch: its part was the preparation
    torch.manual_seed(seed_of(settings.seed))
    backbone = _backbone(settings)
    model: nn.Module
    if settings.mode == "segmentation":
        model = ConvNeXt3DSegmenter(backbone, num_classes=2)
    else:
        model = MultiTaskConvNeXt(backbone, classes=int(np.max(labels)) + 1)  # type: ignore[arg-type]
    trainer = Trainer(model, device, settings.optimiser, team, all_used=False)
    objective = _Objective(settings, labels, train, device)
    fit(
        trainer,
        epochs=settings.epochs,
        train_epoch=partial(_train_epoch, trainer, objective, cubes, train, team),
        evaluate=partial(_evaluate, trainer, objective, cubes, valid, team),
        out_dir=out_dir,
        metric_name="dice" if settings.mode == "segmentation" else "score",
        title=f"pretrain {settings.mode}",
        learning_rate=settings.learning_rate,
        writes=team is None or team.writes,
    )
    if team is not None and not team.writes:
        return None
    best = torch.load(out_dir / BEST, map_location="cpu", weights_only=True)
    model.load_state_dict(best)
    head = model.head if isinstance(model, ConvNeXt3DSegmenter) else model.segment
    return save_convnext3d(
        out_dir / PRETRAINED,
        model.backbone,
        settings.size,
        settings.input_size,
        {"pretraining": settings.mode},
        segmentation_head=head.state_dict(),
    )


def _pretraining_cubes(
    patients: Sequence[Patient],
    settings: PretrainSettings,
    out_dir: Path,
    cache: Path,
    lesion_dir: Path | None,
    device: torch.device,
    ranks: Ranks,
) -> list[Cube]:
    """The cubes with their lesion masks: the given ones, or the segmenter's pseudo-labels."""
    use_masks = settings.mode == "segmentation" or settings.pseudo_labels_from is None
    if use_masks and lesion_dir is None:
        raise InputError("lesion masks are needed (data/lesions/<PatientID>.mha)")
    cubes = shared_cubes(
        patients, cache, settings.input_size, ranks, lesion_dir=lesion_dir if use_masks else None
    )
    if use_masks:
        return cubes
    source = Path(str(settings.pseudo_labels_from))
    key = sha256_of(source)[:16]
    return pseudo_labels(
        load_segmenter(source), cubes, out_dir / "pseudo-labels", device, key, ranks
    )


@dataclass(frozen=True)
class _Objective:
    """The pretraining loss: Dice + cross-entropy of the lesions, plus, for the multitask,
    the class-weighted cross-entropy of the labels (the training rows' balanced weights)."""

    settings: PretrainSettings
    labels: np.ndarray | None
    train: np.ndarray
    device: torch.device

    @property
    def multitask(self) -> bool:
        return self.settings.mode == "multitask" and self.labels is not None

    @functools.cached_property
    def class_weight(self) -> torch.Tensor | None:
        if not self.multitask:
            return None
        assert self.labels is not None  # multitask
        classes = int(self.labels.max()) + 1
        weights = compute_class_weight(
            "balanced", classes=np.arange(classes), y=self.labels[self.train]
        )
        return torch.tensor(weights, dtype=torch.float32, device=self.device)

    def targets(self, rows: Sequence[int]) -> torch.Tensor:
        if not self.multitask:
            return torch.zeros(len(rows), dtype=torch.long, device=self.device)
        assert self.labels is not None
        return torch.from_numpy(self.labels[list(rows)]).to(self.device)

    def __call__(
        self,
        out: Any,
        masks: torch.Tensor,
        y: torch.Tensor,
        fraction: float = 1.0,
        total_weight: float | None = None,
    ) -> torch.Tensor:
        """The loss of a batch; of a team's share with `fraction` (share size x team size /
        batch size) and `total_weight` (the whole batch's class weights / team size), so
        that the team's averaged gradient is the whole batch's."""
        if self.settings.mode == "segmentation":
            return fraction * dice_ce(out, masks)
        logits, segmentation = out
        if total_weight is None:
            label_loss = F.cross_entropy(logits.float(), y, self.class_weight)
        else:
            assert self.class_weight is not None
            each = F.cross_entropy(logits.float(), y, reduction="none")
            label_loss = (self.class_weight[y] * each).sum() / total_weight
        return label_loss + fraction * dice_ce(segmentation, masks)

    def batch_weight(self, rows: Sequence[int]) -> float | None:
        if self.class_weight is None:
            return None
        return float(self.class_weight[self.targets(rows)].sum())


def _train_epoch(
    trainer: Trainer,
    objective: _Objective,
    cubes: Sequence[Cube],
    train: np.ndarray,
    team: Team | None,
    epoch: int,
) -> float:
    """One epoch over the training rows in a seeded order; the mean loss."""
    settings = objective.settings
    torch.manual_seed(seed_of(settings.seed, epoch, 1))
    shuffled = np.random.default_rng(seed_of(settings.seed, epoch)).permutation(train)
    augment = augmentation(settings.augment)
    total = 0.0
    for start in range(0, len(shuffled), settings.batch_size):
        batch = shuffled[start : start + settings.batch_size].tolist()
        rows, scale, fraction, total_weight = batch, 1.0, 1.0, None
        if team is not None:
            share = team.share(batch)
            rows, scale = (share, 1.0) if share else (batch[:1], 0.0)
            fraction = len(share) * team.size / len(batch)
            weight = objective.batch_weight(batch)
            total_weight = None if weight is None else weight / team.size
        seeds = [seed_of(settings.seed, epoch, 2, i) for i in rows]
        images, masks = _batch(cubes, rows, trainer.device, augment, seeds)

        def loss_of(
            net: nn.Module,
            images: torch.Tensor,
            masks: torch.Tensor,
            y: torch.Tensor,
            scale: float = scale,
            fraction: float = fraction,
            total_weight: float | None = total_weight,
        ) -> torch.Tensor:
            return scale * objective(net(images), masks, y, fraction, total_weight)

        value = trainer.step(loss_of, images, masks, objective.targets(rows))
        total += value * (len(batch) if team is None else len(batch) / team.size)
    if team is not None:
        total = team.total(total)
    return total / len(shuffled)


@torch.inference_mode()
def _evaluate(
    trainer: Trainer,
    objective: _Objective,
    cubes: Sequence[Cube],
    valid: np.ndarray,
    team: Team | None,
    net: nn.Module,
) -> Evaluation:
    """Validation on the held-out rows (a share of them on each rank of a team): the mean
    loss, Dice, and for the multitask the ROC-AUC and the mean of the two."""
    rows = valid.tolist() if team is None else team.share(valid.tolist())
    each = []  # (loss, Dice counts, P(positive) or NaN) per patient
    for index in rows:
        images, masks = _batch(cubes, [index], trainer.device)
        with trainer.autocast():
            out = net(images)
        loss = float(objective(out, masks, objective.targets([index])))
        segmentation = out[1] if objective.multitask else out
        score = float(out[0].float().softmax(dim=1)[0, 1]) if objective.multitask else math.nan
        each.append((loss, dice_counts(segmentation.float().cpu(), masks.cpu()), score))
    if team is not None:
        each = interleave(team.gather(each))
    dice = _dice_of([counts for _, counts, _ in each])
    extra = {"dice": dice}
    metric, scores = dice, [score for _, _, score in each]
    if objective.multitask:
        assert objective.labels is not None
        truth = objective.labels[valid]
        auc = float(roc_auc_score(truth, scores)) if len(set(truth)) > 1 else float("nan")
        extra["auc"] = auc
        metric = dice if np.isnan(auc) else (auc + dice) / 2
    return Evaluation(
        float(np.mean([loss for loss, _, _ in each])),
        metric,
        torch.tensor(scores if objective.multitask else []),
        extra,
    )
