"""The training engine: which epoch is kept, what the checkpoints hold, the EMA."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from stoic_ct.convnext_training.recipes import FinetuneSettings
from stoic_ct.convnext_training.trainer import (
    BEST,
    LAST,
    Evaluation,
    OptimiserSettings,
    Trainer,
    fit,
    seed_of,
    start_run,
)
from stoic_ct.errors import InputError

CPU = torch.device("cpu")


def _trainer(ema_decay: float = 0.5) -> Trainer:
    torch.manual_seed(0)
    return Trainer(nn.Linear(3, 2), CPU, OptimiserSettings(lr=0.1, ema_decay=ema_decay))


def _run(out_dir: Path, scores: list[tuple[float, float]]) -> int:
    """fit() with scripted (metric, loss) per epoch; the best epoch it returns (0-based)."""
    trainer = _trainer()
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    current = {"epoch": -1}

    def train_epoch(epoch: int) -> float:
        current["epoch"] = epoch
        return trainer.step(lambda net, a, b: nn.functional.cross_entropy(net(a), b), x, y)

    def evaluate(net: nn.Module) -> Evaluation:
        metric, loss = scores[current["epoch"]]
        return Evaluation(loss, metric, torch.full((2, 2), float(current["epoch"])))

    outcome = fit(
        trainer,
        epochs=len(scores),
        train_epoch=train_epoch,
        evaluate=evaluate,
        out_dir=out_dir,
        metric_name="auc",
        title="test",
    )
    assert float(outcome.best_outputs[0, 0]) == outcome.best_epoch  # that epoch's outputs
    return outcome.best_epoch


@pytest.mark.parametrize(
    ("scores", "best"),
    [
        ([(0.7, 0.6), (0.9, 0.5), (0.8, 0.4)], 1),  # the metric decides
        ([(1.0, 0.69), (1.0, 0.30), (1.0, 0.45)], 1),  # a saturated AUC: the loss decides
        ([(math.nan, 0.7), (math.nan, 0.6), (0.5, 0.9)], 2),  # any number beats NaN
        ([(math.nan, 0.7), (math.nan, 0.6)], 1),  # NaN throughout: the loss decides
    ],
)
def test_the_best_epoch_is_the_highest_metric_then_the_lowest_loss(
    tmp_path: Path, scores: list[tuple[float, float]], best: int
) -> None:
    assert _run(tmp_path, scores) == best


def test_fit_writes_one_metrics_row_per_epoch_and_resumes_where_it_stopped(
    tmp_path: Path,
) -> None:
    _run(tmp_path, [(0.6, 0.5), (0.7, 0.4)])
    assert (tmp_path / BEST).exists() and (tmp_path / LAST).exists()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[1]["auc"]) == 0.7
    # Asked for 3 epochs now: the first two come from last.pt (their scores here are not
    # used), only the third is run, and it is compared with the kept best.
    assert _run(tmp_path, [(0.0, 9.0), (0.0, 9.0), (0.65, 0.3)]) == 1
    assert _run(tmp_path, [(0.0, 9.0)] * 3 + [(0.9, 0.3)]) == 3
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["auc"] for r in rows] == ["0.6", "0.7", "0.65", "0.9"]


def test_the_ema_starts_at_the_first_step_then_follows_by_its_decay() -> None:
    trainer = _trainer(ema_decay=0.5)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    weights = []
    for _ in range(2):
        trainer.step(lambda net, a, b: nn.functional.cross_entropy(net(a), b), x, y)
        weights.append(trainer.model.state_dict()["weight"].clone())
    assert not torch.equal(weights[0], weights[1])
    # torch's AveragedModel copies the weights on its first update, then averages.
    torch.testing.assert_close(
        trainer.averaged.state_dict()["weight"], 0.5 * weights[0] + 0.5 * weights[1]
    )


def test_a_non_finite_loss_stops_training_with_advice() -> None:
    trainer = _trainer()
    with pytest.raises(FloatingPointError, match="lower --lr"):
        trainer.step(lambda net, a: net(a).sum() * math.inf, torch.ones(1, 3))


def test_seeds_are_stable_and_distinct() -> None:
    assert seed_of(0, 1, 2) == seed_of(0, 1, 2)
    assert len({seed_of(0, f, e) for f in range(5) for e in range(50)}) == 250
    assert 0 <= seed_of(2**40, 7) < 2**63


def test_a_last_pt_from_before_the_tie_break_resumes(tmp_path: Path) -> None:
    assert _run(tmp_path, [(0.9, 0.5)]) == 0
    state = torch.load(tmp_path / LAST, weights_only=True)
    del state["best"]["loss"]  # as written by the version without the tie-break
    torch.save(state, tmp_path / LAST)
    # A tie cannot be broken by a loss that was not kept: the earlier epoch stays, as then.
    assert _run(tmp_path, [(0.9, 0.5), (0.9, 0.1)]) == 0
    assert _run(tmp_path, [(0.9, 0.5), (0.9, 0.1), (0.95, 0.4)]) == 2  # a higher metric wins


@dataclass(frozen=True)
class _Settings:
    lr: float = 1e-4
    epochs: int = 2


def test_a_run_folder_is_opened_once_and_resumed_only_with_the_same_settings(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    start_run(out, _Settings(), resume=False, what="pretraining")
    assert json.loads((out / "settings.json").read_text()) == {"lr": 1e-4, "epochs": 2}
    with pytest.raises(InputError, match="holds a pretraining run already: add --resume"):
        start_run(out, _Settings(lr=3e-4), resume=False, what="pretraining")
    with pytest.raises(InputError, match=r"other settings \(lr: 0.0001 then, 0.0003 now\)"):
        start_run(out, _Settings(lr=3e-4), resume=True, what="pretraining")
    start_run(out, _Settings(epochs=5), resume=True, what="pretraining")  # more epochs: fine
    assert json.loads((out / "settings.json").read_text())["epochs"] == 5


def test_fit_sets_each_epochs_learning_rate_before_it_runs(tmp_path: Path) -> None:
    """The schedule reaches the optimiser, epoch by epoch, on a resumed run too."""
    schedule = FinetuneSettings(lr=0.1, schedule="cosine", lr_floor=0.01, epochs=4)
    seen: list[float] = []

    def run(epochs: int) -> None:
        trainer = _trainer()
        x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)

        def train_epoch(epoch: int) -> float:
            seen.append(trainer.optimizer.param_groups[0]["lr"])
            return trainer.step(lambda net, a, b: nn.functional.cross_entropy(net(a), b), x, y)

        fit(
            trainer,
            epochs=epochs,
            train_epoch=train_epoch,
            evaluate=lambda net: Evaluation(0.5, 0.5, torch.zeros(1)),
            out_dir=tmp_path,
            metric_name="auc",
            title="test",
            learning_rate=schedule.learning_rate,
        )

    run(2)
    run(4)  # resumed after epoch 2
    assert seen == pytest.approx([schedule.learning_rate(e) for e in range(4)])
    assert seen[0] == pytest.approx(0.1) and seen[-1] == pytest.approx(0.01)
