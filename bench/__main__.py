"""The benchmark: the published balaitous 1.2 and this pipeline, side by side, on this machine.

    .venv/bin/python -m bench [--phantoms small,chest] [--repeat 3] [--device cpu|cuda]
                              [--no-fast] [--out bench/results] [--update-docs]

Every run is a fresh process (a cold start, as on grand-challenge), on the same phantoms,
with the same weights: random ViT-L encoders in the published layouts, the published
heads, and an R231 U-Net trained on phantoms (bench/trained_unet.py), so that both find
the same lungs. Runs of the two implementations alternate. Printed, and written as
JSON, Markdown and a bar chart PNG: per stage and in total, the median wall time, peak
RSS, the ratio ours/published, and the largest probability difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.chart import LABELS, bar_chart
from bench.docs_block import PERFORMANCE, replace_block
from bench.runner import STAGES

REPOSITORY = Path(__file__).resolve().parent.parent
CACHE = REPOSITORY / ".cache" / "bench"
PHANTOMS = {
    "small": "the shipped test case, 128 x 128 x 40 at 2.8 x 2.8 x 5 mm",
    "chest": "a chest CT's size, 512 x 512 x 300 at 0.7 x 0.7 x 1.25 mm",
}


def phantom_path(name: str) -> Path:
    """The phantom's file, written once into the cache."""
    if name == "small":
        return REPOSITORY / "test" / "input" / "images" / "ct" / "phantom.mha"
    path = CACHE / "chest-512x512x300.mha"
    if not path.exists():
        from stoic_ct.phantom import PhantomSpec, make_phantom, write_phantom

        print(f"writing {path} (about a minute, once)", file=sys.stderr)
        spec = PhantomSpec(
            size=(512, 512, 300),
            spacing=(0.7, 0.7, 1.25),
            origin=(-179.2, -179.2, -187.5),
            lesion_burden=0.1,
            seed=7,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}")  # an interrupted write leaves no phantom behind
        write_phantom(make_phantom(spec), str(part), spec)
        part.replace(path)
    return path


def model_dir() -> Path:
    """Random ViT-L weights in the published layouts, the published heads, and an R231
    U-Net trained on phantoms (bench/trained_unet.py), written once into the cache."""
    path = CACHE / "model"
    trained = path / "R231_TRAINED_ON_PHANTOMS"
    if not trained.exists():
        from bench.published import published_heads_path
        from bench.trained_unet import train_r231
        from stoic_ct.weights.model_files import R231
        from stoic_ct.weights.random_weights import write_random_model_dir

        print(f"writing random weights to {path} (2.5 GB, once)", file=sys.stderr)
        write_random_model_dir(path, seed=0, heads=published_heads_path())
        train_r231(path / R231.name)
        trained.write_text(
            "unet_r231-d5d2fc3d.pth was trained on phantoms by bench/trained_unet.py\n"
        )
    return path


def run_once(
    impl: str,
    image: Path,
    device: str,
    precision: str,
    scans: int,
    gpu_memory_gb: float | None = None,
) -> dict[str, Any]:
    """One fresh process: its report (peak RSS as it measured it), and its wall time."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable,
            "-m",
            "bench.runner",
            "--impl",
            impl,
            "--model-dir",
            str(model_dir()),
            "--image",
            str(image),
            "--device",
            device,
            "--precision",
            precision,
            "--scans-per-image",
            str(scans),
            "--json",
            out.name,
        ]
        if gpu_memory_gb:
            command += ["--gpu-memory-gb", str(gpu_memory_gb)]
        env = {**os.environ, "STOIC_BENCH_SPAWNED": repr(time.time())}
        started = time.perf_counter()
        done = subprocess.run(
            command,
            cwd=REPOSITORY,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{impl} on {image.name} failed:\n{done.stderr[-3000:]}")
        report: dict[str, Any] = json.loads(Path(out.name).read_text())
    # The whole run of one scan: warm scans beyond the first are not part of it.
    report["wall"] = wall - sum(scan["total"] for scan in report["scans"][1:])
    return report


# The fast modes each device runs: both of a CPU's, so that the faster can be seen.
FAST_MODES = {"cpu": ("int8", "bfloat16"), "cuda": ("fast",)}
FAST_TOLERANCE = 0.02  # the largest probability difference from exact a fast mode may have


def cpu_fast_choice(
    phantoms: dict[str, Any], units: tuple[str, ...], default: str
) -> dict[str, Any]:
    """Which of the CPU's fast modes the figures favour: the one with the lower total of
    whole-run times among those within FAST_TOLERANCE of exact on every phantom; beside
    what --precision fast picks on this CPU (from its bfloat16 units)."""
    within = {
        mode: sum(summary[f"ours-{mode}"]["wall"] for summary in phantoms.values())
        for mode in FAST_MODES["cpu"]
        if all(s[f"{mode}_difference"] <= FAST_TOLERANCE for s in phantoms.values())
    }
    faster = min(within, key=within.__getitem__) if within else None
    shown = ", ".join(units) or "no bfloat16 units"
    line = (
        f"CPU fast modes: fast picks {default} on this CPU ({shown}); measured faster within "
        f"{FAST_TOLERANCE} of exact: {faster or 'neither'}"
        + ("" if faster in (None, default) else " (the default differs: see bench/README.md)")
    )
    return {"units": list(units), "default": default, "faster": faster, "line": line}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repetitions of one implementation on one phantom."""
    first_scans = [r["scans"][0] for r in runs]
    warm = [s["total"] for r in runs for s in r["scans"][1:]]
    return {
        "wall": statistics.median(r["wall"] for r in runs),
        "cold_start": statistics.median(r["cold_start"] for r in runs),
        "load": statistics.median(r["load"] for r in runs),
        "scan": statistics.median(s["total"] for s in first_scans),
        "warm_scan": statistics.median(warm) if warm else None,
        "stages": {k: statistics.median(s["seconds"][k] for s in first_scans) for k in STAGES},
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_gpu_mb": max((r["peak_gpu_mb"] or 0) for r in runs) or None,
        "peak_gpu_reserved_mb": max((r.get("peak_gpu_reserved_mb") or 0) for r in runs) or None,
        "modelled_gpu": runs[0].get("modelled_gpu"),
        "probabilities": first_scans[0]["probabilities"],
        "unet_digests": runs[0]["unet_digests"],
        "repetitions": len(runs),
    }


def _row(label: str, unit: str, values: list[float | None]) -> str | None:
    """A table row: each implementation's value and its ratio to the published one."""
    if all(v is None for v in values):
        return None
    reference = values[0]
    cells = [f"{reference:.1f} {unit}" if reference is not None else "-"]
    for value in values[1:]:
        shown = f"{value:.1f} {unit}" if value is not None else "-"
        ratio = f"{value / reference:.2f}x" if value is not None and reference else "-"
        cells += [shown, ratio]
    return f"| {label} | " + " | ".join(cells) + " |"


def _modelled_mb(summary: dict[str, Any], key: str) -> float | None:
    """A figure of the memory model's estimate, in MB as the measured ones (MiB)."""
    modelled = summary.get("modelled_gpu")
    return modelled[key] * 1e9 / 2**20 if modelled else None


def markdown(results: dict[str, Any]) -> str:
    """The tables of the performance page: one per phantom, rows per stage."""
    lines = [
        f"Measured {results['date']} on {results['machine']}, device {results['device']}, "
        f"{results['repeat']} runs each (medians; peak RSS: the largest)"
        + (
            f", PyTorch's GPU memory capped at {cap:g} GiB."
            if (cap := results.get("gpu_memory_cap_gb"))
            else "."
        ),
        "",
    ]
    for phantom, by_impl in results["phantoms"].items():
        labels = [label for label in LABELS if label in by_impl]
        runs = [by_impl[label] for label in labels]
        header = "| | published |" + "".join(f" {label} | ratio |" for label in labels[1:])
        lines += [
            f"**{phantom}**: {PHANTOMS[phantom]}",
            "",
            header,
            "|---|---:|" + "---:|---:|" * (len(labels) - 1),
        ]
        rows = [
            _row("whole run (process start to outputs)", "s", [r["wall"] for r in runs]),
            _row(
                "cold start (process start to models ready)", "s", [r["cold_start"] for r in runs]
            ),
            *(_row(stage, "s", [r["stages"][stage] for r in runs]) for stage in STAGES),
            _row("peak RSS", "MB", [r["peak_rss_mb"] for r in runs]),
            _row("warm scan (models loaded)", "s", [r["warm_scan"] for r in runs]),
            _row("peak GPU memory", "MB", [r["peak_gpu_mb"] for r in runs]),
            _row(
                "peak GPU memory, modelled (tensors)",
                "MB",
                [_modelled_mb(r, "tensors_gb") for r in runs],
            ),
            _row("GPU memory reserved", "MB", [r.get("peak_gpu_reserved_mb") for r in runs]),
            _row(
                "GPU memory, modelled (with margins)",
                "MB",
                [_modelled_mb(r, "total_gb") for r in runs],
            ),
        ]
        lines += [row for row in rows if row is not None]
        fast = "".join(
            f"; {mode} vs exact: {by_impl[f'{mode}_difference']:.1e}"
            for mode in ("fast", *FAST_MODES["cpu"])
            if f"{mode}_difference" in by_impl
        )
        lines += [
            "",
            f"Largest probability difference, ours vs published: "
            f"{by_impl['difference']:.1e}{fast}"
            + f". Same U-Net mask: {'yes' if by_impl['same_unet_mask'] else 'NO'}.",
            "",
        ]
    if choice := results.get("cpu_fast"):
        lines += [choice["line"] + ".", ""]
    return "\n".join(lines)


def update_docs(table: str, chart: Path, device: str) -> None:
    """Replace the performance page's block for this device with the table and chart."""
    link = os.path.relpath(chart, PERFORMANCE.parent)
    replace_block(f"bench-{device}", f"{table}\n![benchmark]({link})")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--phantoms",
        default="small,chest",
        help=f"comma-separated, of: {', '.join(PHANTOMS)} (default: both)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--no-fast",
        action="store_true",
        help="skip the fast modes (on a CPU both, int8 and bfloat16; on a GPU float16)",
    )
    parser.add_argument(
        "--warm-scans",
        type=int,
        default=0,
        help="extra scans per run, timed as warm scans (default 0; 2 on a GPU)",
    )
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        help="cap PyTorch's GPU memory per run at this many GiB, to check that a smaller "
        "GPU suffices (a 16 GB T4: 15; an allocation beyond it fails the run)",
    )
    parser.add_argument("--out", type=Path, default=REPOSITORY / "bench" / "results")
    parser.add_argument(
        "--update-docs",
        "--update-readme",
        action="store_true",
        help="replace the benchmark block of docs/explanation/performance.md with these "
        "figures (--update-readme: its old name)",
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.phantoms.split(",") if n.strip()]
    unknown = [n for n in names if n not in PHANTOMS]
    if unknown:
        parser.error(f"unknown phantoms {unknown}; choose from {list(PHANTOMS)}")
    warm = args.warm_scans or (2 if args.device == "cuda" else 0)
    impls = [("published", "exact"), ("ours", "exact")] + (
        [] if args.no_fast else [("ours", mode) for mode in FAST_MODES[args.device]]
    )

    raw: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in names}
    for repetition in range(args.repeat):
        for name in names:
            for impl, precision in impls:
                label = impl if precision == "exact" else f"{impl}-{precision}"
                scans = 1 + (warm if impl == "ours" else 0)
                report = run_once(
                    impl, phantom_path(name), args.device, precision, scans, args.gpu_memory_gb
                )
                raw[name].setdefault(label, []).append(report)
                print(
                    f"[{repetition + 1}/{args.repeat}] {name} {label}: {report['wall']:.1f} s, "
                    f"{report['peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
                if modelled := report.get("modelled_gpu"):
                    print(
                        f"    GPU memory: {report['peak_gpu_mb'] / 1024:.2f} GiB allocated at "
                        f"the peak, {modelled['tensors_gb'] * 1e9 / 2**30:.2f} GiB modelled; "
                        f"{report['peak_gpu_reserved_mb'] / 1024:.2f} GiB reserved, "
                        f"{modelled['total_gb'] * 1e9 / 2**30:.2f} GiB modelled with the "
                        f"margins ({modelled['workload']})",
                        file=sys.stderr,
                        flush=True,
                    )

    phantoms: dict[str, Any] = {}
    for name in names:
        summary = {label: summarise(runs) for label, runs in raw[name].items()}
        p_pub, p_ours = summary["published"]["probabilities"], summary["ours"]["probabilities"]
        summary["difference"] = max(abs(a - b) for a, b in zip(p_pub, p_ours, strict=True))
        summary["same_unet_mask"] = (
            summary["published"]["unet_digests"] == summary["ours"]["unet_digests"]
        )
        for mode in FAST_MODES[args.device]:
            if f"ours-{mode}" in summary:
                p_fast = summary[f"ours-{mode}"]["probabilities"]
                summary[f"{mode}_difference"] = max(
                    abs(a - b) for a, b in zip(p_ours, p_fast, strict=True)
                )
        phantoms[name] = summary

    import platform

    import torch

    from stoic_ct.inference.precision import bfloat16_units, cpu_fast

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        + (torch.cuda.get_device_name() if args.device == "cuda" else "no GPU used"),
        "device": args.device,
        "repeat": args.repeat,
        "gpu_memory_cap_gb": args.gpu_memory_gb,
        "phantoms": phantoms,
        "raw": raw,
    }
    if args.device == "cpu" and not args.no_fast:
        results["cpu_fast"] = cpu_fast_choice(phantoms, bfloat16_units(), cpu_fast())
        print(results["cpu_fast"]["line"], file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"latest-{args.device}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / f"{stem}.md").write_text(table + "\n")
    chart = bar_chart(results, args.out / f"{stem}.png")
    print(table)
    print(f"written: {args.out / stem}.json, .md, .png", file=sys.stderr)
    if args.update_docs:
        update_docs(table, chart, args.device)


if __name__ == "__main__":
    main()
