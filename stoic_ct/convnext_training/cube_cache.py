"""The fine-tuning data: each scan (and lesion mask) once as the ConvNeXt's cube, cached on disk.

A cube is `classifier_input` of the scan: canonical orientation, HU window, cubic resize
to (S, S, S), stored as float16 `.npy` (22 MB at 224^3) and read memory-mapped batch by
batch. Files are named by patient, the scan's sha256, the size and the window, so a
changed scan or setting is prepared again and an interrupted preparation resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stoic_ct.atomic import atomic_write, atomic_write_text
from stoic_ct.convnext_training.augmentation import Compose
from stoic_ct.errors import InputError, StoicError
from stoic_ct.io.cohort import REFERENCE, STOIC_TASKS, Patient, read_cohort, read_grades, task_rows
from stoic_ct.io.demographics import Demographics, header_demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.preprocessing.convnext_preprocessing import (
    DEFAULT_WINDOW,
    classifier_input,
    label_cube,
)
from stoic_ct.weights.model_files import sha256_of

logger = logging.getLogger(__name__)

# What finetune can learn: the two STOIC tasks, and COV19-CT-DB's four severity grades.
FINETUNE_TASKS = (*STOIC_TASKS, "severity4")
LESION_DIR = Path("data") / "lesions"


@dataclass(frozen=True)
class Cube:
    """One patient's cached cube(s): image (S, S, S) float16 `.npy`, lesions uint8 or None,
    and the (age_feature, sex_feature) of the scan's header (the networks' metadata)."""

    patient: str
    image: Path
    lesions: Path | None = None
    metadata: tuple[float, float] = Demographics().features

    def load(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, S, S, S) float32 image and (1, S, S, S) uint8 lesion mask (or None), on the CPU."""
        image = torch.from_numpy(np.load(self.image, mmap_mode="r").astype(np.float32))[None]
        if self.lesions is None:
            return image, None
        return image, torch.from_numpy(np.load(self.lesions))[None]


def load_batch(
    cubes: Sequence[Cube],
    indices: Sequence[int],
    device: torch.device,
    augment: Compose | None = None,
    seeds: Sequence[int] = (),
    with_lesions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 1, S, S, S) float32 images on `device`, and (B, S, S, S) lesion masks when asked.

    With `augment`, each sample (and its mask) is augmented with its own seed from `seeds`.

    Raises:
        ValueError: when lesion masks are asked for and a cube has none cached.
    """
    images, masks = [], []
    for n, index in enumerate(indices):
        image, lesions = cubes[index].load()
        if with_lesions and lesions is None:
            raise ValueError(f"{cubes[index].patient}: no lesion mask was cached")
        image = image.to(device, non_blocking=True)
        mask = lesions.to(device) if with_lesions and lesions is not None else None
        if augment is not None:
            image, mask = augment(image, mask, seeds[n])
        images.append(image)
        if mask is not None:
            masks.append(mask[0])
    return torch.stack(images), torch.stack(masks) if with_lesions else None


def metadata_batch(
    cubes: Sequence[Cube], indices: Sequence[int], device: torch.device
) -> torch.Tensor:
    """(B, 2) float32 (age_feature, sex_feature) of the cubes at `indices`, on `device`."""
    return torch.tensor([cubes[i].metadata for i in indices], dtype=torch.float32, device=device)


def task_patients(data_dir: Path, task: str) -> tuple[list[Patient], np.ndarray]:
    """The patients a task trains on, with (N,) int64 class indices.

    covid: every patient with a COVID label; severe: COVID-positive patients with a
    severity label (the STOIC rule); severity4: patients with a `severity` grade (0-3).

    Raises:
        InputError: when the folder is not a STOIC-layout cohort or has no labels.
    """
    if task not in FINETUNE_TASKS:
        raise ValueError(f"task must be one of {', '.join(FINETUNE_TASKS)}, not {task!r}")
    patients = read_cohort(data_dir)
    reference = data_dir / REFERENCE
    if not reference.exists():
        raise InputError("is missing: fine-tuning needs labels", reference)
    if task == "severity4":
        grades = read_grades(reference)
        chosen = [p for p in patients if p.id in grades]
        labels = np.array([grades[p.id] for p in chosen], dtype=np.int64)
    else:
        covid = np.array([p.covid for p in patients])
        severe = np.array([p.severe for p in patients])
        rows = task_rows(covid, severe, task)
        chosen = [p for p, keep in zip(patients, rows, strict=True) if keep]
        labels = (covid if task == "covid" else severe)[rows].astype(np.int64)
    if not chosen:
        raise InputError(f"labels no scan of data/mha for the {task} task", reference)
    return chosen, labels


def save_array(path: Path, array: np.ndarray) -> None:
    """`np.save` to `path`, atomically."""
    atomic_write(path, lambda f: np.save(f, array))


def _digest(path: Path) -> str:
    return sha256_of(path)[:16]


def cached_cubes(
    patients: Sequence[Patient],
    cache_dir: Path,
    size: int,
    window: tuple[float, float] = DEFAULT_WINDOW,
    lesion_dir: Path | None = None,
    progress: bool = True,
) -> list[Cube]:
    """Each patient's cube (prepared now when not cached), in the patients' order.

    Args:
        lesion_dir: a folder of <PatientID>.mha lesion masks (same grid as the scan) to
            cache beside the images; every patient must have one.

    Raises:
        InputError: naming the scan or mask that cannot be read or used.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    setting = hashlib.sha256(f"{size}-{window[0]:g}-{window[1]:g}".encode()).hexdigest()[:8]
    cubes = []
    bar = tqdm(patients, desc="cubes", unit="scan", disable=None if progress else True)
    for patient in bar:
        stem = f"{patient.id}-{_digest(patient.image)}"
        image = cache_dir / f"{stem}-{setting}.npy"
        header = cache_dir / f"{stem}-header.json"
        if not image.exists() or not header.exists():
            try:
                scan = read_scan(patient.image)
                if not image.exists():
                    cube = classifier_input(scan.volume, size, window)[0].numpy()
                    save_array(image, cube.astype(np.float16))
            except StoicError as error:
                raise error.with_path(patient.image) from None
            atomic_write_text(header, json.dumps(scan.header, sort_keys=True) + "\n")
        demographics = header_demographics(json.loads(header.read_text(encoding="utf-8")))
        lesions = None
        if lesion_dir is not None:
            source = lesion_dir / f"{patient.id}.mha"
            if not source.exists():
                raise InputError(
                    f"is missing: every scan needs a lesion mask ({patient.id})", source
                )
            lesions = cache_dir / f"{patient.id}-lesions-{_digest(source)}-{setting}.npy"
            if not lesions.exists():
                mask = read_scan(source).volume
                labels = label_cube(mask, size)[0].numpy()
                save_array(lesions, labels)
        cubes.append(Cube(patient.id, image, lesions, demographics.features))
    return cubes
