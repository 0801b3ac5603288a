"""`make gpu-check` (bench/gpu_check.py) and its fine-tuning epoch (bench/finetune_epoch.py):
on a machine without a GPU, one line and nothing run; the epoch's measurement on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import finetune_epoch, gpu_check

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu-check runs")
def test_without_a_gpu_it_says_so_in_one_line_and_runs_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [gpu_check.no_gpu()]
    assert "PyTorch sees no CUDA GPU" in done.stderr and not list(tmp_path.iterdir())


def test_the_steps_fit_the_eight_minutes_of_a_lent_gpu(tmp_path: Path) -> None:
    steps = gpu_check.steps(tmp_path)
    assert [s.name for s in steps] == ["bench", "bench-t4", "differential", "finetune"]
    assert sum(s.limit_s for s in steps) <= 8 * 60
    assert "--gpu-memory-gb" in steps[1].command
    assert steps[2].environment == {"STOIC_TEST_DEVICE": "cuda"}


def test_a_fine_tuning_epoch_reports_time_per_sample(tmp_path: Path) -> None:
    out = tmp_path / "epoch.json"
    arguments = ["--device", "cpu", "--size", "micro", "--sizes", "32,64", "--patients", "12"]
    assert finetune_epoch.main([*arguments, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [e["input_size"] for e in report["epochs"]] == [32, 64]
    for epoch in report["epochs"]:
        assert epoch["seconds_per_training_sample"] > 0 and epoch["peak_gb"] is None
        assert epoch["patients"] == 12 and epoch["amp"] is False
