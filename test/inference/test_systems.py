"""The systems a model folder holds (system.json) and process.py --system convnext3d |
ensemble, and the pretraining that finetune starts from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import process
from helpers import write_case, write_fold_ensemble
from stoic_ct.convnext_training.cube_cache import LESION_DIR, task_patients
from stoic_ct.convnext_training.pretraining import PretrainSettings, load_segmenter, pretrain
from stoic_ct.errors import InputError, StoicError
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.inference.systems import (
    ConvNeXtSystem,
    EnsembleSystem,
    balaitous_part,
    load_model_folder,
    read_ensemble_weights,
)
from stoic_ct.io.cohort import read_cohort
from stoic_ct.io.demographics import Demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.preprocessing.lung_segmentation import threshold_lungs
from stoic_ct.weights.system_record import origin, write_system_record

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("systems") / "model"
    shutil.copytree(tiny_model_dir, directory)
    write_fold_ensemble(directory, "covid", (1, 2))
    write_fold_ensemble(directory, "severe", (3,))
    return directory


def _run(model_dir: Path, work: Path, kind: str | None) -> tuple[int, dict[str, float]]:
    write_case(work / "input")
    status = process.main(
        [
            "--input", str(work / "input"), "--output", str(work / "output"),
            "--model-dir", str(model_dir), "--device", "cpu",
            *(("--system", kind) if kind else ()),
        ]
    )  # fmt: skip
    outputs = {p.name: json.loads(p.read_text()) for p in (work / "output").glob("*.json")}
    return status, outputs


def test_process_py_runs_the_convnext_and_the_ensemble(
    model_dir: Path, tmp_path: Path, tiny_model: Balaitous
) -> None:
    status, convnext = _run(model_dir, tmp_path / "c", "convnext3d")
    assert status == 0
    volume = read_scan(next((tmp_path / "c" / "input" / "images" / "ct").iterdir())).volume
    direct = ConvNeXtSystem.from_model_dir(model_dir).predict(volume, Demographics())
    assert convnext["probability-covid-19.json"] == pytest.approx(direct.probabilities.covid)
    assert convnext["probability-severe-covid-19.json"] == pytest.approx(
        direct.probabilities.severe
    )
    status, balaitous = _run(model_dir, tmp_path / "b", "balaitous")
    assert status == 0
    (model_dir / "ensemble.json").write_text(
        json.dumps(
            {
                "covid": {"balaitous": 1, "convnext3d": 3},
                "severe": {"balaitous": 1, "convnext3d": 0},
            }
        )
    )
    status, ensemble = _run(model_dir, tmp_path / "e", "ensemble")
    assert status == 0
    name = "probability-covid-19.json"
    assert ensemble[name] == pytest.approx(0.25 * balaitous[name] + 0.75 * convnext[name])
    name = "probability-severe-covid-19.json"
    assert ensemble[name] == pytest.approx(balaitous[name])


def test_the_folder_says_which_system_runs(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """load_model_folder runs what system.json names; --system overrides it, and says so;
    a lung mask goes to Balaitous inside the ensemble, and the ConvNeXt refuses one."""
    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    weights = {
        "covid": {"balaitous": 1, "convnext3d": 1},
        "severe": {"balaitous": 0, "convnext3d": 1},
    }
    (folder / "ensemble.json").write_text(json.dumps(weights))
    assert isinstance(load_model_folder(folder)[0], Balaitous)  # no record: the published
    write_system_record(folder, "convnext3d", "vit", origin("test"))
    loaded, choice = load_model_folder(folder)
    assert isinstance(loaded, ConvNeXtSystem) and choice.system == "convnext3d"
    volume = read_scan(write_case(tmp_path / "case")).volume
    with pytest.raises(StoicError, match="the convnext3d system takes no lung mask"):
        loaded.predict(volume, Demographics(), lung_labels=volume)
    write_system_record(folder, "ensemble", "vit", origin("test"))
    ensemble, _ = load_model_folder(folder, lung_masks=threshold_lungs)
    assert isinstance(ensemble, EnsembleSystem)
    result = ensemble.predict(volume, Demographics())
    seen = balaitous_part(result)
    assert seen is not None and seen.slices.lung_found
    caplog.clear()
    overridden, choice = load_model_folder(folder, system="balaitous")
    assert isinstance(overridden, Balaitous) and choice.system == "balaitous"
    assert f"--system balaitous overrides what {folder}/system.json holds: ensemble" in caplog.text
    status, outputs = _run(folder, tmp_path / "no-flag", None)
    assert status == 0 and outputs["probability-severe-covid-19.json"] == pytest.approx(
        result.probabilities.severe, abs=1e-6
    )


def test_missing_or_bad_ensemble_files_are_named(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "empty"
    shutil.copytree(model_dir, empty)
    (empty / "ensemble.json").unlink(missing_ok=True)
    status, outputs = _run(empty, tmp_path / "w", "ensemble")
    assert status == 1 and outputs == {}
    assert "ensemble.json: is missing" in caplog.text
    (empty / "convnext3d_severe.pth").unlink()
    status, outputs = _run(empty, tmp_path / "x", "convnext3d")
    assert status == 1 and outputs == {}
    assert "convnext3d_severe.pth: is missing" in caplog.text
    bad = tmp_path / "bad.json"
    bad.write_text('{"covid": {"balaitous": -1, "convnext3d": 1}, "severe": {}}')
    with pytest.raises(Exception, match="the covid weights must be >= 0"):
        read_ensemble_weights(bad)


def test_segmentation_then_multitask_pretraining_feed_finetune(
    phantom_cohort: Path, tmp_path: Path
) -> None:
    settings = PretrainSettings(
        mode="segmentation", size="micro", input_size=32, epochs=2, batch_size=4, lr=1e-3,
        ema_decay=0.5, drop_path=0.0, augment="paper",
    )  # fmt: skip
    patients = read_cohort(phantom_cohort)[:12]
    segmentation = pretrain(
        patients, None, settings, tmp_path / "seg", device=CPU,
        lesion_dir=phantom_cohort / LESION_DIR, progress=False,
    )  # fmt: skip
    rows = (tmp_path / "seg" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,val_loss,dice") and len(rows) == 3
    losses = [float(r.split(",")[1]) for r in rows[1:]]
    assert losses[1] < losses[0]  # it learns
    segmenter = load_segmenter(segmentation)
    assert segmenter(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    with pytest.raises(InputError, match="holds a pretraining run already"):
        pretrain(
            patients, None, settings, tmp_path / "seg", device=CPU,
            lesion_dir=phantom_cohort / LESION_DIR, progress=False,
        )  # fmt: skip
    chosen, labels = task_patients(phantom_cohort, "covid")
    multitask = PretrainSettings(
        **{**settings.__dict__, "mode": "multitask", "init": str(segmentation),
           "pseudo_labels_from": str(segmentation)}
    )  # fmt: skip
    path = pretrain(
        chosen[:12], labels[:12], multitask, tmp_path / "multi", device=CPU, lesion_dir=None,
        progress=False,
    )  # fmt: skip
    assert len(list((tmp_path / "multi" / "pseudo-labels").glob("*.npy"))) == 12
    header = (tmp_path / "multi" / "metrics.csv").read_text().splitlines()[0]
    assert "dice" in header and "auc" in header
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["pretraining"] == "multitask" and checkpoint["size"] == "micro"
