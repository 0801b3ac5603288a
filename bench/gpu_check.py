"""Every GPU measurement in one call, for a machine with a GPU lent for a few minutes.

    make gpu-check        (.venv/bin/python -m bench.gpu_check [--out bench/results])

Runs, each in its own process with a time limit, and writes OUT/gpu-check.json (what ran,
its exit status and time) beside each step's own results:

    bench        python -m bench --device cuda --phantoms small,chest --repeat 2
                 (exact and fast, against the published package; the memory model's
                 figures beside the measured peaks; the performance page's table) -> OUT/gpu/
    bench-t4     the same with --gpu-memory-gb 15 (a 16 GB T4)           -> OUT/gpu-t4/
    differential the differential test with our side on the GPU (STOIC_TEST_DEVICE=cuda)
    finetune     one fine-tuning epoch of the tiny ConvNeXt at 224^3 and 256^3, float16
                 autocast, batch 4: time per sample, peak memory measured and modelled
                                                                      -> OUT/gpu-finetune.json
    cohort       8 chest-size scans in the fast mode, one at a time and pipelined
                 (bench/cohort.py): scans per hour                    -> OUT/gpu-cohort.json

Then the performance page's block of these figures is written from the files (`summary`). Without a
CUDA GPU it says so in one line and runs nothing (exit status 1). A step that fails or runs
out of time is reported and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.docs_block import replace_block

REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Step:
    """One measurement: its command, its time limit in seconds, extra environment."""

    name: str
    command: list[str]
    limit_s: int
    environment: dict[str, str] = field(default_factory=dict)


def steps(out: Path) -> list[Step]:
    """The measurements, in the order they run (the whole under 8 minutes on an H200)."""
    python = sys.executable
    bench = [python, "-m", "bench", "--device", "cuda", "--phantoms", "small,chest"]
    return [
        Step("bench", [*bench, "--repeat", "2", "--out", str(out / "gpu"), "--update-docs"], 170),
        Step(
            "bench-t4",
            [*bench, "--repeat", "1", "--gpu-memory-gb", "15", "--out", str(out / "gpu-t4")],
            90,
        ),
        Step(
            "differential",
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test/test_differential.py"],
            70,
            {"STOIC_TEST_DEVICE": "cuda"},
        ),
        Step(
            "finetune",
            [python, "-m", "bench.finetune_epoch", "--json", str(out / "gpu-finetune.json")],
            80,
        ),
        Step(
            "cohort",
            [
                *(python, "-m", "bench.cohort", "--device", "cuda", "--precision", "fast"),
                *("--phantom", "chest", "--scans", "8", "--json", str(out / "gpu-cohort.json")),
            ],
            70,
        ),
    ]


def summary(out: Path) -> str:
    """The performance page's block: fine-tuning and cohort figures, and the memory model beside the
    measured peaks, from the files the steps wrote (what a step did not write is said)."""
    lines = [f"From `make gpu-check` ({_read(out / 'gpu-check.json').get('gpu', 'no GPU')}).", ""]
    finetune = _read(out / "gpu-finetune.json").get("epochs", [])
    if finetune:
        lines += [
            "| fine-tuning epoch | s per training sample | peak allocated | reserved | "
            "modelled step (tensors, with margins) |",
            "|---|---:|---:|---:|---:|",
        ]
        for epoch in finetune:
            modelled = epoch.get("modelled") or {}
            lines.append(
                f"| ConvNeXt-{epoch['size']} {epoch['input_size']}^3, batch "
                f"{epoch['batch_size']}, AMP | {epoch['seconds_per_training_sample']} | "
                f"{epoch['peak_gb']} GiB | {epoch.get('reserved_gb')} GiB | "
                f"{modelled.get('tensors_gb')} GB, {modelled.get('total_gb')} GB |"
            )
        lines.append("")
    cohort = _read(out / "gpu-cohort.json")
    if cohort:
        lines += [
            f"Cohort ({cohort['scans']} {cohort['phantom']}, {cohort.get('numerics')}): one at a "
            f"time {cohort['one_at_a_time']['scans_per_hour']} scans/hour, with "
            f"{cohort['workers']} workers {cohort['pipelined']['scans_per_hour']} scans/hour "
            f"({cohort['speed_up']}x; same probabilities: {cohort['same_probabilities']}).",
            "",
        ]
    for name, title in (("gpu", "full memory"), ("gpu-t4", "capped at 15 GiB")):
        for phantom, by_impl in _read(out / name / "latest-cuda.json").get("phantoms", {}).items():
            for label in ("ours", "ours-fast"):
                run, modelled = by_impl.get(label, {}), by_impl.get(label, {}).get("modelled_gpu")
                if modelled:
                    lines.append(
                        f"- {phantom}, {label}, {title}: {run['peak_gpu_mb'] / 1024:.2f} GiB "
                        f"allocated at the peak, {modelled['tensors_gb'] * 1e9 / 2**30:.2f} GiB "
                        "modelled"
                    )
    return "\n".join(lines)


def _read(path: Path) -> dict[str, Any]:
    try:
        document: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return document


def no_gpu() -> str | None:
    """Why this machine cannot run the check, in one line; None when a GPU is visible."""
    if torch.cuda.is_available():
        return None
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    return (
        f"gpu-check: PyTorch sees no CUDA GPU (torch {torch.__version__}, {build}): nothing was run"
    )


def run(step: Step) -> dict[str, object]:
    """Run one step within its limit; its outcome for gpu-check.json."""
    print(f"gpu-check: {step.name}: {' '.join(step.command)}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(
            step.command,
            cwd=REPOSITORY,
            env=os.environ | step.environment,
            timeout=step.limit_s,
            check=False,
        )
        status: object = done.returncode
    except subprocess.TimeoutExpired:
        status = f"stopped after its limit of {step.limit_s} s"
    seconds = round(time.perf_counter() - started, 1)
    print(f"gpu-check: {step.name}: {status} in {seconds} s", flush=True)
    return {"command": step.command, "status": status, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--out", type=Path, default=REPOSITORY / "bench" / "results")
    args = parser.parse_args(argv)
    reason = no_gpu()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 1
    report: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": {step.name: run(step) for step in steps(args.out)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1) + "\n")
    replace_block("gpu-check", summary(args.out))
    outcomes = report["steps"]
    assert isinstance(outcomes, dict)
    failed = [name for name, outcome in outcomes.items() if outcome["status"] != 0]
    print(f"gpu-check: wrote {args.out / 'gpu-check.json'}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
