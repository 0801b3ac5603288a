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

from collections.abc import Sequence
from dataclasses import dataclass
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
from stoic_ct.convnext_training.trainer import (
    BEST,
    Evaluation,
    NetworkSettings,
    Trainer,
    fit,
    seed_of,
    start_run,
)
from stoic_ct.errors import InputError, ModelFileError
from stoic_ct.io.cohort import Patient
from stoic_ct.models.convnext3d import (
    ConvNeXt3D,
    ConvNeXt3DSegmenter,
    UperNetHead3D,
    convnext3d_of,
    load_encoder_of_size,
    save_convnext3d,
)
from stoic_ct.preprocessing.cubes import (
    Cube,
    cached_cubes,
    load_batch,
    save_array,
)
from stoic_ct.weights.checkpoints import load_checkpoint
from stoic_ct.weights.model_files import CONVNEXT3D, problem

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


def hard_dice(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Dice of the argmax lesion masks over the whole batch (1 when both are empty)."""
    predicted, truth = logits.argmax(dim=1).bool(), target.bool()
    total = int(predicted.sum() + truth.sum())
    return 1.0 if total == 0 else 2 * int((predicted & truth).sum()) / total


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
    progress: bool = True,
) -> list[Cube]:
    """Each cube's lesion mask by `segmenter` (argmax), saved as OUT/<patient>.npy uint8."""
    out_dir.mkdir(parents=True, exist_ok=True)
    segmenter = segmenter.to(device)
    labelled = []
    for cube in tqdm(cubes, desc="pseudo-labels", unit="scan", disable=None if progress else True):
        path = out_dir / f"{cube.patient}.npy"
        if not path.exists():
            image, _ = cube.load()
            mask = segmenter(image[None].to(device)).argmax(dim=1)[0].to(torch.uint8).cpu()
            save_array(path, mask.numpy())
        labelled.append(Cube(cube.patient, cube.image, path))
    return labelled


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
    """Pretrain; returns OUT/pretrained.pth (see the module docstring).

    Args:
        labels: (N,) class indices for the multitask's classification (None for segmentation).
        lesion_dir: lesion masks <PatientID>.mha; for the multitask, used when no
            `pseudo_labels_from` segmenter is set.
        resume: continue the run OUT holds (its last.pt), with the same settings.

    Raises:
        InputError: when lesion masks or labels are missing, a setting does not fit, or
            OUT holds a run and `resume` is False or its settings differ.
    """
    if settings.mode == "multitask" and labels is None:
        raise InputError("the multitask needs class labels (reference.csv)")
    start_run(out_dir, settings, resume, "pretraining")
    cache = cache_dir or out_dir / "cubes"
    use_masks = settings.mode == "segmentation" or settings.pseudo_labels_from is None
    if use_masks and lesion_dir is None:
        raise InputError("lesion masks are needed (data/lesions/<PatientID>.mha)")
    cubes = cached_cubes(
        patients,
        cache,
        settings.input_size,
        lesion_dir=lesion_dir if use_masks else None,
        progress=progress,
    )
    if not use_masks:
        source = Path(str(settings.pseudo_labels_from))
        cubes = pseudo_labels(
            load_segmenter(source), cubes, out_dir / "pseudo-labels", device, progress
        )
    order = np.random.default_rng(settings.seed).permutation(len(cubes))
    held_out = max(1, len(cubes) // 5)
    valid, train = order[:held_out], order[held_out:]
    if len(train) == 0:
        raise InputError(f"{len(cubes)} patient(s) are too few to pretrain on (at least 2)")
    torch.manual_seed(seed_of(settings.seed))
    backbone = _backbone(settings)
    model: nn.Module
    if settings.mode == "segmentation":
        model = ConvNeXt3DSegmenter(backbone, num_classes=2)
    else:
        model = MultiTaskConvNeXt(backbone, classes=int(np.max(labels)) + 1)  # type: ignore[arg-type]
    trainer = Trainer(model, device, settings.optimiser)
    class_weight, targets = None, torch.zeros(len(cubes), dtype=torch.long, device=device)
    if labels is not None and settings.mode == "multitask":
        classes = int(labels.max()) + 1
        weights = compute_class_weight("balanced", classes=np.arange(classes), y=labels[train])
        class_weight = torch.tensor(weights, dtype=torch.float32, device=device)
        targets = torch.from_numpy(labels).to(device)

    def loss(out: Any, masks: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if settings.mode == "segmentation":
            return dice_ce(out, masks)
        logits, segmentation = out
        return F.cross_entropy(logits.float(), y, class_weight) + dice_ce(segmentation, masks)

    def loss_of(
        net: nn.Module, images: torch.Tensor, masks: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        return loss(net(images), masks, y)

    augment = augmentation(settings.augment)

    def train_epoch(epoch: int) -> float:
        torch.manual_seed(seed_of(settings.seed, epoch, 1))
        shuffled = np.random.default_rng(seed_of(settings.seed, epoch)).permutation(train)
        total = 0.0
        for start in range(0, len(shuffled), settings.batch_size):
            batch = shuffled[start : start + settings.batch_size].tolist()
            seeds = [seed_of(settings.seed, epoch, 2, i) for i in batch]
            images, masks = _batch(cubes, batch, device, augment, seeds)
            total += trainer.step(loss_of, images, masks, targets[batch]) * len(batch)
        return total / len(shuffled)

    @torch.inference_mode()
    def evaluate(net: nn.Module) -> Evaluation:
        losses, dice_logits, dice_masks, scores = [], [], [], []
        for index in valid.tolist():
            images, masks = _batch(cubes, [index], device)
            with trainer.autocast():
                out = net(images)
            losses.append(float(loss(out, masks, targets[[index]])))
            segmentation = out if settings.mode == "segmentation" else out[1]
            dice_logits.append(segmentation.float().cpu())
            dice_masks.append(masks.cpu())
            if settings.mode == "multitask":
                scores.append(float(out[0].float().softmax(dim=1)[0, 1]))
        dice = hard_dice(torch.cat(dice_logits), torch.cat(dice_masks))
        extra = {"dice": dice}
        metric = dice
        if settings.mode == "multitask" and labels is not None:
            truth = labels[valid]
            auc = float(roc_auc_score(truth, scores)) if len(set(truth)) > 1 else float("nan")
            extra["auc"] = auc
            metric = dice if np.isnan(auc) else (auc + dice) / 2
        return Evaluation(float(np.mean(losses)), metric, torch.tensor(scores), extra)

    fit(
        trainer,
        epochs=settings.epochs,
        train_epoch=train_epoch,
        evaluate=evaluate,
        out_dir=out_dir,
        metric_name="dice" if settings.mode == "segmentation" else "score",
        title=f"pretrain {settings.mode}",
        learning_rate=settings.learning_rate,
    )
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
