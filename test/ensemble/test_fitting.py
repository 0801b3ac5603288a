from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from stoic_ct.cli import main as cli
from stoic_ct.ensemble.fitting import best_weight, fit_ensemble, read_oof_predictions
from stoic_ct.errors import InputError
from stoic_ct.inference.systems import read_ensemble_weights


def write_cohort(
    folder: Path, n: int, seed: int, convnext_is_noise: bool = False
) -> tuple[Path, Path, Path, Path]:
    """reference.csv, evaluate's oof.csv for Balaitous and finetune's two oof.csv files.

    Each label depends on two independent factors; Balaitous sees the first, the ConvNeXt
    the second (or nothing, with `convnext_is_noise`).
    """
    rng = np.random.default_rng(seed)
    first, second = rng.normal(size=(2, 2, n))  # (task-ish, factor, patient)
    covid = (first[0] + second[0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    severe = (first[1] + second[1] + 0.5 * rng.normal(size=n) > 0).astype(int)
    ids = [f"{1000 + i}" for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    reference = folder / "reference.csv"
    reference.write_text(
        "PatientID,probCOVID,probSevere\n"
        + "".join(f"{p},{c},{s}\n" for p, c, s in zip(ids, covid, severe, strict=True))
    )
    balaitous = expit(first + 0.7 * rng.normal(size=(2, n)))
    convnext = (
        rng.uniform(size=(2, n))
        if convnext_is_noise
        else expit(second + 0.7 * rng.normal(size=(2, n)))
    )
    rows = ["PatientID,probCOVID,probSevere"]
    for i, p in enumerate(ids):
        severe_cell = f"{balaitous[1, i]:.6f}" if covid[i] else ""
        rows.append(f"{p},{balaitous[0, i]:.6f},{severe_cell}")
    evaluate_oof = folder / "balaitous-oof.csv"
    evaluate_oof.write_text("\n".join(rows) + "\n")
    tables = []
    for task, row, names in (
        (0, np.ones(n, dtype=bool), ("negative", "positive")),
        (1, covid == 1, ("not_severe", "severe")),
    ):
        lines = [f"PatientID,label,fold,p_{names[0]},p_{names[1]}"]
        labels = covid if task == 0 else severe
        for k in np.flatnonzero(row):
            q = convnext[task, k]
            lines.append(f"{ids[k]},{labels[k]},{k % 5 + 1},{1 - q:.6f},{q:.6f}")
        table = folder / f"convnext-{names[1]}-oof.csv"
        table.write_text("\n".join(lines) + "\n")
        tables.append(table)
    return reference, evaluate_oof, tables[0], tables[1]


def test_the_ensemble_beats_each_system_when_each_carries_part_of_the_signal(
    tmp_path: Path,
) -> None:
    reference, balaitous, covid, severe = write_cohort(tmp_path / "data", 400, seed=1)
    document = fit_ensemble(reference, [balaitous], [covid, severe], tmp_path / "out", repeats=3)
    for task in ("covid", "severe"):
        heads = document["tasks"][task]["heads"]
        ensemble = heads["ensemble"]["auc"]
        assert ensemble > heads["balaitous"]["auc"] + 0.03, task
        assert ensemble > heads["convnext3d"]["auc"] + 0.03, task
        assert heads["ensemble"]["ci95"][0] < ensemble < heads["ensemble"]["ci95"][1]
    weights = read_ensemble_weights(tmp_path / "out" / "ensemble.json")
    for task in ("covid", "severe"):
        assert 0.25 <= weights[task]["balaitous"] <= 0.75, weights
    for name in ("report.json", "report.md", "roc.png", "calibration.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # Severity is fitted on the COVID-positive patients only.
    positives = sum(
        1 for line in reference.read_text().splitlines()[1:] if line.split(",")[1] == "1"
    )
    assert document["tasks"]["severe"]["patients"] == positives


def test_a_system_that_is_noise_gets_a_weight_near_zero(tmp_path: Path) -> None:
    reference, balaitous, covid, severe = write_cohort(
        tmp_path / "data", 400, seed=2, convnext_is_noise=True
    )
    status = cli(
        [
            "fit-ensemble",
            *("--reference", str(reference)),
            *("--balaitous", str(balaitous)),
            *("--convnext3d", str(covid), str(severe)),
            *("--out", str(tmp_path / "out"), "--repeats", "2"),
        ]
    )
    assert status == 0
    written = json.loads((tmp_path / "out" / "ensemble.json").read_text())
    for task in ("covid", "severe"):
        assert written[task]["convnext3d"] <= 0.15, written
        assert written["fitted"]["nested_auc"][task] > 0.6


def test_best_weight_prefers_an_even_mix_on_ties() -> None:
    y = np.array([0, 0, 1, 1])
    same = np.array([0.1, 0.2, 0.8, 0.9])
    assert best_weight(y, same, same) == 0.5
    # Against a reversed score every w above 0.5 ranks perfectly: the nearest to 0.5 wins.
    assert best_weight(y, same, same[::-1]) == 0.55
    assert roc_auc_score(y, 0.55 * same + 0.45 * same[::-1]) == 1.0


def test_tables_with_other_columns_are_named(tmp_path: Path) -> None:
    table = tmp_path / "predictions.csv"
    table.write_text("id,p\n1,0.5\n")
    with pytest.raises(InputError, match=r"predictions.csv: has the columns \['id', 'p'\]"):
        read_oof_predictions([table])
    table.write_text("PatientID,probCOVID,probSevere\n1,1.5,\n")
    with pytest.raises(InputError, match="line 2: 1.5 is not a probability"):
        read_oof_predictions([table])


def test_a_patient_given_twice_is_refused(tmp_path: Path) -> None:
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    for table in (one, two):
        table.write_text("PatientID,label,fold,p_negative,p_positive\n7,1,1,0.2,0.8\n")
    with pytest.raises(InputError, match="two.csv: gives covid predictions of patients an earlier"):
        read_oof_predictions([one, two])


def test_fit_ensemble_into_a_model_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    """--model-dir puts ensemble.json into a folder holding both systems, and its
    system.json then says that the folder holds the ensemble, with the nested AUCs; a folder
    without the ConvNeXt is refused before anything is written there."""
    reference, balaitous, covid, severe = write_cohort(tmp_path / "data", 200, seed=3)
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    arguments = [
        "fit-ensemble",
        *("--reference", str(reference), "--balaitous", str(balaitous)),
        *("--convnext3d", str(covid), str(severe)),
        *("--out", str(tmp_path / "out"), "--repeats", "2", "--model-dir", str(folder)),
    ]
    assert cli(arguments) == 1  # no convnext3d_*.pth in the folder
    assert not (folder / "ensemble.json").exists() and not (folder / "system.json").exists()
    for name in ("convnext3d_covid.pth", "convnext3d_severe.pth"):
        (folder / name).write_bytes(b"weights")
    assert cli(arguments) == 0
    assert (folder / "ensemble.json").read_text() == (
        tmp_path / "out" / "ensemble.json"
    ).read_text()
    record = json.loads((folder / "system.json").read_text())
    assert record["system"] == "ensemble" and "ensemble.json" in record["files"]
    auc = record["history"][-1]["auc"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert auc["ensemble"]["covid"] == report["tasks"]["covid"]["heads"]["ensemble"]["auc"]
    assert record["history"][-1]["command"].startswith("python -m stoic_ct fit-ensemble ")
