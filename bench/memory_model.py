"""The GPU memory model's figures, computed on this machine (no GPU needed).

    .venv/bin/python -m bench.memory_model [--out bench/results] [--update-docs]

For a chest CT (512 x 512 x 300 at 0.7 x 0.7 x 1.25 mm) at the default GPU batch sizes:
Balaitous and the ensemble (with the STOIC2021 winner's fine-tuned ConvNeXt, 5 folds per
task), exact and fast; and one training step of `finetune` at the winner's recipe
(tiny, 256^3, batch 4, mixed precision) and at 224^3. Written to OUT/gpu-memory-model.json
and .md; `--update-docs` replaces the block of modelled figures in
docs/explanation/performance.md. They are
modelled (stoic_ct.device_memory), not measured: `make gpu-check` measures them where a
GPU is lent, and `python -m bench --device cuda` prints both.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.docs_block import replace_block
from stoic_ct.convnext_training.recipes import PRESETS, FinetuneSettings
from stoic_ct.convnext_training.training_memory import finetune_step_peak
from stoic_ct.device_memory import MemoryEstimate
from stoic_ct.inference.gpu_memory import ConvNeXtShape, Workload, modelled_peak

REPOSITORY = Path(__file__).resolve().parent.parent
WINNER = ConvNeXtShape("tiny", 256, outputs=1, metadata=2)


def figures() -> list[dict[str, Any]]:
    """Every modelled case: what runs, and its estimate."""
    cases: list[tuple[str, MemoryEstimate]] = []
    for precision in ("exact", "fast"):
        balaitous = Workload(precision)
        cases.append((f"predict, Balaitous, {balaitous.describe()}", modelled_peak(balaitous)))
        ensemble = replace(balaitous, classifiers=((WINNER, 5), (WINNER, 5)))
        cases.append((f"predict, ensemble, {ensemble.describe()}", modelled_peak(ensemble)))
    winner = FinetuneSettings(**PRESETS["stoic2021-winner"])
    for settings in (winner, replace(winner, input_size=224)):
        what = (
            f"finetune step, ConvNeXt-{settings.size} at {settings.input_size}^3, "
            f"batch {settings.batch_size}, float16 autocast"
        )
        cases.append((what, finetune_step_peak(settings)))
    return [{"case": what, **estimate.as_dict()} for what, estimate in cases]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table of modelled figures."""
    lines = [
        f"Modelled {time.strftime('%Y-%m-%d')} by `python -m bench.memory_model` (not measured "
        "on a GPU), for a chest CT of 512 x 512 x 300 voxels at 0.7 x 0.7 x 1.25 mm; GB = 10^9 "
        "bytes.",
        "",
        "| what runs | modelled peak | tensors | at the stage | margins: context, "
        "workspaces, fragmentation |",
        "|---|---:|---:|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['total_gb']:.2f} GB | {row['tensors_gb']:.2f} GB | "
            f"{row['peak_stage']} | {row['context_gb']:.2f}, {row['workspaces_gb']:.2f}, "
            f"{row['fragmentation_gb']:.2f} GB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_model", description=__doc__)
    parser.add_argument("--out", type=Path, default=REPOSITORY / "bench" / "results")
    parser.add_argument(
        "--update-docs", "--update-readme", action="store_true", help="rewrite the page's table"
    )
    args = parser.parse_args(argv)
    rows = figures()
    table = markdown(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-memory-model.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "gpu-memory-model.md").write_text(table + "\n")
    print(table)
    if args.update_docs:
        replace_block("gpu-memory-model", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
