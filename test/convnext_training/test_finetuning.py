"""Fine-tuning the 3D ConvNeXt: learning on a synthetic cohort, resume, the fold ensemble."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from stoic_ct.convnext_training.cube_cache import task_patients
from stoic_ct.convnext_training.finetuning import finetune
from stoic_ct.convnext_training.recipes import FinetuneSettings
from stoic_ct.convnext_training.trainer import LAST
from stoic_ct.errors import InputError
from stoic_ct.inference.fold_ensemble import FoldEnsemble, save_fold_ensemble
from stoic_ct.io.cohort import Patient
from stoic_ct.models.convnext3d import ConvNeXt3D
from stoic_ct.phantom import write_phantom_cohort
from stoic_ct.weights.model_files import CONVNEXT_COVID
from stoic_ct.weights.network_files import save_convnext3d

CPU = torch.device("cpu")
# A micro ConvNeXt from random weights on 32^3 cubes of the 48-phantom cohort: two folds of
# 24 training patients, 20 epochs of 6 steps, under a minute on 2 cores. At lr 3e-4 or more
# this network collapses to a constant output; with 6 steps an epoch, augmentation slows
# learning past the budget (it is tested in test_augmentation).
LEARNING = FinetuneSettings(
    task="covid",
    size="micro",
    input_size=32,
    folds=2,
    epochs=20,
    batch_size=4,
    lr=1e-4,
    ema_decay=0.9,
    drop_path=0.0,
    augment="none",
)


@pytest.fixture(scope="module")
def cube_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cubes")


def test_a_micro_convnext_learns_lesion_burden_on_the_cpu(
    phantom_cohort: Path, cube_cache: Path, tmp_path: Path
) -> None:
    patients, labels = task_patients(phantom_cohort, "covid")
    result = finetune(
        patients,
        labels,
        LEARNING,
        tmp_path / "run",
        device=CPU,
        cache_dir=cube_cache,
        progress=False,
    )
    # Pooled out-of-fold: the folds' outputs must agree in scale, not only rank within a fold.
    assert result.metric > 0.85, (result.metric, result.fold_metrics)
    assert np.isfinite(result.probabilities).all() and (result.fold >= 0).all()
    rows = list(csv.DictReader((tmp_path / "run" / "oof.csv").open()))
    assert [r["PatientID"] for r in rows] == [p.id for p in patients]
    for fold in (1, 2):
        metrics = list(csv.DictReader((tmp_path / "run" / f"fold-{fold}" / "metrics.csv").open()))
        assert len(metrics) == LEARNING.epochs and "auc" in metrics[0]
        assert (tmp_path / "run" / f"fold-{fold}" / "learning-curves.png").stat().st_size > 1000
    # The shipped ensemble file holds both folds and loads for inference.
    ensemble = FoldEnsemble.load(result.ensemble, CONVNEXT_COVID, CPU)
    assert len(ensemble.models) == 2 and ensemble.task == "covid"


def test_shuffled_labels_teach_nothing(
    phantom_cohort: Path, cube_cache: Path, tmp_path: Path
) -> None:
    patients, labels = task_patients(phantom_cohort, "covid")
    shuffled = np.random.default_rng(5).permutation(labels)
    result = finetune(
        patients,
        shuffled,
        LEARNING,
        tmp_path / "run",
        device=CPU,
        cache_dir=cube_cache,
        progress=False,
    )
    assert abs(result.metric - 0.5) < 0.2, (result.metric, result.fold_metrics)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_cohort(tmp_path_factory.mktemp("small"), 10, seed=1)


TINY = FinetuneSettings(
    task="covid",
    size="micro",
    input_size=32,
    folds=2,
    epochs=3,
    batch_size=2,
    lr=1e-4,
    drop_path=0.1,
    augment="paper",
)


def test_a_resumed_run_matches_an_uninterrupted_one_epoch_for_epoch(
    small_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    patients, labels = task_patients(small_cohort, "covid")
    whole = finetune(patients, labels, TINY, tmp_path / "whole", device=CPU, progress=False)

    import stoic_ct.convnext_training.trainer as trainer

    saved = trainer._save
    calls = {"n": 0}

    def crash_after_two_epochs(value: object, path: Path) -> None:
        saved(value, path)
        if path.name == LAST:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # as Ctrl-C after epoch 2 of fold 1

    monkeypatch.setattr(trainer, "_save", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        finetune(patients, labels, TINY, tmp_path / "parts", device=CPU, progress=False)
    monkeypatch.setattr(trainer, "_save", saved)
    with pytest.raises(InputError, match="--resume"):
        finetune(patients, labels, TINY, tmp_path / "parts", device=CPU, progress=False)
    resumed = finetune(
        patients, labels, TINY, tmp_path / "parts", device=CPU, progress=False, resume=True
    )
    for fold in (1, 2):
        a = (tmp_path / "whole" / f"fold-{fold}" / "metrics.csv").read_text()
        b = (tmp_path / "parts" / f"fold-{fold}" / "metrics.csv").read_text()
        strip = [line.rsplit(",", 1)[0] for line in a.splitlines()]  # all but seconds
        assert strip == [line.rsplit(",", 1)[0] for line in b.splitlines()]
    np.testing.assert_array_equal(whole.probabilities, resumed.probabilities)
    a = torch.load(whole.ensemble, weights_only=True)["folds"]
    b = torch.load(resumed.ensemble, weights_only=True)["folds"]
    for fa, fb in zip(a, b, strict=True):
        for key in fa:
            assert torch.equal(fa[key], fb[key]), key


def test_resume_refuses_other_settings(small_cohort: Path, tmp_path: Path) -> None:
    patients, labels = task_patients(small_cohort, "covid")
    one = FinetuneSettings(**{**TINY.__dict__, "epochs": 1})
    finetune(patients, labels, one, tmp_path, device=CPU, progress=False)
    other = FinetuneSettings(**{**one.__dict__, "lr": 1e-3})
    with pytest.raises(InputError, match="lr: 0.0001 then, 0.001 now"):
        finetune(patients, labels, other, tmp_path, device=CPU, progress=False, resume=True)


def test_too_few_patients_per_class_is_a_clear_error(tmp_path: Path) -> None:
    patients = [Patient(str(i), tmp_path / f"{i}.mha", 0, 0) for i in range(6)]
    labels = np.array([0, 0, 0, 0, 0, 1])
    with pytest.raises(InputError, match="at least 2 patients of each class .* 5 x negative"):
        finetune(patients, labels, TINY, tmp_path, device=CPU, progress=False)


def test_fine_tuning_starts_from_an_encoder_file(small_cohort: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = ConvNeXt3D("micro")
    init = save_convnext3d(tmp_path / "init.pth", encoder, "micro", 32)
    settings = FinetuneSettings(**{**TINY.__dict__, "epochs": 1, "lr": 0.0, "init": str(init)})
    patients, labels = task_patients(small_cohort, "covid")
    result = finetune(patients, labels, settings, tmp_path / "run", device=CPU, progress=False)
    fold = torch.load(result.ensemble, weights_only=True)["folds"][0]
    for key, value in encoder.state_dict().items():
        assert torch.equal(fold[key], value), key  # lr 0: the encoder is the init's
    wrong = save_convnext3d(tmp_path / "tiny.pth", ConvNeXt3D("tiny"), "tiny", 32)
    settings = FinetuneSettings(**{**settings.__dict__, "init": str(wrong)})
    with pytest.raises(InputError, match="holds a ConvNeXt-tiny, not the --size micro"):
        finetune(patients, labels, settings, tmp_path / "other", device=CPU, progress=False)


def test_the_fold_ensemble_is_the_mean_of_the_folds_softmax(tmp_path: Path) -> None:
    folds = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model = ConvNeXt3D("micro", num_classes=2)
        with torch.no_grad():
            model.head.bias.copy_(torch.tensor([seed * 0.5, -seed * 0.3]))  # type: ignore[operator]
        folds.append(model)
    path = save_fold_ensemble(
        tmp_path / "convnext3d_covid.pth",
        folds=[m.state_dict() for m in folds],
        size="micro",
        input_size=32,
        window=(-1024.0, 600.0),
        task="covid",
        classes=("negative", "positive"),
    )
    ensemble = FoldEnsemble.load(path, CONVNEXT_COVID, CPU)
    cube = torch.rand((1, 32, 32, 32), generator=torch.Generator().manual_seed(0))
    each = [m.eval()(cube[None])[0].softmax(dim=0).detach().double().numpy() for m in folds]
    assert not np.allclose(each[0], each[1])
    np.testing.assert_allclose(ensemble.probabilities(cube), np.mean(each, axis=0), atol=1e-6)
