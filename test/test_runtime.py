"""What every entry point logs at start-up, and the warning for a GPU PyTorch cannot use."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stoic_ct.runtime import Runtime, describe, log_runtime, probe

DRIVER_FILE = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)


def runtime(**values: object) -> Runtime:
    base: dict[str, object] = {
        "torch_version": "2.13.0+cu126",
        "cuda": "12.6",
        "usable": True,
        "gpus": ("Tesla T4 (14.6 GiB)",),
        "nvidia_present": True,
        "driver": "550.54.14",
        "cudnn": 91002,
        "threads": 4,
    }
    return Runtime(**(base | values))  # type: ignore[arg-type]


def test_a_usable_gpu() -> None:
    line, warning = describe(runtime())
    assert line == (
        "torch 2.13.0+cu126 (CUDA runtime 12.6, cuDNN 91002); GPU 0: Tesla T4 (14.6 GiB); "
        "NVIDIA driver 550.54.14"
    )
    assert warning is None


def test_no_gpu_at_all() -> None:
    line, warning = describe(
        runtime(torch_version="2.13.0+cpu", cuda=None, usable=False, gpus=(), nvidia_present=False)
    )
    assert line == "torch 2.13.0+cpu (a CPU build); no GPU used: 4 CPU threads"
    assert warning is None


def test_a_driver_too_old_for_the_image() -> None:
    """The case a user must hear of: the job would run, slowly, on the CPU."""
    _, warning = describe(runtime(usable=False, gpus=(), driver="470.82.01", cuda="13.0"))
    assert warning == (
        "an NVIDIA GPU is present but PyTorch cannot use it: the driver is 470.82.01, and "
        "torch 2.13.0+cu126 is built for CUDA 13.0, which needs NVIDIA driver 580.65.06 or "
        "newer; the job runs on the CPU"
    )


def test_a_cpu_build_beside_a_gpu() -> None:
    _, warning = describe(
        runtime(torch_version="2.13.0+cpu", cuda=None, usable=False, gpus=(), driver=None)
    )
    assert warning is not None
    assert "this torch is a CPU build (2.13.0+cpu); the job runs on the CPU" in warning


def test_probe_reads_the_driver(tmp_path: Path) -> None:
    (tmp_path / "version").write_text(DRIVER_FILE)
    found = probe(tmp_path / "version", tmp_path)
    assert found.nvidia_present and found.driver == "535.183.01"
    devices = tmp_path / "dev"
    devices.mkdir()
    assert not probe(tmp_path / "absent", devices).nvidia_present  # (this machine: no GPU)
    (devices / "nvidia0").touch()
    present = probe(tmp_path / "absent", devices)
    assert present.nvidia_present and present.driver is None


def test_every_entry_point_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    found = log_runtime()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines and lines[-1].startswith(f"torch {found.torch_version} (")
