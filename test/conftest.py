"""Shared fixtures: tiny random models in the published layouts, written once per session."""

from __future__ import annotations

import json
import logging
import os
import shutil
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from bench.published import install_compose_for_balaitous
from helpers import TINY_VIT
from stoic_ct.head_training.features import FeatureTable, encoder_key, extract
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.io.cohort import read_cohort
from stoic_ct.io.imageio import read_scan
from stoic_ct.io.volume import Volume
from stoic_ct.phantom import write_phantom_cohort
from stoic_ct.preprocessing.lung_segmentation import threshold_lungs
from stoic_ct.weights.fetch import UnreachableError, configured_index
from stoic_ct.weights.random_weights import write_random_model_dir
from stoic_ct.weights.sample_scans import sample_scans
from timings import MEASURED, Timings

torch.set_num_threads(2)

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four model files with tiny random encoders and heads (plus the random R231 U-Net)."""
    return write_random_model_dir(tmp_path_factory.mktemp("tiny-model"), TINY_VIT, seed=3)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> Balaitous:
    """Balaitous with tiny encoders and the threshold segmenter, on the CPU."""
    return Balaitous.from_model_dir(tiny_model_dir, lung_masks=threshold_lungs)


@pytest.fixture(autouse=True)
def _propagate_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="session")
def published() -> types.ModuleType:
    """The published `balaitous.transforms` module (balaitous==1.2, installed with --no-deps)."""
    install_compose_for_balaitous()
    import balaitous.transforms

    return balaitous.transforms


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary folder that an unprivileged user can enter (pytest's are private to root)."""
    path = (
        Path(os.environ.get("TMPDIR", "/tmp")) / f"stoic-test-{os.getpid()}-{os.urandom(4).hex()}"
    )
    path.mkdir()
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


COHORT_SIZE = 48


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 small phantoms in the STOIC layout; COVID follows lesion burden, severity age too."""
    return write_phantom_cohort(tmp_path_factory.mktemp("cohort"), COHORT_SIZE, seed=1)


@pytest.fixture(scope="session")
def cohort_masks(phantom_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Threshold lung masks <PatientID>.mha of the cohort's scans, on their own grids."""
    masks = tmp_path_factory.mktemp("cohort-masks")
    for patient in read_cohort(phantom_cohort):
        volume = read_scan(patient.image).volume
        labels = Volume(threshold_lungs(volume), volume.spacing, volume.origin, volume.direction)
        sitk.WriteImage(labels.to_sitk(), str(masks / f"{patient.id}.mha"))
    return masks


@pytest.fixture(scope="session")
def cohort_table(
    phantom_cohort: Path,
    tiny_model_dir: Path,
    tiny_model: Balaitous,
    tmp_path_factory: pytest.TempPathFactory,
) -> FeatureTable:
    """The cohort's features from the tiny model and the threshold segmenter."""
    key = encoder_key(tiny_model_dir, "exact", with_r231=False)
    cache = tmp_path_factory.mktemp("cohort-cache")
    return extract(read_cohort(phantom_cohort), tiny_model, cache, key, progress=False)


@pytest.fixture(scope="session")
def real_scans() -> dict[str, Path]:
    """The two public chest CTs of the pyradiomics 3.1.0 archive, cached in .cache/.

    Skipped with a message only where the package index cannot be reached, never in CI.
    """
    try:
        return sample_scans(REPOSITORY / ".cache" / "sample-scans", configured_index())
    except UnreachableError as error:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(
            f"the real chest CTs cannot be fetched, the package index is unreachable: {error}"
        )


@pytest.fixture(scope="session")
def timings() -> Timings:
    """Where a test records the durations it measures."""
    return Timings()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures the tests measured, at the end of the run and in .cache/."""
    if not MEASURED:
        return
    terminalreporter.section("measured times")
    for name, figure in MEASURED.items():
        terminalreporter.write_line(f"{figure:>12}  {name}")
    path = REPOSITORY / ".cache" / "test-timings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(MEASURED, indent=1) + "\n")
