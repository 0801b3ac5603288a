"""Small line charts on the unit square (ROC and calibration curves), drawn with Pillow."""

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
    """One curve: (K,) x and y in [0, 1]; `points` marks each point (for binned curves)."""

    label: str
    x: np.ndarray
    y: np.ndarray
    points: bool = False


@dataclass(frozen=True)
class Panel:
    """One chart: axes from 0 to 1, the diagonal y = x dashed, a legend at the lower right."""

    title: str
    x_label: str
    y_label: str
    series: Sequence[Series]


def unit_square_panels(panels: Sequence[Panel], path: Path, side: int = 420) -> Path:
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

        def at(x: float, y: float, left: int = left, top: int = top) -> tuple[float, float]:
            return left + x * side, top + (1.0 - y) * side

        draw.rectangle([at(0, 1), at(1, 0)], outline="black")
        for tick in np.linspace(0, 1, 5):
            x, y = at(float(tick), 0)
            draw.line([(x, y), (x, y + 4)], fill="black")
            draw.text((x, y + 6), f"{tick:g}", fill="black", font=font, anchor="mt")
            x, y = at(0, float(tick))
            draw.line([(x - 4, y), (x, y)], fill="black")
            draw.text((x - 6, y), f"{tick:g}", fill="black", font=font, anchor="rm")
        for step in range(0, 20, 2):  # the diagonal, dashed
            draw.line([at(step / 20, step / 20), at((step + 1) / 20, (step + 1) / 20)], fill=GREY)
        draw.text(at(0.5, 1), panel.title, fill="black", font=font, anchor="md")
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
