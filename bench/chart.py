"""A small bar chart of the benchmark, drawn with Pillow: seconds per stage, per implementation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from bench.runner import STAGES

COLOURS = {
    "published": (200, 80, 60),
    "ours": (60, 120, 200),
    "ours-fast": (90, 180, 110),
    "ours-int8": (90, 180, 110),
    "ours-bfloat16": (230, 170, 40),
}
LABELS = tuple(COLOURS)  # the implementations' labels, in the order tables show them
ROW, BAR, LEFT, WIDTH = 18, 5, 150, 520


def bar_chart(results: dict[str, Any], path: Path) -> Path:
    """One panel per phantom: a bar per implementation for each stage and for the whole run."""
    font = ImageFont.load_default(size=12)
    panels = []
    for phantom, summary in results["phantoms"].items():
        labels = [label for label in COLOURS if label in summary]
        rows = [("whole run", {label: summary[label]["wall"] for label in labels})]
        rows += [
            (stage, {label: summary[label]["stages"][stage] for label in labels})
            for stage in STAGES
        ]
        longest = max(max(values.values()) for _, values in rows) or 1.0
        height = 30 + ROW * len(rows) + 20
        panel = Image.new("RGB", (LEFT + WIDTH + 70, height), "white")
        draw = ImageDraw.Draw(panel)
        draw.text(
            (5, 5), f"{phantom}: seconds (median of {results['repeat']})", fill="black", font=font
        )
        for i, (name, values) in enumerate(rows):
            top = 30 + ROW * i
            draw.text((5, top), name, fill="black", font=font)
            for j, label in enumerate(labels):
                length = int(WIDTH * values[label] / longest)
                y = top + j * BAR
                draw.rectangle([LEFT, y, LEFT + max(length, 1), y + BAR - 1], fill=COLOURS[label])
            draw.text((LEFT + WIDTH + 5, top), f"{values[labels[0]]:.1f}", fill="black", font=font)
        legend_x = 5
        for label in labels:
            draw.rectangle([legend_x, height - 14, legend_x + 10, height - 4], fill=COLOURS[label])
            draw.text((legend_x + 14, height - 16), label, fill="black", font=font)
            legend_x += 110
        panels.append(panel)
    canvas = Image.new(
        "RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white"
    )
    y = 0
    for panel in panels:
        canvas.paste(panel, (0, y))
        y += panel.height
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
