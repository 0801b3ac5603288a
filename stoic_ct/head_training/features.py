"""Encoder features of a cohort: extraction with a per-scan cache, the feature table, shards.

The feature table is one `.npz` file (numpy, no pickles), N rows sorted by patient:

| key | shape, type | what |
|---|---|---|
| `patient_id` | (N,) str | the scan's file name without `.mha` |
| `feature_full`, `feature_lung` | (N, D) float64 | the two encoders' flip-averaged CLS features |
| `age_years` | (N,) float64 | age as resolved from the header (65 when absent) |
| `sex` | (N,) str | "M", "F" or "" (unknown) |
| `age_feature`, `sex_feature` | (N,) float64 | the heads' encoding (the pipeline's step 1) |
| `covid`, `severe` | (N,) int8 | labels from reference.csv: 1, 0, or -1 when not given |
| `provenance` | () str | JSON: model files' sha256, precision, lung masks, failures, version |

The cache holds one small `.npz` per scan, named by the scan's sha256, the lung mask's
(or "r231") and the encoder key (the model files' sha256 and the precision): a rerun
after an interruption computes only what is missing, and a changed scan is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from stoic_ct.atomic import atomic_write
from stoic_ct.errors import InputError, StoicError
from stoic_ct.inference.pipeline import EncodedScan
from stoic_ct.io.cohort import Patient, check_shards, task_rows
from stoic_ct.io.demographics import Demographics, header_demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.io.orientation import Orientation
from stoic_ct.io.volume import Volume
from stoic_ct.weights.model_files import ModelFiles, encoder_kind, sha256_of

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LOG_EVERY_SECONDS = 60.0
MASK_SUFFIXES = (".mha", ".mhd", ".nii.gz", ".nii", ".nrrd")


@dataclass(frozen=True)
class FeatureTable:
    """Per-patient features, demographics and labels; see the module docstring for the file."""

    patient_id: np.ndarray
    feature_full: np.ndarray
    feature_lung: np.ndarray
    age_years: np.ndarray
    sex: np.ndarray
    age_feature: np.ndarray
    sex_feature: np.ndarray
    covid: np.ndarray
    severe: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)

    ARRAYS = (
        "patient_id",
        "feature_full",
        "feature_lung",
        "age_years",
        "sex",
        "age_feature",
        "sex_feature",
        "covid",
        "severe",
    )

    def __len__(self) -> int:
        return len(self.patient_id)

    @property
    def dim(self) -> int:
        """D, the length of each encoder feature."""
        return int(self.feature_full.shape[1])

    def features(self, encoder: str) -> np.ndarray:
        """(N, D) features of the "full" or "lung" encoder."""
        return self.feature_full if encoder == "full" else self.feature_lung

    def take(self, rows: np.ndarray | slice) -> FeatureTable:
        """The rows selected by a boolean mask, an index array or a slice."""
        return replace(self, **{name: getattr(self, name)[rows] for name in self.ARRAYS})

    def save(self, path: Path) -> Path:
        """Write the table atomically (a temporary file, then a rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in self.ARRAYS}
        arrays["provenance"] = np.array(json.dumps(self.provenance, sort_keys=True))
        _atomic_savez(path, arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> FeatureTable:
        """Read a table written by `save`.

        Raises:
            InputError: when the file is not such a table.
        """
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise InputError(f"cannot be read as a feature table ({error})", path) from None
        missing = [k for k in (*cls.ARRAYS, "provenance") if k not in arrays]
        if missing:
            raise InputError(
                f"is not a feature table written by extract-features: it lacks "
                f"{', '.join(missing)}",
                path,
            )
        table = cls(
            **{k: arrays[k] for k in cls.ARRAYS},
            provenance=json.loads(str(arrays["provenance"])),
        )
        n = len(table.patient_id)
        for name in cls.ARRAYS:
            value = getattr(table, name)
            if len(value) != n or (name.startswith("feature_") and value.ndim != 2):
                raise InputError(f"{name} has shape {value.shape}, for {n} patients", path)
        if table.feature_full.shape != table.feature_lung.shape:
            raise InputError("feature_full and feature_lung differ in shape", path)
        return table


def merge_tables(
    tables: Sequence[FeatureTable], names: Sequence[str] | None = None
) -> FeatureTable:
    """One table from shards of the same extraction, sorted by patient.

    Args:
        names: each table's name in messages (its file); default "table 1", ...

    Raises:
        InputError: when the shards come from different model files or precisions, a
            shard is missing or given twice, a shard's table lacks some of its patients
            (in neither its rows nor its failures), or a patient is in two tables.
    """
    if not tables:
        raise InputError("no feature table to merge")
    keys = {t.provenance.get("encoder_key") for t in tables}
    if len(keys) != 1:
        raise InputError(
            "the tables were extracted with different model files or precisions "
            f"(encoder keys {sorted(str(k)[:12] for k in keys)}); merge only shards of one run"
        )
    names = names or [f"table {i + 1}" for i in range(len(tables))]
    check_shards(
        [
            (
                name,
                t.provenance,
                set(t.patient_id.tolist()) | {f["patient_id"] for f in t.provenance["failures"]},
            )
            for name, t in zip(names, tables, strict=True)
        ]
    )
    ids = np.concatenate([t.patient_id for t in tables])
    order = np.argsort(ids, kind="stable")
    merged = {
        name: np.concatenate([getattr(t, name) for t in tables])[order]
        for name in FeatureTable.ARRAYS
    }
    provenance = {k: v for k, v in tables[0].provenance.items() if k not in ("shard_ids", "cohort")}
    provenance["failures"] = [f for t in tables for f in t.provenance.get("failures", [])]
    provenance["shard"] = None
    return FeatureTable(**merged, provenance=provenance)


@dataclass(frozen=True)
class ScanFeatures:
    """What one scan contributes to the table."""

    full: np.ndarray
    lung: np.ndarray
    demographics: Demographics
    lung_found: bool


class FeatureExtractor(Protocol):
    """Anything that turns a volume (and optionally a lung label image) into the two features.

    `stoic_ct.inference.pipeline.Balaitous` is one; tests pass counting or interrupting wrappers.
    """

    def encode(self, volume: Volume, lung_labels: Volume | None = None) -> EncodedScan: ...


def encoder_key(
    model_dir: Path,
    precision: str,
    with_r231: bool,
    encoder: str = "vit",
    orientation: Orientation = "canonical",
) -> dict[str, Any]:
    """What the features depend on besides the scan: the model files' sha256, the numbers
    the networks compute in (stoic_ct.inference.precision.numerics_of: "exact", "float16",
    "int8", "bfloat16"), the orientation the scans are read in.

    Returns:
        {"encoder_key": hex digest, "model_files": {name: sha256}, "precision": ...,
        "encoder": "vit" or "convnext3d-frozen", "orientation": "canonical" or "as-stored"}.
    """
    files = ModelFiles(model_dir)
    kind = encoder_kind(encoder)
    paths = [files.path(spec) for spec in kind.files] + ([files.r231] if with_r231 else [])
    started = time.perf_counter()
    digests = {p.name: sha256_of(p) for p in paths}
    logger.info("hashed the model files in %.1f s", time.perf_counter() - started)
    settings = {"files": digests, "precision": precision, "orientation": orientation}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return {
        "encoder_key": key,
        "model_files": digests,
        "precision": precision,
        "encoder": kind.name,
        "orientation": orientation,
    }


def find_mask(masks_dir: Path, patient: str) -> Path:
    """The lung mask file of `patient` in `masks_dir` (<PatientID>.mha, .nii.gz, ...).

    Raises:
        InputError: when there is none.
    """
    for suffix in MASK_SUFFIXES:
        candidate = masks_dir / f"{patient}{suffix}"
        if candidate.exists():
            return candidate
    raise InputError(f"no lung mask {patient}.mha (or .nii.gz, .nrrd) for this patient", masks_dir)


def extract(
    patients: Sequence[Patient],
    model: FeatureExtractor,
    cache_dir: Path,
    key: dict[str, Any],
    masks_dir: Path | None = None,
    progress: bool = True,
) -> FeatureTable:
    """Features of every patient, read from the cache when there, computed otherwise.

    A scan that fails is logged, listed in `provenance["failures"]` and left out; the
    others go on. An interruption (Ctrl-C) loses only the scan in progress.

    Raises:
        InputError: when no scan at all gave features.
    """
    rows, failures = fill_cache(patients, model, cache_dir, key, masks_dir, progress)
    if not rows:
        raise InputError("no scan gave features; see the messages above")
    provenance = key | {
        "format_version": FORMAT_VERSION,
        "lung_masks": str(masks_dir) if masks_dir is not None else "R231 U-Net",
        "failures": failures,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return _table(rows, provenance)


def fill_cache(
    patients: Sequence[Patient],
    model: FeatureExtractor,
    cache_dir: Path,
    key: dict[str, Any],
    masks_dir: Path | None = None,
    progress: bool = True,
) -> tuple[list[tuple[Patient, ScanFeatures]], list[dict[str, str]]]:
    """Each patient's features, from the cache or computed and cached; and the failures
    (PatientID and message each), logged and left out."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[Patient, ScanFeatures]] = []
    failures: list[dict[str, str]] = []
    cached = 0
    # disable=None: a bar on a terminal only, so that logs stay readable.
    bar = tqdm(patients, desc="features", unit="scan", disable=None if progress else True)
    started = last_report = time.perf_counter()
    for done, patient in enumerate(bar):
        if time.perf_counter() - last_report > LOG_EVERY_SECONDS:
            last_report = time.perf_counter()
            _log_progress(done, len(patients), last_report - started)
        try:
            mask = find_mask(masks_dir, patient.id) if masks_dir is not None else None
            entry = cache_dir / _cache_name(patient.image, mask, key["encoder_key"])
            features = _read_cached(entry)
            if features is None:
                features = _compute(patient, model, mask, key["orientation"])
                _write_cached(entry, features)
            else:
                cached += 1
        except StoicError as error:
            message = str(error.with_path(patient.image))
            logger.error("%s", message)
            failures.append({"patient_id": patient.id, "error": message})
            continue
        except Exception as error:  # a bug or an exhausted device: report it, keep going
            logger.exception("%s: unexpected error", patient.image)
            failures.append(
                {"patient_id": patient.id, "error": f"unexpected {type(error).__name__}: {error}"}
            )
            continue
        if not features.lung_found:
            logger.warning("%s: no lung found; its features come from all slices", patient.image)
        rows.append((patient, features))
    logger.info(
        "%d scans: %d computed, %d from the cache %s, %d failed",
        len(patients),
        len(rows) - cached,
        cached,
        cache_dir,
        len(failures),
    )
    return rows, failures


def _log_progress(done: int, total: int, seconds: float) -> None:
    """A line with the ETA for logs that have no progress bar (a container's, a batch job's)."""
    per_scan = seconds / max(done, 1)
    left = per_scan * (total - done)
    logger.info(
        "features: %d/%d scans, %.1f s per scan, about %s left",
        done,
        total,
        per_scan,
        time.strftime("%H:%M:%S", time.gmtime(left))
        if left < 86400
        else f"{left / 86400:.1f} days",
    )


def _table(
    rows: Iterable[tuple[Patient, ScanFeatures]], provenance: dict[str, Any]
) -> FeatureTable:
    ordered = sorted(rows, key=lambda row: row[0].id)
    demographics = [f.demographics for _, f in ordered]
    return FeatureTable(
        patient_id=np.array([p.id for p, _ in ordered], dtype=str),
        feature_full=np.stack([f.full for _, f in ordered]).astype(np.float64),
        feature_lung=np.stack([f.lung for _, f in ordered]).astype(np.float64),
        age_years=np.array([d.age_years for d in demographics], dtype=np.float64),
        sex=np.array([d.sex or "" for d in demographics], dtype=str),
        age_feature=np.array([d.age_feature for d in demographics], dtype=np.float64),
        sex_feature=np.array([d.sex_feature for d in demographics], dtype=np.float64),
        covid=np.array([p.covid for p, _ in ordered], dtype=np.int8),
        severe=np.array([p.severe for p, _ in ordered], dtype=np.int8),
        provenance=provenance,
    )


def _compute(
    patient: Patient, model: FeatureExtractor, mask: Path | None, orientation: Orientation
) -> ScanFeatures:
    scan = read_scan(patient.image, orientation)
    demographics = header_demographics(scan.header)
    labels = read_scan(mask).volume if mask is not None else None
    try:
        encoded = model.encode(scan.volume, labels)
    except StoicError as error:
        raise error.with_path(mask or patient.image) from None
    return ScanFeatures(
        encoded.features["full"],
        encoded.features["lung"],
        demographics,
        encoded.slices.lung_found,
    )


def _cache_name(image: Path, mask: Path | None, key: str) -> str:
    mask_part = sha256_of(mask)[:16] if mask is not None else "r231"
    return f"{sha256_of(image)[:24]}-{mask_part}-{key[:16]}.npz"


def _read_cached(path: Path) -> ScanFeatures | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            sex = str(npz["sex"])
            return ScanFeatures(
                npz["full"],
                npz["lung"],
                Demographics(
                    float(npz["age_years"]),
                    "M" if sex == "M" else "F" if sex == "F" else None,
                    str(npz["age_source"]),
                    str(npz["sex_source"]),
                ),
                bool(npz["lung_found"]),
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        logger.warning("%s: unreadable cache entry, computing it again", path)
        return None


def _write_cached(path: Path, features: ScanFeatures) -> None:
    d = features.demographics
    _atomic_savez(
        path,
        {
            "full": features.full,
            "lung": features.lung,
            "age_years": np.array(d.age_years),
            "sex": np.array(d.sex or ""),
            "age_source": np.array(d.age_source),
            "sex_source": np.array(d.sex_source),
            "lung_found": np.array(features.lung_found),
        },
    )


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **arrays))


def labelled(table: FeatureTable, task: str) -> np.ndarray:
    """Rows usable for `task`: covid, every labelled patient; severe, the COVID-positive
    ones with a severity label (the STOIC rule)."""
    return task_rows(table.covid, table.severe, task)
