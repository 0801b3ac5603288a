"""Small line charts drawn with Pillow: ROC and calibration curves, learning curves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stoic_ct.atomic import atomic_write

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
GREY = (150, 150, 150)


@dataclass(frozen=True)
class Series:
    """One curve: (K,) x and y in the panel's ranges; `points` marks each point."""

    label: str
    x: np.ndarray
    y: np.ndarray
    points: bool = False


@dataclass(frozen=True)
class Panel:
    """One chart with a legend at the lower right.

    By default the unit square with the diagonal y = x dashed (ROC, calibration).
    """

    title: str
    x_label: str
    y_label: str
    series: Sequence[Series]
    x_range: tuple[float, float] = (0.0, 1.0)
    y_range: tuple[float, float] = (0.0, 1.0)
    diagonal: bool = True


def fitted_range(values: Sequence[float], floor: float | None = None) -> tuple[float, float]:
    """(low, high) covering `values` with 5 % room, from `floor` when given (e.g. 0)."""
    finite = [v for v in values if np.isfinite(v)]
    low = floor if floor is not None else min(finite, default=0.0)
    high = max(finite, default=1.0)
    room = 0.05 * (high - low) if high > low else 1.0
    return (low if floor is not None else low - room, high + room)


def line_panels(panels: Sequence[Panel], path: Path, side: int = 420) -> Path:
    """Draw the panels side by side into a PNG at `path`."""
    margin_left, margin_bottom, margin_top, margin_right = 60, 50, 34, 16
    width = len(panels) * (side + margin_left + margin_right)
    height = side + margin_top + margin_bottom
    image = Image.new("RGB", (max(width, 1), height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    for index, panel in enumerate(panels):
        left = index * (side + margin_left + margin_right) + margin_left
        top = margin_top

        (x0, x1), (y0, y1) = panel.x_range, panel.y_range

        def at(
            x: float, y: float, left: int = left, top: int = top, panel: Panel = panel
        ) -> tuple[float, float]:
            (x0, x1), (y0, y1) = panel.x_range, panel.y_range
            return left + (x - x0) / (x1 - x0) * side, top + (1.0 - (y - y0) / (y1 - y0)) * side

        draw.rectangle([at(x0, y1), at(x1, y0)], outline="black")
        for tick in np.linspace(0, 1, 5):
            x_tick, y_tick = x0 + tick * (x1 - x0), y0 + tick * (y1 - y0)
            x, y = at(x_tick, y0)
            draw.line([(x, y), (x, y + 4)], fill="black")
            draw.text((x, y + 6), f"{x_tick:.3g}", fill="black", font=font, anchor="mt")
            x, y = at(x0, y_tick)
            draw.line([(x - 4, y), (x, y)], fill="black")
            draw.text((x - 6, y), f"{y_tick:.3g}", fill="black", font=font, anchor="rm")
        if panel.diagonal:
            for step in range(0, 20, 2):  # dashed
                draw.line(
                    [at(step / 20, step / 20), at((step + 1) / 20, (step + 1) / 20)], fill=GREY
                )
        draw.text(at((x0 + x1) / 2, y1), panel.title, fill="black", font=font, anchor="md")
        draw.text(
            (left + side / 2, top + side + 28), panel.x_label, fill="black", font=font, anchor="mt"
        )
        _vertical_text(image, panel.y_label, font, (left - 50, top + side // 2))
        for number, series in enumerate(panel.series):
            colour = COLOURS[number % len(COLOURS)]
            xy = [at(float(x), float(y)) for x, y in zip(series.x, series.y, strict=True)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            if series.points:
                for x, y in xy:
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            legend_y = top + side - 16 * (len(panel.series) - number) - 6
            draw.line(
                [(left + side - 190, legend_y), (left + side - 170, legend_y)], fill=colour, width=3
            )
            draw.text(
                (left + side - 165, legend_y), series.label, fill="black", font=font, anchor="lm"
            )
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def _vertical_text(
    image: Image.Image,
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    centre_left: tuple[int, int],
) -> None:
    """Paste `text` turned a quarter left, its left edge and vertical centre at `centre_left`."""
    box = ImageDraw.Draw(image).textbbox((0, 0), text, font=font)
    label = Image.new("RGB", (int(box[2]) + 2, int(box[3]) + 2), "white")
    ImageDraw.Draw(label).text((1, 1), text, fill="black", font=font)
    turned = label.rotate(90, expand=True)
    x, y = centre_left
    image.paste(turned, (x, y - turned.height // 2))
