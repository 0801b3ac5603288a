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
from bench.docs_block import replace_block

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
    assert [s.name for s in steps] == ["bench", "bench-t4", "differential", "finetune", "cohort"]
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


def test_the_readme_block_is_written_from_the_steps_files(tmp_path: Path) -> None:
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu-check.json").write_text(json.dumps({"gpu": "NVIDIA H200"}))
    epoch = {
        "size": "tiny",
        "input_size": 256,
        "batch_size": 4,
        "seconds_per_training_sample": 0.41,
    }
    modelled = {"tensors_gb": 12.54, "total_gb": 15.41}
    (tmp_path / "gpu-finetune.json").write_text(
        json.dumps(
            {"epochs": [epoch | {"peak_gb": 10.9, "reserved_gb": 12.0, "modelled": modelled}]}
        )
    )
    (tmp_path / "gpu-cohort.json").write_text(
        json.dumps(
            {
                "scans": 8, "phantom": "chest", "precision": "fast", "numerics": "float16",
                "workers": 8,
                "one_at_a_time": {"scans_per_hour": 1400}, "pipelined": {"scans_per_hour": 5100},
                "speed_up": 3.64, "same_probabilities": True,
            }
        )
    )  # fmt: skip
    run = {"peak_gpu_mb": 3 * 1024, "modelled_gpu": {"tensors_gb": 3.14}}
    (tmp_path / "gpu" / "latest-cuda.json").write_text(
        json.dumps({"phantoms": {"chest": {"ours": run}}})
    )
    block = gpu_check.summary(tmp_path)
    assert block.startswith("From `make gpu-check` (NVIDIA H200).")
    assert (
        "| ConvNeXt-tiny 256^3, batch 4, AMP | 0.41 | 10.9 GiB | 12.0 GiB | 12.54 GB, 15.41 GB |"
        in block
    )
    assert "Cohort (8 chest, float16): one at a time 1400 scans/hour" in block
    assert "with 8 workers 5100 scans/hour (3.64x" in block
    assert "- chest, ours, full memory: 3.00 GiB allocated at the peak, 2.92 GiB modelled" in block
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- gpu-check:start -->\nold\n<!-- gpu-check:end -->\nafter\n")
    replace_block("gpu-check", block, readme)
    text = readme.read_text()
    assert (
        "old" not in text
        and block in text
        and text.startswith("before")
        and text.endswith("after\n")
    )
