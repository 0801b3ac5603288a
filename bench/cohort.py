"""Cohort throughput: scans per hour through one loaded model, one at a time and pipelined.

    .venv/bin/python -m bench.cohort [--device cpu|cuda] [--precision exact|fast]
                                     [--phantom small|chest] [--scans 8] [--workers N]
                                     [--json OUT]

The model is the benchmark's (bench/__main__.py: random ViT-L encoders in the published
layouts, the published heads, the R231 U-Net trained on phantoms), loaded once, Balaitous.
The phantom is copied to `--scans` files; one scan runs first to warm up (not timed).
Then `predict`'s own scan pipeline runs them all with no workers (every stage here, one
scan after the other) and with `--workers` processes (default: predict's default for the
device, at least 1), and the probabilities of both runs are compared (they must be equal).
Printed and written as JSON: seconds and scans per hour of each run, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.__main__ import PHANTOMS, model_dir, phantom_path
from stoic_ct.inference.precision import ModelSettings, numerics_of
from stoic_ct.inference.scan_pipeline import WORKERS, Outcome, ScanJob, predict_scans
from stoic_ct.inference.systems import load_model_folder
from stoic_ct.logs import configure_logging


def timed_run(model: Any, jobs: list[ScanJob], workers: int) -> tuple[float, list[Outcome]]:
    """Seconds for every job, and the outcomes."""
    started = time.perf_counter()
    outcomes = list(predict_scans(model, jobs, workers))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, outcomes


def probabilities(outcomes: list[Outcome]) -> list[tuple[float, float]]:
    """Each outcome's two probabilities; a failed scan fails the benchmark."""
    values = []
    for outcome in outcomes:
        if outcome.prediction is None:
            raise RuntimeError(f"{outcome.job.image} failed: {outcome.error}")
        p = outcome.prediction.probabilities
        values.append((p.covid, p.severe))
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cohort", description=__doc__)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fast", choices=("exact", "fast"))
    parser.add_argument("--phantom", default="chest", choices=tuple(PHANTOMS))
    parser.add_argument("--scans", type=int, default=8, help="scans per run (default 8)")
    parser.add_argument("--workers", type=int, default=None, help="default: predict's, at least 1")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    configure_logging()
    device = torch.device(args.device)
    workers = args.workers if args.workers is not None else max(1, WORKERS[device.type])
    model, _ = load_model_folder(
        model_dir(), ModelSettings(device, args.precision), system="balaitous"
    )
    source = phantom_path(args.phantom)
    with tempfile.TemporaryDirectory() as folder:
        jobs = []
        for number in range(args.scans + 1):
            copy = Path(folder) / f"scan-{number}{''.join(source.suffixes)}"
            shutil.copyfile(source, copy)
            jobs.append(ScanJob(copy, age=60, sex="F"))
        warm, jobs = jobs[0], jobs[1:]
        list(predict_scans(model, [warm]))
        alone_s, alone = timed_run(model, jobs, 0)
        print(f"one at a time: {alone_s:.1f} s for {len(jobs)} scans", file=sys.stderr, flush=True)
        piped_s, piped = timed_run(model, jobs, workers)
        print(f"{workers} workers: {piped_s:.1f} s", file=sys.stderr, flush=True)
    same = probabilities(alone) == probabilities(piped)
    report = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "numerics": numerics_of(device, args.precision),
        "phantom": f"{args.phantom}: {PHANTOMS[args.phantom]}",
        "scans": len(jobs),
        "workers": workers,
        "one_at_a_time": {
            "seconds": round(alone_s, 2),
            "scans_per_hour": round(3600 * len(jobs) / alone_s),
        },
        "pipelined": {
            "seconds": round(piped_s, 2),
            "scans_per_hour": round(3600 * len(jobs) / piped_s),
        },
        "speed_up": round(alone_s / piped_s, 2),
        "same_probabilities": same,
    }
    print(json.dumps(report, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
