"""The STOIC2021 winner's recipe: age and sex beside the image, a sigmoid head, the cosine
schedule, and the preset that sets them."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stoic_ct.cli import main as cli
from stoic_ct.convnext_training.cube_cache import task_patients
from stoic_ct.convnext_training.finetuning import finetune
from stoic_ct.convnext_training.recipes import PRESETS, FinetuneSettings
from stoic_ct.errors import StoicError
from stoic_ct.inference.fold_ensemble import FoldEnsemble, head_probabilities
from stoic_ct.inference.systems import ConvNeXtSystem
from stoic_ct.io.demographics import Demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.models.convnext3d import ConvNeXt3D
from stoic_ct.phantom import write_phantom_cohort
from stoic_ct.weights.model_files import CONVNEXT_SEVERE

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def severity_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 phantoms: severe when age + 100 x lesion burden > 85 (84 COVID-positive)."""
    return write_phantom_cohort(tmp_path_factory.mktemp("severity"), 120, seed=3)


def test_age_and_sex_beside_the_image_beat_the_image_alone_where_severity_follows_age(
    severity_cohort: Path, tmp_path: Path
) -> None:
    """The same micro ConvNeXt, run, folds and seeds, with and without metadata: the
    pooled out-of-fold AUC is higher with it (age decides severity here as much as the
    lesions do, and the image does not show age)."""
    patients, labels = task_patients(severity_cohort, "severe")
    auc = {}
    for metadata in (False, True):
        settings = FinetuneSettings(
            task="severe",
            size="micro",
            input_size=32,
            folds=2,
            epochs=30,
            batch_size=4,
            lr=1e-3,
            ema_decay=0.9,
            drop_path=0.0,
            augment="none",
            head="sigmoid",
            metadata=metadata,
        )
        result = finetune(
            patients,
            labels,
            settings,
            tmp_path / f"metadata-{metadata}",
            device=CPU,
            cache_dir=tmp_path / "cubes",
            progress=False,
        )
        auc[metadata] = result.metric
    print(
        f"pooled out-of-fold severity AUC: image only {auc[False]:.3f}, with age and sex "
        f"{auc[True]:.3f}"
    )
    assert auc[True] > auc[False] + 0.02, auc


def test_the_winner_preset_with_overrides_trains_a_model_that_reads_age_and_sex(
    phantom_cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    status = cli(
        [
            "finetune",
            str(phantom_cohort),
            *("--out", str(out), "--preset", "stoic2021-winner"),
            *("--size", "micro", "--input-size", "32", "--epochs", "2", "--folds", "2"),
            *("--batch-size", "4", "--augment", "none", "--device", "cpu"),
        ]
    )
    assert status == 0
    saved = json.loads((out / "settings.json").read_text())
    preset = PRESETS["stoic2021-winner"]
    for field in ("task", "head", "metadata", "lr", "weight_decay", "schedule", "lr_floor"):
        assert saved[field] == preset[field], field
    assert (saved["schedule_end"], saved["drop_path"]) == (20, 0.0)
    # The options given beside the preset win.
    assert (saved["size"], saved["input_size"], saved["epochs"]) == ("micro", 32, 2)

    ensemble = FoldEnsemble.load(out / "convnext3d_severe.pth", CONVNEXT_SEVERE, CPU)
    assert (ensemble.head, ensemble.metadata) == ("sigmoid", ("age", "sex"))
    volume = read_scan(next((phantom_cohort / "data" / "mha").glob("*.mha"))).volume
    cube = ensemble.cube(volume)
    young = ensemble.probabilities(cube, Demographics(age_years=30, sex="F"))
    old = ensemble.probabilities(cube, Demographics(age_years=90, sex="M"))
    assert young.shape == (2,) and young.sum() == pytest.approx(1.0)
    assert not np.allclose(young, old)  # age and sex reach the head
    with pytest.raises(StoicError, match="takes age and sex"):
        ensemble.probabilities(cube)
    system = ConvNeXtSystem(ensemble_for_covid(tmp_path, phantom_cohort), ensemble)
    by_age = [
        system.predict(volume, Demographics(age_years=a)).probabilities.severe for a in (30, 90)
    ]
    assert by_age[0] != by_age[1]


def ensemble_for_covid(tmp_path: Path, cohort: Path) -> FoldEnsemble:
    """A two-epoch covid fold ensemble without metadata (the older kind of file)."""
    patients, labels = task_patients(cohort, "covid")
    settings = FinetuneSettings(
        task="covid", size="micro", input_size=32, folds=2, epochs=1, augment="none"
    )
    result = finetune(patients, labels, settings, tmp_path / "covid", device=CPU, progress=False)
    return FoldEnsemble.load(result.ensemble, CONVNEXT_SEVERE, CPU)


def test_the_cosine_schedule_runs_from_lr_to_the_floor_at_its_end_epoch() -> None:
    settings = FinetuneSettings(
        lr=5e-5, schedule="cosine", lr_floor=1e-6, schedule_end=21, epochs=25
    )
    assert settings.learning_rate(0) == pytest.approx(5e-5)
    assert settings.learning_rate(10) == pytest.approx((5e-5 + 1e-6) / 2)
    assert settings.learning_rate(20) == pytest.approx(1e-6)
    assert settings.learning_rate(24) == pytest.approx(1e-6)
    rates = [settings.learning_rate(e) for e in range(21)]
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert FinetuneSettings(lr=5e-5).learning_rate(7) == 5e-5  # constant by default
    with pytest.raises(ValueError, match="floor"):
        FinetuneSettings(lr=1e-6, schedule="cosine", lr_floor=1e-5)


def test_a_sigmoid_head_gives_two_columns_and_needs_a_binary_task() -> None:
    logits = torch.tensor([[0.0], [2.0]])
    probabilities = head_probabilities(logits, "sigmoid")
    assert probabilities[:, 1].tolist() == pytest.approx([0.5, 1 / (1 + math.exp(-2))])
    assert probabilities.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="binary task"):
        FinetuneSettings(task="severity4", head="sigmoid")


def test_a_network_with_metadata_refuses_a_batch_without_it() -> None:
    model = ConvNeXt3D("micro", num_classes=1, metadata_dim=2).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    assert model(x, torch.rand(2, 2)).shape == (2, 1)
    assert isinstance(model.head, torch.nn.Linear)
    assert model.head.in_features == model.feature_dim + 2
    with pytest.raises(ValueError, match=r"takes \(2, 2\) metadata, not None"):
        model(x)
