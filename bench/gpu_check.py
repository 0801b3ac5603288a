"""Every GPU measurement in one call, for a machine with a GPU lent for a few minutes.

    make gpu-check        (.venv/bin/python -m bench.gpu_check [--out bench/results])

Runs, each in its own process with a time limit, and writes OUT/gpu-check.json (what ran,
its exit status and time) beside each step's own results:

    bench        python -m bench --device cuda --phantoms small,chest --repeat 2
                 (exact and fast, against the published package)    -> OUT/gpu/
    bench-t4     the same with --gpu-memory-gb 15 (a 16 GB T4)       -> OUT/gpu-t4/
    differential the differential test with our side on the GPU (STOIC_TEST_DEVICE=cuda)
    finetune     one fine-tuning epoch of the tiny ConvNeXt at 224^3 and 256^3, float16
                 autocast, batch 4: time per sample and peak memory  -> OUT/gpu-finetune.json

Without a CUDA GPU it says so in one line and runs nothing (exit status 1). A step that
fails or runs out of time is reported and the others still run; the exit status is then 1.
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

import torch

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
        Step("bench", [*bench, "--repeat", "2", "--out", str(out / "gpu")], 180),
        Step(
            "bench-t4",
            [*bench, "--repeat", "1", "--gpu-memory-gb", "15", "--out", str(out / "gpu-t4")],
            100,
        ),
        Step(
            "differential",
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test/test_differential.py"],
            80,
            {"STOIC_TEST_DEVICE": "cuda"},
        ),
        Step(
            "finetune",
            [python, "-m", "bench.finetune_epoch", "--json", str(out / "gpu-finetune.json")],
            90,
        ),
    ]


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
    outcomes = report["steps"]
    assert isinstance(outcomes, dict)
    failed = [name for name, outcome in outcomes.items() if outcome["status"] != 0]
    print(f"gpu-check: wrote {args.out / 'gpu-check.json'}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
