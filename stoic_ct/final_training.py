"""The STOIC2021 final-phase training run (`train.py`): one or both systems and their
ensemble, trained on a cohort in the training layout, into one complete model folder.

    balaitous   features of every scan (SCRATCH/feature-cache; one shard per device), the
                four heads (OUTPUT/balaitous.npz, heads.json), and their nested
                cross-validation (SCRATCH/balaitous/oof.csv; OUTPUT/report/ with --evaluate)
    convnext3d  the fine-tuned ConvNeXt for each task (SCRATCH/convnext3d-<task>/, the
                folds shared among the devices), OUTPUT/convnext3d_<task>.pth
    both        the two, then the ensemble's weights from their out-of-fold predictions
                (OUTPUT/ensemble.json, OUTPUT/ensemble-report/)

The encoders and the U-Net (and the RANDOM_WEIGHTS marker, where there is one) are copied
from the model folder, OUTPUT/MANIFEST lists every model file, and OUTPUT/system.json says
which system the folder holds (balaitous, convnext3d, or ensemble for both) with the
cohort's size and the out-of-fold AUCs: OUTPUT is a --model-dir for process.py and the
server, which run that system with no option, and what export.sh packs. Everything slow
is kept under SCRATCH, so a run started again after an interruption resumes: cached
features and cubes, and each fold's last.pt. OUTPUT/training.json records the settings
and the time of each stage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from stoic_ct.atomic import atomic_write_text
from stoic_ct.convnext_training.finetuning import finetune
from stoic_ct.convnext_training.recipes import PRESETS, FinetuneSettings
from stoic_ct.ensemble.fitting import fit_ensemble
from stoic_ct.errors import StoicError
from stoic_ct.head_training.evaluation import (
    cross_validate,
    nested_auc,
    protocol,
    report,
    write_oof,
)
from stoic_ct.head_training.features import FeatureTable, encoder_key, extract, merge_tables
from stoic_ct.head_training.training import (
    FitSettings,
    fit_heads,
    heads_document,
    to_logistic_heads,
    write_heads,
)
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.inference.precision import ModelSettings
from stoic_ct.io.cohort import UNKNOWN, Patient, read_cohort, shard
from stoic_ct.io.orientation import Orientation
from stoic_ct.parallel import on_devices
from stoic_ct.preprocessing.cubes import task_patients
from stoic_ct.weights.model_files import (
    CONVNEXT3D,
    ENSEMBLE_WEIGHTS,
    R231,
    RANDOM_WEIGHTS_MARKER,
    SYSTEM_RECORD,
    encoder_kind,
    sha256_of,
    update_manifest,
)
from stoic_ct.weights.system_record import choose, origin, write_system_record

logger = logging.getLogger(__name__)

SYSTEMS = ("balaitous", "convnext3d", "both")
# The system each choice leaves in the model folder (its system.json).
TRAINED_SYSTEM = {"balaitous": "balaitous", "convnext3d": "convnext3d", "both": "ensemble"}
# The ConvNeXt's recipe in the final phase: the STOIC2021 severity winner's, for each task.
CONVNEXT_RECIPE = "stoic2021-winner"


@dataclass(frozen=True)
class TrainingRun:
    """What a final-phase training run reads, writes and how.

    Attributes:
        model: how Balaïtous's encoders run (its device: the first of `devices`).
        devices: every device the run may use.
        heads: how the heads are fitted; folds and repeats: their nested cross-validation.
        convnext: FinetuneSettings values that replace the recipe's, for both tasks.
    """

    input_dir: Path
    output_dir: Path
    scratch_dir: Path
    model_dir: Path
    system: str
    model: ModelSettings
    devices: tuple[torch.device, ...]
    orientation: Orientation = "canonical"
    lung_masks: Path | None = None
    heads: FitSettings = field(default_factory=FitSettings)
    folds: int = 8
    repeats: int = 4
    evaluate: bool = False
    convnext: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise StoicError(f"system must be one of {', '.join(SYSTEMS)}, not {self.system!r}")

    @property
    def encoder(self) -> str:
        """The encoders under the heads: the model's, else the model folder's choice."""
        return self.model.encoder or choose(self.model_dir).encoder

    @property
    def trains_balaitous(self) -> bool:
        return self.system in ("balaitous", "both")

    @property
    def trains_convnext(self) -> bool:
        return self.system in ("convnext3d", "both")

    def convnext_settings(self, task: str) -> FinetuneSettings:
        """The recipe for `task`, with `convnext`'s values; the model folder's convnext3d.pth
        (inflate-convnext's or pretrain's) as the starting point when none is given."""
        values = PRESETS[CONVNEXT_RECIPE] | {"task": task} | self.convnext
        start = self.model_dir / CONVNEXT3D.name
        if "init" not in values and start.is_file():
            values["init"] = str(start.resolve())
        try:
            return FinetuneSettings(**values)
        except (TypeError, ValueError) as error:
            raise StoicError(f"the ConvNeXt settings: {error}") from None


def train(run: TrainingRun) -> Path:
    """Run every stage `run.system` asks for; returns the model folder (OUTPUT).

    Raises:
        StoicError: naming the file or setting at fault.
    """
    patients = read_cohort(run.input_dir)  # a bad cohort fails before anything is written
    stages: dict[str, float] = {}
    run.output_dir.mkdir(parents=True, exist_ok=True)
    oof: dict[str, list[Path]] = {}
    auc: dict[str, dict[str, float]] = {}
    if run.trains_balaitous:
        started = time.perf_counter()
        path, auc["balaitous"] = train_balaitous(run)
        oof["balaitous"] = [path]
        stages["balaitous"] = time.perf_counter() - started
    if run.trains_convnext:
        started = time.perf_counter()
        oof["convnext3d"], auc["convnext3d"] = train_convnext(run)
        stages["convnext3d"] = time.perf_counter() - started
    if run.system == "both":
        started = time.perf_counter()
        reference = run.input_dir / "metadata" / "reference.csv"
        report_dir = run.output_dir / "ensemble-report"
        document = fit_ensemble(
            reference, oof["balaitous"], oof["convnext3d"], report_dir, seed=run.heads.seed
        )
        shutil.copyfile(report_dir / ENSEMBLE_WEIGHTS.name, run.output_dir / ENSEMBLE_WEIGHTS.name)
        auc["ensemble"] = {
            t: entry["heads"]["ensemble"]["auc"] for t, entry in document["tasks"].items()
        }
        stages["ensemble"] = time.perf_counter() - started
    complete_model_folder(run)
    entry = origin(
        f"final-phase training of {run.system} on {run.input_dir}",
        cohort={"scans": len(patients), "labelled": sum(p.covid != UNKNOWN for p in patients)},
        auc={"estimate": "out-of-fold (nested for the heads and the ensemble)", **auc},
    )
    record = write_system_record(run.output_dir, TRAINED_SYSTEM[run.system], run.encoder, entry)
    summary = {
        "system": run.system,
        "devices": [str(d) for d in run.devices],
        "seconds": {k: round(v, 1) for k, v in stages.items()},
        "convnext": {t: asdict(run.convnext_settings(t)) for t in ("covid", "severe")}
        if run.trains_convnext
        else None,
    }
    atomic_write_text(run.output_dir / "training.json", json.dumps(summary, indent=1) + "\n")
    logger.info(
        "model folder %s ready: %s (%s)",
        run.output_dir,
        record.describe(),
        ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()),
    )
    return run.output_dir


def train_balaitous(run: TrainingRun) -> tuple[Path, dict[str, float]]:
    """Features, heads and their nested cross-validation; returns the out-of-fold table and
    the nested AUC of each task."""
    patients = read_cohort(run.input_dir)
    logger.info(
        "balaitous: %d scans in %s; models from %s", len(patients), run.input_dir, run.model_dir
    )
    count = min(len(run.devices), len(patients))
    jobs = [(d, ShardJob(run, patients, i + 1, count)) for i, d in enumerate(run.devices[:count])]
    tables = on_devices(extract_shard, jobs)
    table = tables[0] if len(tables) == 1 else merge_tables(tables)
    table.save(run.scratch_dir / "features.npz")
    fits = fit_heads(table, run.heads)
    write_heads(
        run.output_dir,
        to_logistic_heads(fits),
        heads_document(fits, table, run.heads),
        expect_model_files=False,
    )
    results = cross_validate(table, run.heads, run.folds, run.repeats)
    path = write_oof(results, run.scratch_dir / "balaitous" / "oof.csv")
    if run.evaluate:
        about = {
            "title": "Nested cross-validation of the heads fitted by train.py",
            "protocol": {"patients": len(table)} | protocol(run.heads, run.folds, run.repeats),
        }
        report(results, about, run.output_dir / "report", seed=run.heads.seed)
        logger.info("evaluation report in %s", run.output_dir / "report")
    return path, nested_auc(results)


@dataclass(frozen=True)
class ShardJob:
    """One device's share of the feature extraction: shard `index` of `count`."""

    run: TrainingRun
    patients: list[Patient]
    index: int
    count: int


def extract_shard(device: torch.device, job: ShardJob) -> FeatureTable:
    """The features of one shard of the cohort, on `device` (in a process of its own when
    there are several devices)."""
    run = job.run
    with_r231 = run.lung_masks is None
    model = Balaitous.feature_extractor(
        run.model_dir,
        replace(run.model, device=device),
        lung_masks="r231" if with_r231 else "given",
    )
    key = encoder_key(run.model_dir, run.model.precision, with_r231, run.encoder, run.orientation)
    patients = shard(job.patients, job.index, job.count)
    return extract(
        patients,
        model,
        run.scratch_dir / "feature-cache",
        key,
        run.lung_masks,
        progress=job.count == 1,
    )


def train_convnext(run: TrainingRun) -> tuple[list[Path], dict[str, float]]:
    """Fine-tune the ConvNeXt for both tasks (resuming what SCRATCH holds); returns the two
    out-of-fold tables and each task's pooled out-of-fold AUC."""
    tables, auc = [], {}
    for task in ("covid", "severe"):
        settings = run.convnext_settings(task)
        if settings.init is None:
            logger.warning(
                "no %s in the model folder: the ConvNeXt starts from random weights",
                CONVNEXT3D.name,
            )
        patients, labels = task_patients(run.input_dir, task)
        out = run.scratch_dir / f"convnext3d-{task}"
        logger.info(
            "convnext3d %s: %d patients, %d folds on %s",
            task,
            len(labels),
            settings.folds,
            ", ".join(map(str, run.devices)),
        )
        result = finetune(
            patients,
            labels,
            settings,
            out,
            device=run.devices,
            cache_dir=run.scratch_dir / "cubes",
            resume=True,
            progress=False,
        )
        shutil.copyfile(result.ensemble, run.output_dir / result.ensemble.name)
        tables.append(out / "oof.csv")
        auc[task] = result.metric
    return tables, auc


def complete_model_folder(run: TrainingRun) -> None:
    """Copy the model folder's files the trained systems need into OUTPUT (hard links where
    the file systems allow), and list every model file in OUTPUT/MANIFEST."""
    needed = []
    if run.trains_balaitous:
        kind = encoder_kind(run.encoder)
        needed += [spec.name for spec in kind.files] + [R231.name]
    if (run.model_dir / RANDOM_WEIGHTS_MARKER).exists():
        needed.append(RANDOM_WEIGHTS_MARKER)
    for name in needed:
        source, target = run.model_dir / name, run.output_dir / name
        if target.exists() and _same_file(source, target):
            continue
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    written = {
        path.name: sha256_of(path)
        for path in sorted(run.output_dir.iterdir())
        if path.is_file()
        and (
            path.suffix in (".pth", ".npz")
            or path.name in (ENSEMBLE_WEIGHTS.name, SYSTEM_RECORD.name)
        )
    }
    update_manifest(run.output_dir, written)


def _same_file(source: Path, target: Path) -> bool:
    """The same file (a hard link), or a copy of it (copy2 keeps size and modification time)."""
    if source.samefile(target):
        return True
    a, b = source.stat(), target.stat()
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)
