"""The quality-control picture shows the mask, the kept slices and the warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers import SMALL_PHANTOM
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.inference.qc import (
    KEPT_COLOUR,
    MASK_COLOUR,
    WARNING_COLOUR,
    ZOOM,
    render_qc,
    write_qc,
)
from stoic_ct.io.demographics import Demographics
from stoic_ct.io.volume import Volume
from stoic_ct.phantom import make_phantom


def colour_count(picture: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(picture == colour, axis=-1).sum())


def test_picture_shows_mask_and_kept_range(tiny_model: Balaitous, tmp_path: Path) -> None:
    result = tiny_model.predict(make_phantom(SMALL_PHANTOM), Demographics())
    path = write_qc(result, "scan.mha", tmp_path / "qc" / "scan.png")
    picture = np.asarray(render_qc(result, "scan.mha"))
    assert path.is_file()
    axial_width = 224 * ZOOM
    assert picture.shape[1] > 2 * axial_width
    assert colour_count(picture[:, :axial_width], MASK_COLOUR) > 100  # lung outline, axial
    coronal = picture[:, axial_width : 2 * axial_width]
    assert colour_count(coronal, MASK_COLOUR) > 100
    rows_with_kept_line = np.flatnonzero(np.all(coronal == KEPT_COLOUR, axis=-1).all(axis=1))
    assert len(rows_with_kept_line) >= 2  # top and bottom of the kept range, full width
    assert colour_count(picture, WARNING_COLOUR) == 0


def test_picture_warns_when_no_lung(tiny_model: Balaitous) -> None:
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    tissue = Volume(np.full((8, 60, 60), 40, np.int16), (3.0, 3.0, 5.0), (0.0, 0.0, 0.0), identity)
    picture = np.asarray(render_qc(tiny_model.predict(tissue, Demographics()), "tissue.mha"))
    assert colour_count(picture, MASK_COLOUR) == 0
    assert colour_count(picture, WARNING_COLOUR) > 20
