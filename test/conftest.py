"""Shared fixtures: tiny random models in the published layouts, written once per session."""

from __future__ import annotations

import logging
import os
import shutil
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.published import install_compose_for_balaitous
from helpers import TINY_VIT
from stoic_ct.lung_segmentation import threshold_lungs
from stoic_ct.pipeline import Balaitous
from stoic_ct.random_weights import write_random_model_dir

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four model files with tiny random encoders and heads (plus the random R231 U-Net)."""
    return write_random_model_dir(tmp_path_factory.mktemp("tiny-model"), TINY_VIT, seed=3)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> Balaitous:
    """Balaitous with tiny encoders and the threshold segmenter, on the CPU."""
    return Balaitous.from_model_dir(tiny_model_dir, torch.device("cpu"), segmenter=threshold_lungs)


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
