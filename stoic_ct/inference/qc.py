"""Quality-control picture: what the model saw, for a radiologist to check at a glance.

One PNG per scan: an axial slice (the middle of the kept range) and a coronal slice
through the lungs, both on the working grid after the 224 crop, in radiological view for
an axially acquired scan, with the lung mask outlined and, on the coronal view, the axial
slices given to the encoders marked.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from stoic_ct.inference.pipeline import BalaitousPrediction
from stoic_ct.preprocessing.cropping import PAD_HU
from stoic_ct.preprocessing.resampling import WORKING_SPACING

DISPLAY_WINDOW = (-1350.0, 150.0)  # a lung window: level -600, width 1500 HU
ZOOM = 2
MASK_COLOUR = (0, 220, 0)
KEPT_COLOUR = (255, 200, 0)
TEXT_COLOUR = (255, 255, 255)
WARNING_COLOUR = (255, 80, 80)
TEXT_WIDTH = 330  # pixels of the text column
TEXT_CHARACTERS = 38  # of the default 14-pixel font that fit in it
LINE_HEIGHT = 22


def _grey(hu: np.ndarray) -> np.ndarray:
    low, high = DISPLAY_WINDOW
    return (np.clip((hu.astype(np.float32) - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _outlined(hu: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(rows, cols) HU and mask -> (rows, cols, 3) uint8 RGB with the mask's border drawn."""
    rgb = np.repeat(_grey(hu)[..., None], 3, axis=2)
    border = mask & ~ndimage.binary_erosion(mask)
    rgb[border] = MASK_COLOUR
    return rgb


def render_qc(result: BalaitousPrediction, title: str, warnings: Sequence[str] = ()) -> Image.Image:
    """The QC picture for one result: axial and coronal views with the text beside them.

    `warnings` (what was logged about the scan) are written in red below the facts; long
    lines are wrapped to the text column.
    """
    stack = result.slices
    image, mask, kept = stack.image, stack.mask, stack.kept
    depth = image.shape[2]
    axial_index = (kept.start + kept.stop - 1) // 2
    # The slice layout has the rows reversed (published step 4); flip them back so that the
    # view is radiological: anterior up, the patient's right on the left.
    axial = Image.fromarray(_outlined(image[::-1, :, axial_index], mask[::-1, :, axial_index]))

    # Coronal: the row (anterior-posterior position) crossing the most lung; z up.
    row = int(np.argmax(mask.sum(axis=(1, 2)))) if stack.lung_found else image.shape[0] // 2
    coronal_rgb = _outlined(image[row].T[::-1], mask[row].T[::-1])
    stretch = WORKING_SPACING[2] / WORKING_SPACING[0]
    coronal_height = max(1, round(depth * stretch))
    coronal = Image.fromarray(coronal_rgb).resize(
        (coronal_rgb.shape[1], coronal_height), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(coronal)
    for z in (kept.start, kept.stop - 1):
        y = round((depth - 1 - z + 0.5) * stretch)
        draw.line([(0, y), (coronal.width - 1, y)], fill=KEPT_COLOUR, width=1)

    axial = axial.resize((axial.width * ZOOM, axial.height * ZOOM), Image.Resampling.NEAREST)
    coronal = coronal.resize(
        (coronal.width * ZOOM, coronal.height * ZOOM), Image.Resampling.NEAREST
    )
    canvas = Image.new(
        "RGB", (axial.width + coronal.width + TEXT_WIDTH, max(axial.height, coronal.height, 260))
    )
    canvas.paste(axial, (0, 0))
    canvas.paste(coronal, (axial.width, 0))

    font = ImageFont.load_default(size=14)
    p, d = result.probabilities, result.demographics
    lines = [
        (title, TEXT_COLOUR),
        (f"P(COVID-19)        {p.covid:.4f}", TEXT_COLOUR),
        (f"P(severe COVID-19) {p.severe:.4f}", TEXT_COLOUR),
        (f"age {d.age_years:g} y ({d.age_source})", TEXT_COLOUR),
        (f"sex {d.sex or 'unknown'} ({d.sex_source})", TEXT_COLOUR),
        (f"axial slices {kept.start}-{kept.stop - 1} of 0-{depth - 1} kept", KEPT_COLOUR),
        (f"left: axial slice {axial_index}; right: coronal row {row}", TEXT_COLOUR),
        ("green: lung mask   yellow: kept slice range", TEXT_COLOUR),
    ]
    if not stack.lung_found:
        lines.append(("NO LUNG FOUND: all slices used", WARNING_COLOUR))
    if not np.any(image != PAD_HU):
        lines.append(("the crop holds only padding", WARNING_COLOUR))
    lines += [(f"warning: {w}", WARNING_COLOUR) for w in warnings]
    wrapped = [
        (part, colour) for text, colour in lines for part in textwrap.wrap(text, TEXT_CHARACTERS)
    ]
    height = max(canvas.height, 20 + LINE_HEIGHT * len(wrapped))
    if height > canvas.height:
        taller = Image.new("RGB", (canvas.width, height))
        taller.paste(canvas, (0, 0))
        canvas = taller
    draw = ImageDraw.Draw(canvas)
    x = axial.width + coronal.width + 10
    for i, (text, colour) in enumerate(wrapped):
        draw.text((x, 10 + LINE_HEIGHT * i), text, fill=colour, font=font)
    return canvas


def write_qc(
    result: BalaitousPrediction, title: str, path: Path, warnings: Sequence[str] = ()
) -> Path:
    """Render the QC picture and save it as PNG at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    render_qc(result, title, warnings).save(path)
    return path
