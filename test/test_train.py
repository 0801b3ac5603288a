"""The retraining chain on a synthetic cohort, through the commands a user runs:
extract-features -> fit-heads -> evaluate -> process.py, shards, and train.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import train
from helpers import assert_process_py_uses
from stoic_ct.cli import main as cli
from stoic_ct.head_training.features import FeatureTable
from stoic_ct.phantom import write_phantom_cohort
from timings import Timings

REPOSITORY = Path(train.__file__).resolve().parent
FAST_EVALUATION = ["--folds", "4", "--repeats", "2", "--inner-folds", "3"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny model files, whose heads fit-heads replaces."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("retrained") / "model"))


@pytest.fixture(scope="module")
def features(
    phantom_cohort: Path,
    cohort_masks: Path,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """extract-features on the whole cohort, with the threshold lung masks."""
    out = tmp_path_factory.mktemp("features") / "features.npz"
    status = cli(
        [
            "extract-features",
            str(phantom_cohort),
            "--out",
            str(out),
            "--lung-masks",
            str(cohort_masks),
            "--model-dir",
            str(model_dir),
            "--device",
            "cpu",
        ]
    )
    assert status == 0
    return out


def test_the_chain_learns_and_process_py_uses_the_new_heads(
    features: Path, model_dir: Path, tmp_path: Path
) -> None:
    assert cli(["fit-heads", str(features), "--out", str(model_dir), "--inner-folds", "3"]) == 0
    assert (
        cli(["evaluate", str(features), "--out", str(tmp_path / "report"), *FAST_EVALUATION]) == 0
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    for task in ("covid", "severe"):
        assert report["tasks"][task]["heads"]["combined"]["auc"] > 0.9, task

    # The folder holds the encoders: fit-heads recorded what it now holds.
    record = json.loads((model_dir / "system.json").read_text())
    assert (record["system"], record["encoder"]) == ("balaitous", "vit")
    assert record["history"][-1]["cohort"] == {"patients": 48}
    assert record["history"][-1]["command"].startswith("python -m stoic_ct fit-heads ")
    assert_process_py_uses(model_dir, tmp_path)


def test_two_shards_merged_equal_one_run(
    phantom_cohort: Path,
    cohort_masks: Path,
    model_dir: Path,
    features: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Shard 1/2 by --shard, shard 2/2 as a Kubernetes indexed Job's second pod sees it."""
    shards = []
    for index in (1, 2):
        shard_option = ["--shard", f"{index}/2"] if index == 1 else []
        if index == 2:
            monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
            monkeypatch.setenv("WORLD_SIZE", "2")
        out = tmp_path / f"shard-{index}.npz"
        common = [
            "--lung-masks",
            str(cohort_masks),
            "--model-dir",
            str(model_dir),
            "--device",
            "cpu",
        ]
        status = cli(
            [
                "extract-features",
                str(phantom_cohort),
                "--out",
                str(out),
                *shard_option,
                "--cache",
                str(tmp_path / f"cache-{index}"),
                *common,
            ]
        )
        assert status == 0
        shards.append(str(out))
    assert "shard 2/2, from JOB_COMPLETION_INDEX=1 and WORLD_SIZE=2" in caplog.text
    assert cli(["merge-features", shards[1], "--out", str(tmp_path / "half.npz")]) == 1
    assert "shard(s) 1/2 of 2 are missing" in caplog.text
    assert cli(["merge-features", *shards, "--out", str(tmp_path / "merged.npz")]) == 0
    merged, whole = FeatureTable.load(tmp_path / "merged.npz"), FeatureTable.load(features)
    assert [len(FeatureTable.load(Path(s))) for s in shards] == [24, 24]
    for name in FeatureTable.ARRAYS:
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name), err_msg=name)


def test_train_py_on_shuffled_labels_finds_nothing_to_learn(
    cohort_masks: Path, model_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The same 48 scans (same seed) with their label rows permuted across patients.
    cohort = write_phantom_cohort(tmp_path / "input", 48, seed=1, shuffle_labels=True)
    status = train.main(
        [
            "--input",
            str(cohort),
            "--output",
            str(tmp_path / "output"),
            "--scratch",
            str(tmp_path / "scratch"),
            "--model-dir",
            str(model_dir),
            "--lung-masks",
            str(cohort_masks),
            *("--system", "balaitous", "--devices", "cpu"),
            "--evaluate",
            "--folds",
            "4",
            "--repeats",
            "2",
        ]
    )
    assert status == 0
    report = json.loads((tmp_path / "output" / "report" / "report.json").read_text())
    for task in ("covid", "severe"):
        # 48 and 33 patients: a chance AUC has a standard error near 0.09 and 0.10.
        assert abs(report["tasks"][task]["heads"]["combined"]["auc"] - 0.5) < 0.25, task
    assert (tmp_path / "output" / "balaitous.npz").exists()
    assert json.loads((tmp_path / "output" / "heads.json").read_text())["data"]["patients"] == 48

    record = json.loads((tmp_path / "output" / "system.json").read_text())
    assert record["system"] == "balaitous" and record["history"][-1]["cohort"]["scans"] == 48
    assert set(record["history"][-1]["auc"]["balaitous"]) == {"covid", "severe"}

    installed = Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("install") / "model"))
    (installed / "system.json").unlink(missing_ok=True)
    assert cli(["install-heads", str(tmp_path / "output"), "--model-dir", str(installed)]) == 0
    installed_record = json.loads((installed / "system.json").read_text())
    assert installed_record["system"] == "balaitous"
    assert installed_record["history"][-1]["what"] == f"heads installed from {tmp_path / 'output'}"


def test_train_py_says_what_is_wrong_with_the_input(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert train.main(["--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 1
    assert f"{tmp_path}: has no data/mha/ folder; expected the STOIC layout" in caplog.text
    assert not (tmp_path / "out").exists()


def _train_arguments(
    cohort: Path, masks: Path, model_dir: Path, output: Path, scratch: Path
) -> list[str]:
    return [
        *("--system", "ensemble", "--input", str(cohort)),
        *("--output", str(output), "--scratch", str(scratch), "--model-dir", str(model_dir)),
        *("--lung-masks", str(masks), "--folds", "4", "--repeats", "2"),
        *("--convnext", "size=micro", "input_size=32", "epochs=2", "folds=2", "augment=none"),
    ]


def test_train_py_trains_both_systems_into_a_model_folder_for_the_ensemble(
    phantom_cohort: Path, cohort_masks: Path, model_dir: Path, tmp_path: Path, timings: Timings
) -> None:
    """train.py --system ensemble on 48 phantoms with tiny models, on two devices (two CPU
    processes, started by --devices): heads, both fold ensembles and ensemble.json in one
    folder with which process.py --system ensemble runs; a second run resumes from the
    scratch folder; `torchrun --standalone --nproc_per_node=2 train.py` and one process
    make the same folder."""
    output, scratch = tmp_path / "output", tmp_path / "scratch"
    arguments = _train_arguments(phantom_cohort, cohort_masks, model_dir, output, scratch)
    started = time.perf_counter()
    assert train.main([*arguments, "--devices", "cpu,cpu"]) == 0
    timings.since("train.py --system ensemble, 48 phantoms, tiny: --devices cpu,cpu", started)
    model_files = {
        "balaitous.npz",
        "convnext3d_covid.pth",
        "convnext3d_severe.pth",
        "ensemble.json",
        "unet_r231-d5d2fc3d.pth",
        "vitl_16_ct.pth",
        "vitl_16_pt22k.pth",
    }
    listed = {line.split("  ")[1] for line in (output / "MANIFEST").read_text().splitlines()}
    assert listed == {*model_files, "system.json"}
    assert (output / "RANDOM_WEIGHTS").exists()  # tiny random encoders stay marked
    weights = json.loads((output / "ensemble.json").read_text())
    for task in ("covid", "severe"):
        assert weights[task]["balaitous"] + weights[task]["convnext3d"] == pytest.approx(1.0)
    summary = json.loads((output / "training.json").read_text())
    assert summary["devices"] == ["cpu", "cpu"]
    assert summary["convnext"]["severe"]["metadata"] is True  # the winner's recipe
    assert summary["convnext"]["severe"]["input_size"] == 32  # with the given values

    # What train.py wrote is what runs: process.py and predict without --system score with
    # the ensemble that system.json names.
    record = json.loads((output / "system.json").read_text())
    assert record["system"] == "ensemble" and set(record["files"]) == model_files
    assert record["history"][-1]["command"].startswith("train.py --system ensemble")
    log = assert_process_py_uses(output, tmp_path / "job")
    assert "model folder " in log and "system ensemble (encoder vit)" in log
    job_image = tmp_path / "job" / "input" / "images" / "ct" / "1234.mha"
    table = tmp_path / "predicted.csv"
    assert cli(["predict", str(job_image), "--model-dir", str(output), "--csv", str(table)]) == 0
    (row,) = list(csv.DictReader(table.open()))
    assert row["system"] == "ensemble" and row["lung_found"] in ("True", "False")
    served = json.loads((tmp_path / "job" / "output" / "probability-covid-19.json").read_text())
    assert abs(float(row["probability_covid_19"]) - served) < 1e-6

    # Started again, the run resumes: no fold is trained again, the same folder results.
    folds = sorted(scratch.glob("convnext3d-*/fold-*/last.pt"))
    assert len(folds) == 4
    stamps = [p.stat().st_mtime_ns for p in folds]
    assert train.main([*arguments, "--devices", "cpu,cpu"]) == 0
    assert [p.stat().st_mtime_ns for p in folds] == stamps
    assert json.loads((output / "ensemble.json").read_text())["covid"] == weights["covid"]

    runs = {"torchrun": tmp_path / "torchrun", "one process": tmp_path / "one"}
    started = time.perf_counter()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    subprocess.run(
        [
            *torchrun,
            str(REPOSITORY / "train.py"),
            *_train_arguments(
                phantom_cohort, cohort_masks, model_dir, runs["torchrun"], tmp_path / "scratch-t"
            ),
        ],
        check=True,
        cwd=REPOSITORY,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    timings.since("train.py --system ensemble, 48 phantoms, tiny: torchrun, 2 ranks", started)
    started = time.perf_counter()
    one = _train_arguments(
        phantom_cohort, cohort_masks, model_dir, runs["one process"], tmp_path / "scratch-1"
    )
    assert train.main([*one, "--devices", "cpu"]) == 0
    timings.since("train.py --system ensemble, 48 phantoms, tiny: one process", started)
    served = {}
    for name, folder in runs.items():
        assert_process_py_uses(folder, tmp_path / f"job-{name}")
        served[name] = [
            json.loads((tmp_path / f"job-{name}" / "output" / f).read_text())
            for f in ("probability-covid-19.json", "probability-severe-covid-19.json")
        ]
        timings.value(
            f"train.py folder of {name}: P(COVID-19) of the thin phantom", served[name][0]
        )
    np.testing.assert_allclose(served["torchrun"], served["one process"], atol=1e-6)
    a, b = (json.loads((folder / "ensemble.json").read_text()) for folder in runs.values())
    for task in ("covid", "severe"):
        assert a[task]["balaitous"] == pytest.approx(b[task]["balaitous"], abs=1e-6)
