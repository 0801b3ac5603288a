"""The training engine shared by `finetune` and `pretrain`: AdamW, EMA, AMP, resumable epochs.

`Trainer` owns a network, its exponential moving average, the optimiser and the AMP scaler
on one device. `fit` runs epochs with it and keeps, in one folder:

    last.pt              everything needed to resume: the four states, history, best epoch
    best.pt              the EMA weights of the best epoch (highest metric, then lowest
                         validation loss): the ones used afterwards
    metrics.csv          one row per epoch
    learning-curves.png  losses and the metric per epoch

Each epoch draws its randomness from seeds fixed by (run seed, fold, epoch), and the
checkpoint holds every state that carries over, so a run resumed from `last.pt` repeats
an uninterrupted one exactly, epoch for epoch (on the same device and software).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stoic_ct.atomic import atomic_write, atomic_write_text
from stoic_ct.convnext_training.augmentation import AUGMENTATIONS
from stoic_ct.distributed import Team
from stoic_ct.errors import InputError
from stoic_ct.models.convnext3d import SIZES
from stoic_ct.plots import Panel, Series, fitted_range, line_panels

logger = logging.getLogger(__name__)

# The stem's gradient (one input channel) comes out of conv3d's backward with strides that
# DDP's bucket does not expect; DDP copies that one small tensor and warns at every step.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

SETTINGS_FILE = "settings.json"

LAST, BEST = "last.pt", "best.pt"
SCHEDULES = ("constant", "cosine")


def start_run(out_dir: Path, settings: Any, resume: bool, what: str) -> None:
    """Open a run folder: write OUT/settings.json from the `settings` dataclass, or, when it
    is there already, continue only with --resume and the same settings (epochs aside).

    Raises:
        InputError: naming the folder, when it holds a run and `resume` is False, or when
            the run it holds was made with other settings.
    """
    path = out_dir / SETTINGS_FILE
    now = asdict(settings)
    defaults = asdict(type(settings)())
    if path.exists():
        if not resume:
            raise InputError(
                f"holds a {what} run already: add --resume to continue it, or choose another --out",
                out_dir,
            )
        before = json.loads(path.read_text())
        # A setting newer than the run's file counts as its default.
        changed = [k for k in now if k != "epochs" and before.get(k, defaults.get(k)) != now[k]]
        if changed:
            raise InputError(
                "holds a run with other settings ("
                + ", ".join(f"{k}: {before.get(k)!r} then, {now[k]!r} now" for k in changed)
                + "); only --epochs may change on --resume",
                out_dir,
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(now, indent=2) + "\n"
    atomic_write_text(path, text)


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, fold, epoch, sample...), stable across runs."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + part + 1442695040888963407) % (1 << 63)
    return value


@dataclass(frozen=True)
class OptimiserSettings:
    """AdamW and EMA settings (Kienzle et al.: lr 5e-5, EMA 0.99-0.995).

    Weight decay applies to weights of two or more dimensions only, not to biases, norms
    or layer scales (as ConvNeXt's training recipe).
    """

    lr: float = 5e-5
    weight_decay: float = 0.05
    ema_decay: float = 0.99


@dataclass(frozen=True, kw_only=True)
class NetworkSettings:
    """What every ConvNeXt training run (`finetune`, `pretrain`) decides about the network,
    its input and its optimisation; each run's settings add their own fields.

    Attributes:
        size: the ConvNeXt size (stoic_ct.models.convnext3d.SIZES).
        input_size: the side of the input cube, voxels (a multiple of 32).
        epochs, batch_size: of the run.
        lr, weight_decay, ema_decay: AdamW and the weights' moving average.
        drop_path: stochastic depth rate.
        augment: the augmentation preset (stoic_ct.convnext_training.augmentation).
        seed: of every random draw of the run.
        init: the checkpoint the network starts from (None: random weights).
        schedule: "constant" (lr throughout) or "cosine": from lr at the first epoch down
            to lr_floor at epoch schedule_end (default: the last epoch), set per epoch,
            and lr_floor from then on.
    """

    size: str = "tiny"
    input_size: int = 224
    epochs: int = 30
    batch_size: int = 4
    lr: float = 5e-5
    weight_decay: float = 0.05
    ema_decay: float = 0.99
    drop_path: float = 0.1
    augment: str = "paper"
    seed: int = 0
    init: str | None = None
    schedule: str = "constant"
    lr_floor: float = 1e-6
    schedule_end: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}"
            )
        if self.schedule_end is not None and self.schedule_end < 1:
            raise ValueError(f"the schedule's end epoch must be >= 1, not {self.schedule_end}")
        if self.schedule == "cosine" and not 0 <= self.lr_floor <= self.lr:
            raise ValueError(
                f"the learning rate floor must be in [0, lr = {self.lr:g}], not {self.lr_floor:g}"
            )
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, not {self.size!r}")
        if self.input_size < 32 or self.input_size % 32:
            raise ValueError(f"input size must be a multiple of 32, not {self.input_size}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(
                f"augment must be one of {', '.join(AUGMENTATIONS)}, not {self.augment!r}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")

    @property
    def optimiser(self) -> OptimiserSettings:
        """The Trainer's part of the settings."""
        return OptimiserSettings(self.lr, self.weight_decay, self.ema_decay)

    def learning_rate(self, epoch: int) -> float:
        """The learning rate of 0-based `epoch` under the schedule."""
        if self.schedule == "constant":
            return self.lr
        end = self.schedule_end or self.epochs
        progress = min(epoch / (end - 1), 1.0) if end > 1 else 1.0
        return self.lr_floor + (self.lr - self.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """A network, its EMA copy, AdamW and the AMP scaler on one device; with a `team`, the
    network steps under DistributedDataParallel with the team's other ranks (which start
    from the first rank's weights). `all_used`: whether the forward uses every parameter
    (not so for a segmenter, whose encoder keeps a class head it does not use)."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        settings: OptimiserSettings,
        team: Team | None = None,
        all_used: bool = True,
        amp: bool | None = None,
    ):
        self.device = device
        on_device = all(p.device == device for p in model.parameters())
        self.model = model if on_device else model.to(device)  # (fake tensors cannot move)
        self.network: nn.Module = self.model
        if team is not None:
            self.network = DistributedDataParallel(
                self.model,
                device_ids=[device] if device.type == "cuda" else None,
                process_group=team.group,
                find_unused_parameters=not all_used,
            )
        average = get_ema_multi_avg_fn(settings.ema_decay)  # type: ignore[no-untyped-call]
        self.ema = AveragedModel(self.model, multi_avg_fn=average, use_buffers=True)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": settings.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=settings.lr,
        )
        # Mixed precision on a GPU (`amp` None): float16 autocast with a loss scaler (T4s have
        # no bf16). The memory model asks for autocast on the CPU, where no scaler runs.
        self.amp = device.type == "cuda" if amp is None else amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and device.type == "cuda")

    def autocast(self) -> torch.autocast:
        """The context of forward passes: float16 autocast on a GPU, float32 otherwise."""
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def set_learning_rate(self, lr: float) -> None:
        """Set AdamW's learning rate (for the epoch about to run)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(
        self, compute_loss: Callable[..., torch.Tensor], *inputs: torch.Tensor | None
    ) -> float:
        """One optimiser step on `compute_loss(model, *inputs)`, then the EMA update.

        Returns the loss value.
        """
        loss = self.backward(compute_loss, *inputs)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss.item()}; lower --lr")
        self.update()
        self.ema.update_parameters(self.model)
        return float(loss.detach())

    def backward(
        self, compute_loss: Callable[..., torch.Tensor], *inputs: torch.Tensor | None
    ) -> torch.Tensor:
        """The forward pass under autocast and the (scaled) backward; returns the loss."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = compute_loss(self.network, *inputs)
        self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        return loss

    def update(self) -> None:
        """AdamW's step on the gradients (unscaled, and skipped when they overflowed)."""
        self.scaler.step(self.optimizer)
        self.scaler.update()

    @property
    def averaged(self) -> nn.Module:
        """The EMA network, in evaluation mode: what is validated and kept."""
        module: nn.Module = self.ema.module
        return module.eval()

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


@dataclass(frozen=True)
class Evaluation:
    """One validation pass: the loss, the metric that picks the best epoch, the outputs.

    Attributes:
        outputs: (N, C) what the network gave for the validation samples (probabilities).
        extra: more numbers for the log (e.g. Dice), by name.
    """

    loss: float
    metric: float
    outputs: torch.Tensor
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FitOutcome:
    """The best epoch (0-based), its metric and validation outputs, and every epoch's row."""

    best_epoch: int
    best_metric: float
    best_outputs: torch.Tensor
    history: list[dict[str, float]]


def _better(evaluation: Evaluation, best: dict[str, Any]) -> bool:
    """A higher metric wins; an equal one wins with a lower validation loss.

    The tie-break matters on small validation sets, where the AUC reaches 1.0 early while
    the outputs still sit near 0.5. A NaN metric counts as the lowest.
    """
    if best["metric"] is None:
        return True

    def rank(metric: float, loss: float) -> tuple[float, float]:
        return (-math.inf if math.isnan(metric) else metric, -loss)

    # last.pt files written before the tie-break hold no loss: their best then wins ties.
    before = rank(best["metric"], best.get("loss", -math.inf))
    return rank(evaluation.metric, evaluation.loss) > before


def fit(
    trainer: Trainer,
    *,
    epochs: int,
    train_epoch: Callable[[int], float],
    evaluate: Callable[[nn.Module], Evaluation],
    out_dir: Path,
    metric_name: str,
    title: str,
    learning_rate: Callable[[int], float] | None = None,
    writes: bool = True,
) -> FitOutcome:
    """Run epochs 0..epochs-1, resuming from out_dir/last.pt when it is there.

    Args:
        train_epoch: trains one epoch (given its 0-based number); returns the mean loss.
        learning_rate: the optimiser's learning rate for each 0-based epoch, set before it
            runs (NetworkSettings.learning_rate); None keeps the optimiser's.
        evaluate: validates the EMA network; a higher metric is better.
        title: names the run in logs and on the learning-curve plot.
        writes: whether this process writes the folder's files (one rank of a team does).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"epoch": -1, "metric": None, "outputs": torch.zeros(0)}
    if (out_dir / LAST).exists():
        state = torch.load(out_dir / LAST, map_location=trainer.device, weights_only=True)
        trainer.load_state_dict(state["trainer"])
        history, best = state["history"], state["best"]
        logger.info("%s: resumed after epoch %d of %d", title, len(history), epochs)
    for epoch in range(len(history), epochs):
        started = time.perf_counter()
        if learning_rate is not None:
            trainer.set_learning_rate(learning_rate(epoch))
        train_loss = train_epoch(epoch)
        evaluation = evaluate(trainer.averaged)
        row = {
            "epoch": float(epoch + 1),
            "train_loss": train_loss,
            "val_loss": evaluation.loss,
            metric_name: evaluation.metric,
            **evaluation.extra,
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        if _better(evaluation, best):
            best = {
                "epoch": epoch,
                "metric": evaluation.metric,
                "loss": evaluation.loss,
                "outputs": evaluation.outputs.cpu(),
            }
            if writes:
                _save(trainer.averaged.state_dict(), out_dir / BEST)
        if writes:
            state = {"trainer": trainer.state_dict(), "history": history, "best": best}
            _save(state, out_dir / LAST)
            write_metrics(history, out_dir, metric_name, title)
            logger.info(
                "%s epoch %d/%d: train loss %.4f, validation loss %.4f, %s %.4f%s (%.1f s)",
                title,
                epoch + 1,
                epochs,
                train_loss,
                evaluation.loss,
                metric_name,
                evaluation.metric,
                " (best)" if best["epoch"] == epoch else "",
                row["seconds"],
            )
    if best["epoch"] < 0:
        raise ValueError(f"{title}: no epoch was run (epochs = {epochs})")
    return FitOutcome(int(best["epoch"]), float(best["metric"]), best["outputs"], history)


def _save(value: object, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(value, f))


def write_metrics(history: list[dict[str, float]], out_dir: Path, metric: str, title: str) -> None:
    """metrics.csv (one row per epoch) and learning-curves.png (losses; the metric)."""
    columns = list(history[0])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: f"{v:.6g}" for k, v in row.items()})
    atomic_write_text(out_dir / "metrics.csv", text.getvalue())
    epochs = [row["epoch"] for row in history]
    x_range = (0.0, max(max(epochs), 1.0))
    losses = [row[k] for row in history for k in ("train_loss", "val_loss")]
    metrics = [row[metric] for row in history]
    line_panels(
        [
            Panel(
                f"{title}: loss",
                "epoch",
                "loss",
                [
                    Series(
                        "training",
                        np.asarray(epochs),
                        np.asarray([r["train_loss"] for r in history]),
                    ),
                    Series(
                        "validation (EMA)",
                        np.asarray(epochs),
                        np.asarray([r["val_loss"] for r in history]),
                    ),
                ],
                x_range,
                fitted_range(losses, floor=0.0),
                diagonal=False,
            ),
            Panel(
                f"{title}: {metric}",
                "epoch",
                metric,
                [Series(f"validation (EMA) {metric}", np.asarray(epochs), np.asarray(metrics))],
                x_range,
                fitted_range(metrics),
                diagonal=False,
            ),
        ],
        out_dir / "learning-curves.png",
    )
