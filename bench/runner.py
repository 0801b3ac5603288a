"""One benchmark run in its own process: load one implementation, run it on scans, report JSON.

    python -m bench.runner --impl ours|published --model-dir DIR --image IMG [--image IMG ...]
        [--device cpu|cuda] [--precision exact|fast] [--scans-per-image N]
        [--gpu-memory-gb G] --json OUT

Both implementations run unchanged: the published package reads the weight files through
its own torch.hub cache. The digest of every U-Net mask is reported, to check that both
gave the same one.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: they are part of the cold start

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stoic_ct.io.volume import Volume  # noqa: E402

# Stage names shared by both implementations.
STAGES = ("read", "resample", "lung mask", "crop", "encoder full", "encoder lung", "heads")
PUBLISHED_STAGES = {  # balaitous transform -> stage
    "ParseAgeSex": "resample",
    "SitkResample": "resample",
    "CreateLungMask": "lung mask",
    "SitkToNumpy": "crop",
    "CleanLungMask": "crop",
    "CropPad": "crop",
    "CropLungs": "crop",
    "iBOTExtractor:full": "encoder full",
    "ApplyLungMask": "encoder lung",
    "iBOTExtractor:lung": "encoder lung",
    "ApplySTOICLogisticRegressions": "heads",
}


def _digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(mask, dtype=np.uint8).tobytes()).hexdigest()[:16]


class Published:
    """balaitous 1.2, reading our weight files through its torch.hub cache."""

    def __init__(self, model_dir: Path, device: str) -> None:
        import lungmask.mask

        from bench.published import published_environment

        self.unet_digests: list[str] = []
        real_apply = lungmask.mask.apply

        def recorded_apply(image: Any, force_cpu: bool = False) -> np.ndarray:
            mask: np.ndarray = real_apply(image, force_cpu=force_cpu)
            self.unet_digests.append(_digest(mask))
            return mask

        self._environment = published_environment(
            model_dir, Path(tempfile.mkdtemp(prefix="torch-home-")), recorded_apply
        )
        self._environment.__enter__()
        from balaitous import Balaitous

        self.model = Balaitous(device=device)

    def __call__(self, image: Path) -> tuple[dict[str, float], tuple[float, float]]:
        started = time.perf_counter()
        sample = self.model(str(image), return_dict=True)
        total = time.perf_counter() - started
        seconds = dict.fromkeys(STAGES, 0.0)
        for name, value in self.model.transforms.seconds.items():
            seconds[PUBLISHED_STAGES[name]] += value
        seconds["read"] = total - sum(seconds.values())
        return seconds, (
            float(sample["prediction"]["covid"]),
            float(sample["prediction"]["severe"]),
        )


class Ours:
    """This pipeline, as process.py runs it."""

    def __init__(self, model_dir: Path, device: str, precision: str) -> None:
        from stoic_ct.inference.lung_masks import R231Segmenter
        from stoic_ct.inference.precision import ModelSettings
        from stoic_ct.inference.systems import load_model_folder
        from stoic_ct.weights.model_files import ModelFiles

        self.unet_digests: list[str] = []
        unet = R231Segmenter(ModelFiles(model_dir).r231, torch.device(device), precision=precision)

        def recorded_unet(volume: Volume) -> np.ndarray:
            mask = unet(volume)
            self.unet_digests.append(_digest(mask))
            return mask

        # The published package is Balaitous: whatever else the folder holds, that is timed.
        self.model, _ = load_model_folder(
            model_dir,
            ModelSettings(torch.device(device), precision),
            system="balaitous",
            lung_masks=recorded_unet,
        )
        self.unet, self.precision = unet, precision

    def modelled_gpu(self, image: Path) -> dict[str, object]:
        """The memory model's estimate for this scan, as the model runs it."""
        from dataclasses import replace

        from stoic_ct.inference.gpu_memory import modelled_peak, workload_of
        from stoic_ct.io.imageio import read_scan

        volume = read_scan(image).volume
        workload = replace(
            workload_of(self.model, [], self.precision),  # type: ignore[arg-type]
            r231_batch=self.unet.batch_size,
            scan=volume.size,
            spacing=volume.spacing,
        )
        return {"workload": workload.describe(), **modelled_peak(workload).as_dict()}

    def __call__(self, image: Path) -> tuple[dict[str, float], tuple[float, float]]:
        from stoic_ct.io.demographics import resolve_demographics
        from stoic_ct.io.imageio import read_scan

        started = time.perf_counter()
        scan = read_scan(image)
        read = time.perf_counter() - started
        demographics = resolve_demographics(
            [("header", scan.header.get("PatientAge"))], [("header", scan.header.get("PatientSex"))]
        )
        result = self.model.predict(scan.volume, demographics)
        seconds = dict.fromkeys(STAGES, 0.0)
        seconds.update(result.seconds)
        seconds["read"] = read
        p = result.probabilities
        return seconds, (p.covid, p.severe)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impl", choices=("ours", "published"), required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--image", type=Path, action="append", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="exact")
    parser.add_argument(
        "--scans-per-image",
        type=int,
        default=1,
        help="more than 1 times warm scans (models loaded, caches warm)",
    )
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        help="cap PyTorch's GPU memory at this many GiB, as a smaller GPU would (a T4: 15)",
    )
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.gpu_memory_gb and args.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gb * 2**30 / total))

    spawned = float(os.environ.get("STOIC_BENCH_SPAWNED", STARTED))
    loading_started = time.perf_counter()
    make: Callable[[], Any] = (
        (lambda: Published(args.model_dir, args.device))
        if args.impl == "published"
        else (lambda: Ours(args.model_dir, args.device, args.precision))
    )
    runner = make()
    load_seconds = time.perf_counter() - loading_started
    ready = time.time()

    scans = []
    for image in args.image:
        for repetition in range(args.scans_per_image):
            started = time.perf_counter()
            seconds, probabilities = runner(image)
            if args.device == "cuda":
                torch.cuda.synchronize()
            scans.append(
                {
                    "image": str(image),
                    "repetition": repetition,
                    "seconds": seconds,
                    "total": time.perf_counter() - started,
                    "probabilities": probabilities,
                }
            )
    report = {
        "impl": args.impl,
        "device": args.device,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cold_start": ready - spawned,
        "load": load_seconds,
        "scans": scans,
        "unet_digests": runner.unet_digests,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
        ),
        "peak_gpu_reserved_mb": (
            torch.cuda.max_memory_reserved() / 2**20 if args.device == "cuda" else None
        ),
        "modelled_gpu": (
            runner.modelled_gpu(args.image[0])
            if args.device == "cuda" and isinstance(runner, Ours)
            else None
        ),
    }
    args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
