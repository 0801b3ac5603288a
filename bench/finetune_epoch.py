"""One fine-tuning epoch of the 3D ConvNeXt per cube size: time per sample and peak memory.

    .venv/bin/python -m bench.finetune_epoch [--device cuda] [--size tiny] [--sizes 224,256]
                                             [--patients 20] [--batch-size 4] --json OUT

The STOIC2021 winner's setting at each size: a tiny ConvNeXt from random weights, batch 4,
the paper's augmentation, float16 autocast on a GPU (float32 on a CPU), two folds of one
epoch on phantoms (a fold trains on half of them and validates on the other half). The
cubes are prepared first and not timed. Written: per size, the seconds per training
sample (the whole epoch, validation included, over the training samples), on a GPU the
peak memory PyTorch allocated (GiB) and reserved, and beside them the memory model's
figures for one step (stoic_ct.convnext_training.training_memory, GB).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from stoic_ct.convnext_training.cube_cache import cached_cubes, task_patients
from stoic_ct.convnext_training.finetuning import finetune
from stoic_ct.convnext_training.recipes import FinetuneSettings
from stoic_ct.convnext_training.training_memory import finetune_step_peak
from stoic_ct.logs import configure_logging
from stoic_ct.phantom import write_phantom_cohort


def one_epoch(
    cohort: Path, work: Path, size: str, input_size: int, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """Two folds of one epoch at `input_size`^3 on `device`: seconds and peak memory."""
    patients, labels = task_patients(cohort, "covid")
    cache = work / "cubes"
    cached_cubes(patients, cache, input_size, progress=False)
    settings = FinetuneSettings(
        task="covid", size=size, input_size=input_size, folds=2, epochs=1, batch_size=batch_size
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    finetune(
        patients,
        labels,
        settings,
        work / f"run-{input_size}",
        device=device,
        cache_dir=cache,
        progress=False,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    trained = len(patients)  # each patient trains in one fold and validates in the other
    return {
        "size": size,
        "input_size": input_size,
        "batch_size": batch_size,
        "amp": device.type == "cuda",
        "patients": len(patients),
        "seconds": round(seconds, 2),
        "seconds_per_training_sample": round(seconds / trained, 3),
        "peak_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "reserved_gb": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "modelled": finetune_step_peak(settings).as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune_epoch", description=__doc__)
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--size", default="tiny", help="the ConvNeXt size (default tiny)")
    parser.add_argument("--sizes", default="224,256", help="cube sides (default 224,256)")
    parser.add_argument("--patients", type=int, default=20, help="phantoms (default 20)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging()
    device = torch.device(args.device)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cohort = write_phantom_cohort(work / "cohort", args.patients, seed=0)
        for side in (int(s) for s in args.sizes.split(",")):
            results.append(one_epoch(cohort, work, args.size, side, args.batch_size, device))
            print(json.dumps(results[-1]), flush=True)
    report = {"device": str(device), "torch": torch.__version__, "epochs": results}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
