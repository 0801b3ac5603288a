"""How much GPU memory a fine-tuning step takes (`finetune` on a GPU), modelled on this machine.

The model (stoic_ct.device_memory) builds the classifier as `finetune` builds it, with
the `Trainer`'s EMA copy and AdamW, and runs two of the Trainer's steps (`backward`, then
`update`; AdamW's state is made in the first) on fake tensors under float16 autocast, with
the gradients of a batch of `batch_size` cubes. Not modelled: the augmentation of each
cube, which runs before the step, and DDP's gradient buckets (one more copy of the
gradients) when ranks train a fold together.
"""

from __future__ import annotations

import torch

from stoic_ct.convnext_training.folds import build_classifier, weighted_loss
from stoic_ct.convnext_training.recipes import FinetuneSettings, class_names
from stoic_ct.convnext_training.trainer import Trainer
from stoic_ct.device_memory import TRAINING_WORKSPACES, MemoryEstimate, Program, Tracked, estimate


def finetune_step_peak(settings: FinetuneSettings) -> MemoryEstimate:
    """The peak GPU memory of one training step of `settings` (mixed precision, as on a GPU)."""
    with torch.device("meta"):
        model = build_classifier(settings, None)
    trainers: list[Trainer] = []

    def setup() -> list[Tracked]:
        trainer = Trainer(model, torch.device("cpu"), settings.optimiser, amp=True)
        trainers.append(trainer)
        return [trainer.ema, trainer.optimizer]

    def step() -> None:
        (trainer,) = trainers
        side, batch = settings.input_size, settings.batch_size
        images = torch.zeros((batch, 1, side, side, side))
        metadata = torch.zeros((batch, len(settings.metadata_names))) if settings.metadata else None
        target = torch.zeros(batch, dtype=torch.long)
        class_weight = torch.ones(len(class_names(settings.task)))

        def loss(
            net: torch.nn.Module, images: torch.Tensor, metadata: torch.Tensor | None
        ) -> torch.Tensor:
            logits = net(images, metadata).float()
            return weighted_loss(logits, target, class_weight, settings.head)

        trainer.backward(loss, images, metadata)
        trainer.update()

    stages = [("first training step", step), ("training step", step)]
    return estimate(Program([model], stages, setup), TRAINING_WORKSPACES)
