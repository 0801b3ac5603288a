"""What decides a fine-tuning run (`finetune`): FinetuneSettings, and the published recipes
as presets (`finetune --preset`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stoic_ct.convnext_training.cube_cache import FINETUNE_TASKS
from stoic_ct.convnext_training.trainer import NetworkSettings
from stoic_ct.inference.fold_ensemble import HEAD_TYPES, METADATA
from stoic_ct.io.cohort import GRADES


def class_names(task: str) -> tuple[str, ...]:
    """The classes of a task's softmax, in output order."""
    if task == "severity4":
        return GRADES
    return ("negative", "positive") if task == "covid" else ("not severe", "severe")


@dataclass(frozen=True, kw_only=True)
class FinetuneSettings(NetworkSettings):
    """Everything that decides a fine-tuning run (written to OUT/settings.json): the
    network settings, the task and the folds.

    Defaults are the paper's where it gives them (lr 5e-5, batch 4, EMA 0.99, 5 folds,
    224^3 inputs); epochs, weight decay and drop path are ours.
    """

    task: str = "covid"
    folds: int = 5
    head: str = "softmax"
    metadata: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in FINETUNE_TASKS:
            raise ValueError(f"task must be one of {', '.join(FINETUNE_TASKS)}, not {self.task!r}")
        if self.folds < 2:
            raise ValueError("folds must be >= 2")
        if self.head not in HEAD_TYPES:
            raise ValueError(f"head must be one of {', '.join(HEAD_TYPES)}, not {self.head!r}")
        if self.head == "sigmoid" and len(class_names(self.task)) != 2:
            raise ValueError(f"a sigmoid head needs a binary task, not {self.task}")

    @property
    def metadata_names(self) -> tuple[str, ...]:
        """What the network takes beside the image: ("age", "sex") or nothing."""
        return METADATA if self.metadata else ()


# Values from the STOIC2021 severity winner's final-phase code (Kienzle et al., Augsburg:
# training/algorithm/config/modelconfig.py and its model file); the rest are ours.
PRESETS: dict[str, dict[str, Any]] = {
    "stoic2021-winner": {
        "task": "severe",
        "size": "tiny",
        "input_size": 256,
        "head": "sigmoid",
        "metadata": True,
        "lr": 5e-5,
        "weight_decay": 1e-8,
        "schedule": "cosine",
        "lr_floor": 1e-6,
        "schedule_end": 20,
        "drop_path": 0.0,
        "epochs": 25,  # ours: the code decays over the first 20; we add five at the floor
    }
}
