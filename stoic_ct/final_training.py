"""The STOIC2021 final-phase training run (`train.py`): one or both systems and their
ensemble, trained on a cohort in the training layout, into one complete model folder.

    balaitous   features of every scan (SCRATCH/feature-cache, in chunks shared among the
                ranks), the four heads (OUTPUT/balaitous.npz, heads.json), and their nested
                cross-validation (SCRATCH/balaitous/oof.csv; OUTPUT/report/ with --evaluate)
    convnext3d  the fine-tuned ConvNeXt for each task (SCRATCH/convnext3d-<task>/, the
                ten (task, fold) units shared among the ranks), OUTPUT/convnext3d_<task>.pth
    ensemble    the two, then the ensemble's weights from their out-of-fold predictions
                (OUTPUT/ensemble.json, OUTPUT/ensemble-report/)

The encoders and the U-Net (and the RANDOM_WEIGHTS marker, where there is one) are copied
from the model folder, OUTPUT/MANIFEST lists every model file, and OUTPUT/system.json says
which system the folder holds (balaitous, convnext3d or ensemble) with the
cohort's size and the out-of-fold AUCs: OUTPUT is a --model-dir for process.py and the
server, which run that system with no option, and what export.sh packs. Everything slow
is kept under SCRATCH, so a run started again after an interruption resumes: cached
features and cubes, and each fold's last.pt. OUTPUT/training.json records the settings
and the time of each stage.

Run by several ranks (torchrun, or --devices), every rank prepares and trains its share
of the units, claimed in SCRATCH (stoic_ct.claims), and the leader (rank 0) writes
OUTPUT once every unit is done; `train` returns None on the other ranks.
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

from stoic_ct.atomic import atomic_write_text
from stoic_ct.convnext_training.cube_cache import task_patients
from stoic_ct.convnext_training.finetuning import FoldPlan, assemble, plan_folds, train_plans
from stoic_ct.convnext_training.recipes import PRESETS, FinetuneSettings
from stoic_ct.distributed import ONE_PROCESS, Ranks, gather, in_chunks
from stoic_ct.ensemble.fitting import fit_ensemble
from stoic_ct.errors import StoicError
from stoic_ct.head_training.defaults import OUTER_FOLDS, REPEATS
from stoic_ct.head_training.evaluation import (
    cross_validate,
    nested_auc,
    protocol,
    report,
    write_oof,
)
from stoic_ct.head_training.features import FeatureTable, encoder_key, extract, fill_cache
from stoic_ct.head_training.training import (
    FitSettings,
    fit_heads,
    heads_document,
    to_logistic_heads,
    write_heads,
)
from stoic_ct.inference.pipeline import Balaitous, EncodedScan
from stoic_ct.inference.precision import ModelSettings, numerics_of
from stoic_ct.inference.systems import fit_to_gpu
from stoic_ct.io.cohort import REFERENCE, UNKNOWN, Patient, read_cohort
from stoic_ct.io.orientation import Orientation
from stoic_ct.io.volume import Volume
from stoic_ct.weights.model_files import (
    CONVNEXT3D,
    ENSEMBLE_WEIGHTS,
    R231,
    RANDOM_WEIGHTS_MARKER,
    SYSTEM_RECORD,
    SYSTEMS,
    encoder_kind,
    sha256_of,
    update_manifest,
)
from stoic_ct.weights.system_record import choose, origin, write_system_record

logger = logging.getLogger(__name__)

# The ConvNeXt's recipe in the final phase: the STOIC2021 severity winner's, for each task.
CONVNEXT_RECIPE = "stoic2021-winner"


@dataclass(frozen=True)
class TrainingRun:
    """What a final-phase training run reads, writes and how.

    Attributes:
        model: how Balaïtous's encoders run, on this rank's device.
        ranks: this process's place among the ranks of the run.
        heads: how the heads are fitted; folds and repeats: their nested cross-validation.
        convnext: FinetuneSettings values that replace the recipe's, for both tasks.
    """

    input_dir: Path
    output_dir: Path
    scratch_dir: Path
    model_dir: Path
    system: str
    model: ModelSettings
    ranks: Ranks = ONE_PROCESS
    orientation: Orientation = "canonical"
    lung_masks: Path | None = None
    heads: FitSettings = field(default_factory=FitSettings)
    folds: int = OUTER_FOLDS
    repeats: int = REPEATS
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
        return self.system in ("balaitous", "ensemble")

    @property
    def trains_convnext(self) -> bool:
        return self.system in ("convnext3d", "ensemble")

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


def train(run: TrainingRun) -> Path | None:
    """Run every stage `run.system` asks for; returns the model folder (OUTPUT) on the
    leader, None on the other ranks.

    Raises:
        StoicError: naming the file or setting at fault.
    """
    patients = read_cohort(run.input_dir)  # a bad cohort fails before anything is written
    devices = gather(str(run.model.device))
    stages: dict[str, float] = {}
    started = time.perf_counter()
    table = balaitous_features(run, patients) if run.trains_balaitous else None
    if run.trains_balaitous:
        stages["features"] = time.perf_counter() - started
    plans = []
    if run.trains_convnext:
        started = time.perf_counter()
        plans = convnext_plans(run)
        train_plans(plans, run.model.device, run.ranks, progress=False)
        stages["convnext3d"] = time.perf_counter() - started
    if not run.ranks.leader:
        return None
    run.output_dir.mkdir(parents=True, exist_ok=True)
    oof: dict[str, list[Path]] = {}
    auc: dict[str, dict[str, float]] = {}
    if table is not None:
        started = time.perf_counter()
        path, auc["balaitous"] = train_heads(run, table)
        oof["balaitous"] = [path]
        stages["heads"] = time.perf_counter() - started
    if run.trains_convnext:
        oof["convnext3d"], auc["convnext3d"] = assemble_convnext(run, plans, stages["convnext3d"])
    if run.system == "ensemble":
        started = time.perf_counter()
        auc["ensemble"] = train_ensemble(run, oof)
        stages["ensemble"] = time.perf_counter() - started
    complete_model_folder(run)
    entry = origin(
        f"final-phase training of {run.system} on {run.input_dir}",
        cohort={"scans": len(patients), "labelled": sum(p.covid != UNKNOWN for p in patients)},
        auc={"estimate": "out-of-fold (nested for the heads and the ensemble)", **auc},
    )
    record = write_system_record(run.output_dir, run.system, run.encoder, entry)
    summary = {
        "system": run.system,
        "devices": devices,
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


def balaitous_features(run: TrainingRun, patients: list[Patient]) -> FeatureTable | None:
    """Every scan's features (SCRATCH/features.npz), on the leader. With several ranks,
    the scans are cached in chunks shared among them first; the leader then reads its
    table from the cache (a scan that failed is tried once more, and reported)."""
    with_r231 = run.lung_masks is None
    numbers = numerics_of(run.model.device, run.model.precision)  # fast differs by device
    key = encoder_key(run.model_dir, numbers, with_r231, run.encoder, run.orientation)
    cache = run.scratch_dir / "feature-cache"
    model = _LazyExtractor(run)
    if not run.ranks.alone:
        logger.info("balaitous: %d scans in chunks among %d ranks", len(patients), run.ranks.size)
        in_chunks(
            [p.id for p in patients],
            cache,
            key["encoder_key"],
            lambda name, rows: fill_cache(
                [patients[i] for i in rows], model, cache, key, run.lung_masks, progress=False
            ),
            run.ranks,
        )
    if not run.ranks.leader:
        return None
    table = extract(patients, model, cache, key, run.lung_masks, progress=run.ranks.alone)
    table.save(run.scratch_dir / "features.npz")
    return table


class _LazyExtractor:
    """Balaïtous's feature extractor, loaded at the first scan that needs it (a rank
    whose scans are all cached loads no model)."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run
        self.model: Balaitous | None = None

    def encode(self, volume: Volume, lung_labels: Volume | None = None) -> EncodedScan:
        if self.model is None:
            run = self.run
            logger.info("balaitous: models from %s on %s", run.model_dir, run.model.device)
            settings = replace(run.model, encoder=run.encoder)
            self.model = Balaitous.feature_extractor(
                run.model_dir, settings, lung_masks="r231" if run.lung_masks is None else "given"
            )
            fit_to_gpu(self.model, settings)
        return self.model.encode(volume, lung_labels)


def train_heads(run: TrainingRun, table: FeatureTable) -> tuple[Path, dict[str, float]]:
    """The heads and their nested cross-validation; returns the out-of-fold table and
    the nested AUC of each task."""
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


def convnext_plans(run: TrainingRun) -> list[FoldPlan]:
    """The fine-tuning of each task (SCRATCH/convnext3d-<task>/, resumed when there)."""
    plans = []
    for task in ("covid", "severe"):
        settings = run.convnext_settings(task)
        if settings.init is None and run.ranks.leader:
            logger.warning(
                "no %s in the model folder: the ConvNeXt starts from random weights",
                CONVNEXT3D.name,
            )
        patients, labels = task_patients(run.input_dir, task)
        logger.info(
            "convnext3d %s: %d patients, %d folds among %d rank(s)",
            task,
            len(labels),
            settings.folds,
            run.ranks.size,
        )
        plans.append(
            plan_folds(
                patients,
                labels,
                settings,
                run.scratch_dir / f"convnext3d-{task}",
                device=run.model.device,
                ranks=run.ranks,
                cache_dir=run.scratch_dir / "cubes",
                resume=True,
                progress=False,
            )
        )
    return plans


def assemble_convnext(
    run: TrainingRun, plans: list[FoldPlan], seconds: float
) -> tuple[list[Path], dict[str, float]]:
    """Each task's fold ensemble into OUTPUT; the out-of-fold tables and pooled AUCs."""
    tables, auc = [], {}
    for plan in plans:
        result = assemble(plan, seconds)
        shutil.copyfile(result.ensemble, run.output_dir / result.ensemble.name)
        tables.append(plan.out_dir / "oof.csv")
        auc[plan.settings.task] = result.metric
    return tables, auc


def train_ensemble(run: TrainingRun, oof: dict[str, list[Path]]) -> dict[str, float]:
    """The ensemble's weights from both systems' out-of-fold predictions; its nested AUC."""
    reference = run.input_dir / REFERENCE
    report_dir = run.output_dir / "ensemble-report"
    document = fit_ensemble(
        reference, oof["balaitous"], oof["convnext3d"], report_dir, seed=run.heads.seed
    )
    shutil.copyfile(report_dir / ENSEMBLE_WEIGHTS.name, run.output_dir / ENSEMBLE_WEIGHTS.name)
    return {t: entry["heads"]["ensemble"]["auc"] for t, entry in document["tasks"].items()}


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
