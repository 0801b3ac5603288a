"""Fit the four logistic-regression heads on a feature table, as Balaïtous was trained.

Per task and encoder, one scikit-learn `LogisticRegression` on standardised features: covid
on the encoder feature alone; severe on the feature with age and sex appended, fitted on
COVID-positive patients only (docs/explanation/pipeline.md, section 2). The regularisation C
is chosen by an inner stratified k-fold cross-validation (the largest out-of-fold ROC-AUC;
on a tie, the stronger regularisation), the standardisation is folded into the written
coefficients, and the weights of the full/lung average are chosen on the out-of-fold
predictions at the chosen C. `evaluate` wraps all of this in an outer cross-validation for
an unbiased estimate (nested cross-validation).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from stoic_ct.atomic import atomic_write_text
from stoic_ct.errors import InputError, ModelFileError
from stoic_ct.head_training.features import FeatureTable, labelled
from stoic_ct.inference.encoders import feature_dim
from stoic_ct.io.cohort import STOIC_TASKS
from stoic_ct.models.heads import ENCODERS, LogisticHeads
from stoic_ct.weights.model_files import (
    ENCODER_CHOICES,
    R231,
    SYSTEM_RECORD,
    EncoderKind,
    encoder_kind,
    read_manifest,
    sha256_of,
    system_files,
    write_manifest,
)
from stoic_ct.weights.network_files import load_heads, save_heads
from stoic_ct.weights.system_record import (
    SystemRecord,
    origin,
    read_system_record,
    write_system_record,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSettings:
    """How the heads are fitted.

    Attributes:
        inner_folds: folds of the cross-validation that chooses C and the alphas.
        c_grid: candidate inverse regularisation strengths (on standardised features).
        alpha_step: grid step of alpha_full in [0, 1]; alpha_lung = 1 - alpha_full.
        seed: of the fold assignment.
        max_iter: of the lbfgs solver.
    """

    inner_folds: int = 5
    c_grid: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 13))
    alpha_step: float = 0.05
    seed: int = 0
    max_iter: int = 2000


@dataclass(frozen=True)
class HeadFit:
    """One regression, on raw (unstandardised) inputs.

    Attributes:
        coef: (F,) coefficients; intercept: scalar; c: the chosen C.
        oof: (N,) out-of-fold probabilities at the chosen C (inner cross-validation).
        cv_auc: ROC-AUC of `oof`, per candidate C.
    """

    coef: np.ndarray
    intercept: float
    c: float
    oof: np.ndarray
    cv_auc: dict[float, float]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, F) -> (N,) probabilities."""
        return expit(x @ self.coef + self.intercept)


@dataclass(frozen=True)
class TaskFit:
    """The two heads of one task and their weighting."""

    task: str
    heads: dict[str, HeadFit]
    alpha_full: float
    patients: int
    positives: int
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def alpha(self) -> dict[str, float]:
        return {"full": self.alpha_full, "lung": 1.0 - self.alpha_full}

    def predict(self, table: FeatureTable) -> dict[str, np.ndarray]:
        """(N,) probabilities of each head and of their weighted average ("combined")."""
        out = {
            enc: self.heads[enc].predict(design_matrix(table, enc, self.task)) for enc in ENCODERS
        }
        out["combined"] = self.alpha_full * out["full"] + (1.0 - self.alpha_full) * out["lung"]
        return out


def design_matrix(table: FeatureTable, encoder: str, task: str) -> np.ndarray:
    """(N, D) encoder features, with age and sex appended for the severity task: (N, D + 2)."""
    x = table.features(encoder)
    if task == "severe":
        x = np.column_stack([x, table.age_feature, table.sex_feature])
    return x


def fit_task(table: FeatureTable, task: str, settings: FitSettings, quiet: bool = False) -> TaskFit:
    """Fit both heads of `task` on the rows labelled for it, and choose their weighting.

    Args:
        quiet: log the choices at debug level (inside a cross-validation).

    Raises:
        InputError: when the task has fewer than two patients of either class.
    """
    rows = labelled(table, task)
    data = table.take(rows)
    y = (data.covid if task == "covid" else data.severe).astype(int)
    positives = int(y.sum())
    folds = fold_count(task, len(y), positives, settings.inner_folds)
    heads = {enc: fit_head(design_matrix(data, enc, task), y, settings, folds) for enc in ENCODERS}
    alpha_full, combined_auc = choose_alpha(y, heads["full"].oof, heads["lung"].oof, settings)
    scores = {f"cv_auc_{enc}": heads[enc].cv_auc[heads[enc].c] for enc in ENCODERS}
    scores["cv_auc_combined"] = combined_auc
    logger.log(
        logging.DEBUG if quiet else logging.INFO,
        "%s: %d patients (%d positive); C full %.3g, lung %.3g; alpha full %.2f; "
        "inner-CV AUC full %.3f, lung %.3f, combined %.3f",
        task,
        len(y),
        positives,
        heads["full"].c,
        heads["lung"].c,
        alpha_full,
        scores["cv_auc_full"],
        scores["cv_auc_lung"],
        combined_auc,
    )
    return TaskFit(task, heads, alpha_full, len(y), positives, scores)


def fit_head(x: np.ndarray, y: np.ndarray, settings: FitSettings, folds: int) -> HeadFit:
    """Choose C by stratified k-fold ROC-AUC, then refit on all rows and unstandardise.

    Args:
        x: (N, F) inputs; y: (N,) 0/1 labels.
    """
    splitter = StratifiedKFold(folds, shuffle=True, random_state=settings.seed)
    oof = np.empty((len(settings.c_grid), len(y)))
    for train, test in splitter.split(x, y):
        for i, c in enumerate(settings.c_grid):
            oof[i, test] = _fit_standardised(x[train], y[train], c, settings).predict(x[test])
    aucs = {c: float(roc_auc_score(y, oof[i])) for i, c in enumerate(settings.c_grid)}
    best = max(aucs.values())
    # The strongest regularisation among the best (the grid is increasing in C).
    chosen = next(i for i, c in enumerate(settings.c_grid) if aucs[c] >= best - 1e-12)
    c = settings.c_grid[chosen]
    final = _fit_standardised(x, y, c, settings)
    return HeadFit(final.coef, final.intercept, c, oof[chosen], aucs)


@dataclass(frozen=True)
class _Raw:
    coef: np.ndarray
    intercept: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return expit(x @ self.coef + self.intercept)


def _fit_standardised(x: np.ndarray, y: np.ndarray, c: float, settings: FitSettings) -> _Raw:
    """Standardise, fit, and fold the standardisation into the coefficients.

    With z = (x - mean) / scale, w.z + b = (w / scale).x + (b - sum(w * mean / scale)).
    """
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, max_iter=settings.max_iter)
    with warnings.catch_warnings():
        # Weak regularisation on separable data never converges exactly; the AUC that
        # chooses C is what matters, and it penalises such fits.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(scaler.transform(x), y)
    w = model.coef_[0] / scaler.scale_
    b = float(model.intercept_[0] - np.dot(w, scaler.mean_))
    return _Raw(w, b)


def choose_alpha(
    y: np.ndarray, p_full: np.ndarray, p_lung: np.ndarray, settings: FitSettings
) -> tuple[float, float]:
    """alpha_full maximising the ROC-AUC of alpha * p_full + (1 - alpha) * p_lung.

    On a tie, the alpha closest to 0.5 (the even average). Returns (alpha, AUC).
    """
    steps = round(1 / settings.alpha_step)
    candidates = sorted((i / steps for i in range(steps + 1)), key=lambda a: abs(a - 0.5))
    scored = [(float(roc_auc_score(y, a * p_full + (1 - a) * p_lung)), a) for a in candidates]
    best = max(auc for auc, _ in scored)
    alpha = next(a for auc, a in scored if auc >= best - 1e-12)
    return alpha, best


def fold_count(task: str, n: int, positives: int, wanted: int) -> int:
    """`wanted`, or fewer when the smaller class has fewer patients.

    Raises:
        InputError: when either class has fewer than two patients.
    """
    smaller = min(positives, n - positives)
    if smaller < 2:
        raise InputError(
            f"the {task} task has {positives} positive and {n - positives} negative patients; "
            "fitting its heads needs at least 2 of each"
            + (" (severity counts COVID-positive patients only)" if task == "severe" else "")
        )
    if smaller < wanted:
        logger.warning(
            "%s: only %d patients in the smaller class; %d-fold instead of %d-fold",
            task,
            smaller,
            smaller,
            wanted,
        )
    return min(wanted, smaller)


def fit_heads(table: FeatureTable, settings: FitSettings) -> dict[str, TaskFit]:
    """Both tasks' heads, fitted on `table`."""
    return {task: fit_task(table, task, settings) for task in STOIC_TASKS}


def to_logistic_heads(fits: dict[str, TaskFit]) -> LogisticHeads:
    """The fitted heads as process.py loads them (balaitous.npz's keys)."""
    coef, intercept, alpha = {}, {}, {}
    for task, fit in fits.items():
        for enc in ENCODERS:
            coef[f"{enc}_{task}"] = fit.heads[enc].coef
            intercept[f"{enc}_{task}"] = fit.heads[enc].intercept
            alpha[f"{enc}_{task}"] = fit.alpha[enc]
    return LogisticHeads(coef, intercept, alpha)


def fit_report(fits: dict[str, TaskFit], settings: FitSettings) -> dict[str, Any]:
    """What heads.json records of the fit: per task, the data, the choices and the scores."""
    return {
        "settings": {
            "inner_folds": settings.inner_folds,
            "c_grid": list(settings.c_grid),
            "alpha_step": settings.alpha_step,
            "seed": settings.seed,
            "solver": "sklearn LogisticRegression(lbfgs, L2) on standardised inputs, "
            "standardisation folded into the coefficients",
        },
        "tasks": {
            task: {
                "patients": fit.patients,
                "positives": fit.positives,
                "inputs": "encoder feature" + (", age, sex" if task == "severe" else ""),
                "c": {enc: fit.heads[enc].c for enc in ENCODERS},
                "alpha": fit.alpha,
                "inner_cv_auc": fit.scores,
                "note": "inner-CV AUCs at the chosen C and alpha are slightly optimistic; "
                "`python -m stoic_ct evaluate` gives the nested estimate",
            }
            for task, fit in fits.items()
        },
    }


def recorded_encoder(document: dict[str, Any]) -> EncoderKind:
    """The encoder choice a heads report (or a feature table's provenance, under "data")
    records; the ViTs when it records none (reports older than the choice)."""
    return encoder_kind(document.get("data", {}).get("encoder", "vit"))


def heads_document(
    fits: dict[str, TaskFit], table: FeatureTable, settings: FitSettings
) -> dict[str, Any]:
    """heads.json: the data the heads were fitted on, the settings, the choices, the scores."""
    return {
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {
            "patients": len(table),
            "feature_dim": table.dim,
            "encoder_key": table.provenance.get("encoder_key"),
            "model_files": dict(table.provenance.get("model_files", {})),
            "precision": table.provenance.get("precision"),
            "encoder": encoder_kind(table.provenance.get("encoder", "vit")).name,
            "lung_masks": table.provenance.get("lung_masks"),
            "extraction_failures": len(table.provenance.get("failures", [])),
        },
        "fit": fit_report(fits, settings),
    }


def write_heads(
    out_dir: Path,
    heads: LogisticHeads,
    document: dict[str, Any],
    expect_model_files: bool = True,
) -> Path:
    """Write balaitous.npz (the published layout) and heads.json into `out_dir`.

    When `out_dir` holds encoder files, they must be the ones the features came from (as
    heads.json records them); when it has a MANIFEST, its balaitous.npz line is updated
    so that fetch-weights and build.sh keep the new heads.

    Raises:
        ModelFileError: when `out_dir` holds encoder files other than the features'.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = recorded_encoder(document)
    encoder_files = [out_dir / spec.name for spec in kind.files]
    recorded = document.get("data", {}).get("model_files", {})
    for path in encoder_files:
        if path.exists() and path.name in recorded and sha256_of(path) != recorded[path.name]:
            raise ModelFileError(
                "is not the file the heads' features were extracted with (sha256 differs): "
                "the heads would be wrong with it; write them to another folder",
                path,
            )
    if encoder_files[0].exists():
        dim = feature_dim(kind.full, encoder_files[0])
        if dim != heads.feature_dim:
            raise ModelFileError(
                f"gives features of length {dim}, but the heads take {heads.feature_dim}",
                encoder_files[0],
            )
    heads_path = save_heads(heads, out_dir / kind.heads.name)
    text = json.dumps(document, indent=1) + "\n"
    atomic_write_text(out_dir / kind.report, text)
    manifest = read_manifest(out_dir)
    if manifest:
        manifest[heads_path.name] = sha256_of(heads_path)
        write_manifest(out_dir, manifest)
    missing = [p.name for p in (*encoder_files, out_dir / R231.name) if not p.exists()]
    if missing and expect_model_files:
        logger.warning(
            "%s has no %s: copy them there (the files the features came from) before using "
            "it as --model-dir, or install the heads into a model folder with install-heads",
            out_dir,
            ", ".join(missing),
        )
    return heads_path


def record_heads(model_dir: Path, document: dict[str, Any], what: str) -> SystemRecord | None:
    """Update `model_dir`'s system.json for heads just written there, when the folder holds
    everything Balaitous needs with their encoder: an ensemble stays one (with these heads),
    any other folder holds Balaitous. None (nothing written) for a folder of heads alone.

    Raises:
        ModelFileError: when the folder's record is malformed.
    """
    kind = recorded_encoder(document)
    if not all((model_dir / spec.name).is_file() for spec in system_files("balaitous", kind.name)):
        return None
    earlier = read_system_record(model_dir)
    system = "ensemble" if earlier is not None and earlier.system == "ensemble" else "balaitous"
    tasks = document.get("fit", {}).get("tasks", {})
    entry = origin(
        what,
        cohort={"patients": document.get("data", {}).get("patients")},
        auc={
            "estimate": "inner cross-validation at the chosen C and weights (optimistic; "
            "`evaluate` gives the nested one)",
            **{t: v.get("inner_cv_auc", {}).get("cv_auc_combined") for t, v in tasks.items()},
        },
    )
    record = write_system_record(model_dir, system, kind.name, entry)
    logger.info("%s/%s: %s", model_dir, SYSTEM_RECORD.name, record.describe())
    return record


def install_heads(source: Path, model_dir: Path) -> Path:
    """Copy fitted heads (balaitous.npz and heads.json of `source`, or the convnext3d_
    ones) into a model folder.

    The heads must take the encoders' feature length; when the report records the
    encoder files' sha256, they must match the folder's. The MANIFEST is updated.

    Raises:
        ModelFileError: when the heads cannot be read or do not fit the folder's encoders.
    """
    # A fit-heads output folder holds one heads file; when a model folder is given as
    # the source, its ConvNeXt heads are the ones that were added to it.
    present = [k for k in ENCODER_CHOICES.values() if (source / k.heads.name).exists()]
    kind = present[-1] if present else ENCODER_CHOICES["vit"]
    heads = load_heads(source / kind.heads.name)
    report = source / kind.report
    document = json.loads(report.read_text(encoding="utf-8")) if report.exists() else {}
    dim = document.get("data", {}).get("feature_dim")
    if dim is not None and dim != heads.feature_dim:
        raise ModelFileError(f"records features of length {dim}, not {heads.feature_dim}", report)
    document.setdefault("data", {}).setdefault("encoder", kind.name)
    path = write_heads(model_dir, heads, document)
    record_heads(model_dir, document, f"heads installed from {source}")
    return path
