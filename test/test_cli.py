"""`python -m stoic_ct predict`, `check-model` and `phantom`: many scans, masks, CSV, QC
pictures, failures."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from helpers import SMALL_PHANTOM, write_case
from stoic_ct.cli import main
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.inference.results_table import CSV_COLUMNS
from stoic_ct.io.demographics import Demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.phantom import PhantomSpec
from stoic_ct.preprocessing.lung_segmentation import threshold_lungs
from stoic_ct.preprocessing.resampling import resample
from stoic_ct.weights.model_files import ALL_FILES, sha256_of, write_manifest


def write_mask(image: Path, mask_path: Path) -> Path:
    """The threshold segmenter's labels for `image`, written on the working grid."""
    resampled = resample(read_scan(image).volume)
    labels = resampled.with_voxels(threshold_lungs(resampled))
    sitk.WriteImage(labels.to_sitk(), str(mask_path))
    return mask_path


@pytest.fixture
def two_scans(tmp_path: Path) -> list[tuple[Path, Path]]:
    scans = []
    for i, burden in enumerate((0.0, 0.3)):
        spec = PhantomSpec(**{**SMALL_PHANTOM.__dict__, "lesion_burden": burden, "seed": i})
        image = write_case(tmp_path / f"case{i}", spec, name=f"scan{i}.nii.gz")
        scans.append((image, write_mask(image, tmp_path / f"mask{i}.nrrd")))
    return scans


def test_predict_with_masks_csv_and_qc(
    tiny_model: Balaitous,
    tiny_model_dir: Path,
    two_scans: list[tuple[Path, Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [
        "predict",
        *(str(i) for i, _ in two_scans),
        "--model-dir",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--csv",
        str(tmp_path / "out" / "results.csv"),
        "--qc",
        str(tmp_path / "qc"),
        "--age",
        "70",
        "--sex",
        "M",
    ]
    for _, mask in two_scans:
        args += ["--lung-mask", str(mask)]
    assert main(args) == 0

    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [r["image"] for r in rows] == [str(i) for i, _ in two_scans]
    assert list(rows[0]) == list(CSV_COLUMNS)
    stdout = capsys.readouterr().out.splitlines()
    assert len(stdout) == 2
    for (image, _), row, line in zip(two_scans, rows, stdout, strict=True):
        expected = tiny_model.predict(read_scan(image).volume, Demographics(70.0, "M"))
        assert float(row["probability_covid_19"]) == pytest.approx(
            expected.probabilities.covid, abs=1e-6
        )
        assert float(row["probability_severe_covid_19"]) == pytest.approx(
            expected.probabilities.severe, abs=1e-6
        )
        assert (row["age_years"], row["age_source"], row["sex"]) == ("70", "--age", "M")
        assert row["sex_source"] == "--sex"
        assert row["lung_found"] == "True" and row["error"] == ""
        assert line.startswith(f"{image}\tP(COVID-19)=")
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["scan0.png", "scan1.png"]


def test_a_bad_scan_is_reported_and_the_rest_run(
    tiny_model_dir: Path,
    two_scans: list[tuple[Path, Path]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = tmp_path / "broken.mha"
    broken.write_bytes(b"nonsense")
    (good, mask), _ = two_scans
    status = main(
        [
            "predict",
            str(broken),
            str(good),
            "--lung-mask",
            str(mask),
            "--lung-mask",
            str(mask),
            "--model-dir",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--csv",
            str(tmp_path / "results.csv"),
        ]
    )
    assert status == 1
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert "cannot read it as an image" in rows[0]["error"]
    assert rows[1]["error"] == "" and float(rows[1]["probability_covid_19"]) > 0
    assert "1 of 2 scans failed" in caplog.text


def test_an_interrupted_batch_resumes(
    tiny_model_dir: Path,
    two_scans: list[tuple[Path, Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Rows are written as scans finish; --resume keeps them and runs only the rest. A scan
    whose age is the anonymisation placeholder 000Y is scored with the default age, and
    the warning is in its row and its QC picture."""
    (first, first_mask), (nifti, second_mask) = two_scans
    placeholder = sitk.ReadImage(str(nifti))
    placeholder.SetMetaData("PatientAge", "000Y")
    second = tmp_path / "scan1.mha"  # NIfTI keeps no PatientAge; MetaImage does
    sitk.WriteImage(placeholder, str(second))
    table = tmp_path / "results.csv"
    common = ["--model-dir", str(tiny_model_dir), "--device", "cpu", "--csv", str(table)]
    # The first run "stopped" after one scan.
    assert main(["predict", str(first), "--lung-mask", str(first_mask), *common]) == 0
    assert [r["image"] for r in csv.DictReader(table.open())] == [str(first)]
    capsys.readouterr()
    images = [str(first), str(second), "--lung-mask", str(first_mask), "--lung-mask"]
    assert (
        main(
            [
                "predict",
                *images,
                str(second_mask),
                *common,
                "--resume",
                "--qc",
                str(tmp_path / "qc"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("P(COVID-19)=") == 1
    rows = list(csv.DictReader(table.open()))
    assert [r["image"] for r in rows] == [str(first), str(second)]
    assert (rows[1]["age_years"], rows[1]["age_source"]) == ("65", "default")
    assert "'000Y' is 0, the placeholder of anonymised scans" in rows[1]["warnings"]
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["scan1.png"]
    # Without --resume the table starts again.
    assert main(["predict", str(first), "--lung-mask", str(first_mask), *common]) == 0
    assert len(list(csv.DictReader(table.open()))) == 1


def test_mask_count_must_match(
    tiny_model_dir: Path, two_scans: list[tuple[Path, Path]], caplog: pytest.LogCaptureFixture
) -> None:
    (image, mask), (other, _) = two_scans
    status = main(
        [
            "predict",
            str(image),
            str(other),
            "--lung-mask",
            str(mask),
            "--model-dir",
            str(tiny_model_dir),
        ]
    )
    assert status == 1
    assert "1 --lung-mask files for 2 images" in caplog.text


def test_predict_runs_the_unet_by_default(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    thin = PhantomSpec(size=(64, 56, 3), spacing=(5.6, 5.6, 5.0), origin=(-180, -150, -5))
    image = write_case(tmp_path, thin)
    assert (
        main(
            [
                "predict",
                str(image),
                "--model-dir",
                str(tiny_model_dir),
                "--sex",
                "F",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith(f"{image}\tP(COVID-19)=")


def test_predict_refuses_what_the_convnext_cannot_do(
    tiny_model_dir: Path, two_scans: list[tuple[Path, Path]], caplog: pytest.LogCaptureFixture
) -> None:
    """The fine-tuned ConvNeXt sees the whole scan: no lung mask, no QC picture of one."""
    (image, mask), _ = two_scans
    common = ["predict", str(image), "--model-dir", str(tiny_model_dir), "--model", "convnext3d"]
    for extra in (["--lung-mask", str(mask)], ["--qc", "qc"]):
        assert main([*common, *extra]) == 1
        assert f"{extra[0]} is for Balaitous and the ensemble" in caplog.text
        caplog.clear()


def test_check_model(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the folder holds, each file checked against its MANIFEST."""
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    write_manifest(folder, {s.name: sha256_of(folder / s.name) for s in ALL_FILES})
    assert main(["check-model", "--model-dir", str(folder)]) == 0
    assert "system balaitous (encoder vit)" in capsys.readouterr().out
    (folder / "MANIFEST").unlink()
    assert main(["check-model", "--model-dir", str(folder)]) == 1


def test_phantom_command(tmp_path: Path) -> None:
    path = tmp_path / "p.nrrd"
    assert (
        main(
            [
                "phantom",
                str(path),
                "--size",
                "40",
                "30",
                "6",
                "--spacing",
                "5",
                "5",
                "10",
                "--age",
                "050Y",
                "--sex",
                "F",
            ]
        )
        == 0
    )
    scan = read_scan(path)
    assert scan.volume.size == (40, 30, 6)
    assert scan.header == {"PatientAge": "050Y", "PatientSex": "F"}


def test_phantom_cohort_command(tmp_path: Path) -> None:
    from stoic_ct.io.cohort import read_cohort

    assert main(["phantom-cohort", str(tmp_path / "a"), "--patients", "10", "--seed", "2"]) == 0
    assert main(["phantom-cohort", str(tmp_path / "b"), "--patients", "10", "--seed", "2"]) == 0
    assert (
        main(
            [
                "phantom-cohort",
                str(tmp_path / "c"),
                "--patients",
                "10",
                "--seed",
                "2",
                "--shuffle-labels",
            ]
        )
        == 0
    )
    a, b, c = (read_cohort(tmp_path / name) for name in "abc")
    assert len(a) == 10 and [p.id for p in a] == [p.id for p in c]
    assert all(p.image.read_bytes() == q.image.read_bytes() for p, q in zip(a, b, strict=True))
    # Shuffled: the same labels, on other patients; severe only where COVID-19.
    labels = sorted((p.covid, p.severe) for p in a)
    assert sorted((p.covid, p.severe) for p in c) == labels
    assert [(p.covid, p.severe) for p in c] != [(p.covid, p.severe) for p in a]
    assert all(p.covid == 1 for p in a if p.severe == 1)
    assert main(["phantom-cohort", str(tmp_path / "d"), "--patients", "3"]) == 1


def test_predict_shards_from_a_job_array_merge_into_the_whole_run(
    tiny_model_dir: Path,
    two_scans: list[tuple[Path, Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three scans, two shards (from a Slurm array's variables): merged, the table of one
    run; a merge that misses a shard, or a shard that did not finish, is refused."""
    images = [str(i) for i, _ in two_scans]
    third = tmp_path / "third.nii.gz"
    shutil.copyfile(images[0], third)
    images.append(str(third))
    masks = [str(m) for _, m in two_scans] + [str(two_scans[0][1])]
    common = ["--model-dir", str(tiny_model_dir), "--device", "cpu"]
    with_masks = [arg for mask in masks for arg in ("--lung-mask", mask)]
    whole = tmp_path / "whole.csv"
    assert main(["predict", *images, *with_masks, *common, "--csv", str(whole)]) == 0
    parts = []
    for task in (1, 2):  # --array=1-2
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
        part = tmp_path / f"part-{task}.csv"
        assert main(["predict", *images, *with_masks, *common, "--csv", str(part)]) == 0
        parts.append(part)
    assert "shard 2/2, from SLURM_ARRAY_TASK_ID=2 (from 1 in steps of 1)" in caplog.text
    assert [len(list(csv.DictReader(p.open()))) for p in parts] == [2, 1]

    merged = tmp_path / "merged.csv"
    assert main(["merge-predictions", *map(str, parts), "--out", str(merged)]) == 0
    key = ("image", "probability_covid_19", "probability_severe_covid_19")
    rows = [tuple(r[k] for k in key) for r in csv.DictReader(merged.open())]
    assert rows == sorted(tuple(r[k] for k in key) for r in csv.DictReader(whole.open()))

    caplog.clear()
    assert main(["merge-predictions", str(parts[0]), "--out", str(merged)]) == 1
    assert "shard(s) 2/2 of 2 are missing" in caplog.text
    lines = parts[0].read_text().splitlines()
    parts[0].write_text("\n".join(lines[:-1]) + "\n")  # the shard's run stopped early
    caplog.clear()
    assert main(["merge-predictions", *map(str, parts), "--out", str(merged)]) == 1
    assert f"{parts[0]}: lacks 1 of its shard's patients" in caplog.text
    caplog.clear()
    assert main(["merge-predictions", str(whole), "--out", str(merged)]) == 1
    assert "has no whole.csv.shard.json beside it" in caplog.text


def test_help_lists_every_command_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    names = ["predict", "merge-predictions", "serve", "fetch-weights", "finetune", "fit-ensemble"]
    for name in names:
        listed = [line for line in text.splitlines() if line.split()[:1] == [name]]
        assert len(listed) == 1, (name, listed)
