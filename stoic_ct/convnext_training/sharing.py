"""How the ranks of a ConvNeXt training run share its preparation and its units.

The cubes (and pretraining's pseudo-labels) are made in chunks of patients, each
claimed in the cache folder by one rank (stoic_ct.distributed.in_chunks), so that every
scan is read once however many ranks there are, and a chunk a lost rank left is taken
over. Each fold of a task is a unit of its run folder, done for the settings that made it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stoic_ct.convnext_training.cube_cache import Cube, cached_cubes
from stoic_ct.distributed import Ranks, in_chunks
from stoic_ct.io.cohort import Patient
from stoic_ct.preprocessing.convnext_preprocessing import DEFAULT_WINDOW

CLAIMS = "claims"


def settings_key(settings: Any) -> str:
    """A digest of a settings dataclass: what a unit is done for."""
    text = json.dumps(asdict(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shared_cubes(
    patients: Sequence[Patient],
    cache_dir: Path,
    size: int,
    ranks: Ranks,
    lesion_dir: Path | None = None,
    progress: bool = True,
) -> list[Cube]:
    """`cached_cubes` of every patient, the missing ones prepared by the ranks together."""
    if ranks.alone:
        return cached_cubes(patients, cache_dir, size, lesion_dir=lesion_dir, progress=progress)
    key = hashlib.sha256(f"cubes {size} {DEFAULT_WINDOW} {lesion_dir}".encode()).hexdigest()[:16]
    in_chunks(
        [p.id for p in patients],
        cache_dir,
        key,
        lambda name, rows: cached_cubes(
            [patients[i] for i in rows],
            cache_dir,
            size,
            lesion_dir=lesion_dir,
            progress=False,
        ),
        ranks,
    )
    return cached_cubes(patients, cache_dir, size, lesion_dir=lesion_dir, progress=False)
