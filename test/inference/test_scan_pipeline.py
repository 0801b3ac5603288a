"""Many scans through one system: the pipelined run equals one scan at a time."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from helpers import SMALL_PHANTOM, write_fold_ensemble
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.inference.scan_pipeline import Outcome, ScanJob, plan_of, predict_scans
from stoic_ct.inference.systems import balaitous_part, load_system
from stoic_ct.io.demographics import resolve_demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.io.volume import Volume
from stoic_ct.phantom import make_phantom, write_phantom
from stoic_ct.preprocessing.lung_segmentation import threshold_lungs


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> list[ScanJob]:
    """Four phantoms, one of them given a threshold lung mask, and a broken file third."""
    folder = tmp_path_factory.mktemp("scans")
    jobs = []
    for seed in range(4):
        spec = replace(SMALL_PHANTOM, seed=seed, lesion_burden=0.05 * seed)
        path = folder / f"scan-{seed}.mha"
        write_phantom(make_phantom(spec), str(path), spec)
        jobs.append(ScanJob(path, age=40 + 10 * seed if seed % 2 else None, sex="F"))
    volume = read_scan(jobs[1].image).volume
    labels = Volume(threshold_lungs(volume), volume.spacing, volume.origin, volume.direction)
    sitk.WriteImage(labels.to_sitk(), str(folder / "mask-1.mha"))
    jobs[1] = replace(jobs[1], mask=folder / "mask-1.mha")
    broken = folder / "broken.mha"
    broken.write_text("not an image\n")
    return [*jobs[:2], ScanJob(broken), *jobs[2:]]


def _probabilities(outcomes: list[Outcome]) -> list[tuple[float, float] | str]:
    return [
        (o.prediction.probabilities.covid, o.prediction.probabilities.severe)
        if o.prediction is not None
        else str(o.error)
        for o in outcomes
    ]


def test_workers_give_the_results_of_one_scan_at_a_time(
    scans: list[ScanJob],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    write_fold_ensemble(model_dir, "covid", (1, 2))
    write_fold_ensemble(model_dir, "severe", (3,))
    (model_dir / "ensemble.json").write_text(
        '{"covid": {"balaitous": 1, "convnext3d": 1}, "severe": {"balaitous": 2, "convnext3d": 1}}'
    )
    model = load_system("ensemble", model_dir)  # Balaitous with the U-Net, and the ConvNeXt
    assert plan_of(model).unet and plan_of(model).volume
    alone = list(predict_scans(model, scans, workers=0))
    pipelined = list(predict_scans(model, scans, workers=2))
    assert [o.job for o in alone] == [o.job for o in pipelined] == scans
    assert _probabilities(pipelined) == _probabilities(alone)
    assert [o.warnings for o in pipelined] == [o.warnings for o in alone]
    broken = pipelined[2]
    assert broken.prediction is None and str(broken.error).startswith(str(scans[2].image))
    # The given mask was used, not the U-Net's: the slices differ from the U-Net's run.
    (unet_run,) = predict_scans(model, [replace(scans[1], mask=None)])
    assert pipelined[1].prediction is not None and unet_run.prediction is not None
    with_mask = balaitous_part(pipelined[1].prediction)
    without = balaitous_part(unet_run.prediction)
    assert with_mask is not None and without is not None
    assert with_mask.slices.mask.sum() != without.slices.mask.sum()


def test_the_pipeline_equals_the_system_s_own_predict(
    scans: list[ScanJob], tiny_model_dir: Path
) -> None:
    model = Balaitous.from_model_dir(tiny_model_dir)
    outcomes = list(predict_scans(model, scans[:3], workers=1))
    assert outcomes[2].prediction is None  # the broken file
    for job, outcome in zip(scans[:2], outcomes[:2], strict=True):
        assert outcome.prediction is not None
        scan = read_scan(job.image)
        demographics = resolve_demographics(
            ages=[
                ("--age", job.age),
                (f"{job.image} header PatientAge", scan.header.get("PatientAge")),
            ],
            sexes=[
                ("--sex", job.sex),
                (f"{job.image} header PatientSex", scan.header.get("PatientSex")),
            ],
        )
        mask = read_scan(job.mask).volume if job.mask else None
        expected = model.predict(scan.volume, demographics, lung_labels=mask)
        assert outcome.demographics == demographics
        assert outcome.prediction.probabilities == expected.probabilities
        assert set(outcome.prediction.seconds) >= {"read", "resample", "lung mask", "crop", "heads"}


def test_a_segmenter_of_the_caller_s_runs_in_this_process(
    scans: list[ScanJob], tiny_model_dir: Path
) -> None:
    model = Balaitous.from_model_dir(tiny_model_dir, lung_masks=threshold_lungs)
    assert not plan_of(model).unet
    outcomes = list(predict_scans(model, scans[:2], workers=1))
    assert all(o.prediction is not None for o in outcomes)
    given = Balaitous.from_model_dir(tiny_model_dir, lung_masks="given")
    (outcome,) = predict_scans(given, [scans[0]], workers=0)
    assert outcome.prediction is None and "no lung mask was given" in str(outcome.error)
    assert torch.get_num_threads() >= 1
