"""Commands that retrain Balaïtous's heads: extract-features, merge-features, fit-heads,
install-heads, evaluate."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from stoic_ct.errors import StoicError
from stoic_ct.head_training.defaults import OUTER_FOLDS, REPEATS
from stoic_ct.options import add_model_arguments, add_shard_argument, model_settings, resolve_shard
from stoic_ct.runtime import log_runtime
from stoic_ct.weights.model_files import (
    REPOSITORY_MODEL_DIR,
    default_model_dir,
)

if TYPE_CHECKING:
    from stoic_ct.head_training.training import FitSettings


logger = logging.getLogger("stoic_ct")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """extract-features, merge-features, fit-heads, install-heads and evaluate."""
    _register_extract_features(commands)
    _register_merge_features(commands)
    _register_fit_heads(commands)
    _register_install_heads(commands)
    _register_evaluate(commands)


def _register_extract_features(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    extract = commands.add_parser(
        "extract-features",
        help="encoder features of every scan of a STOIC-layout cohort",
        description="Run the pipeline up to the two encoder features for every scan of "
        "DATA_DIR/data/mha/<PatientID>.mha, with labels from DATA_DIR/metadata/reference.csv "
        "and age and sex from the headers, and write one feature table (.npz). Each scan's "
        "features are cached (keyed by the scan's and the model files' sha256): an "
        "interrupted run resumes, a changed scan is recomputed. A scan that fails is "
        "reported and skipped; the exit status is then 1, and the table holds the others.",
    )
    extract.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    extract.add_argument("--out", type=Path, required=True, help="feature table to write (.npz)")
    extract.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="per-scan cache folder (default: .feature-cache beside --out)",
    )
    add_shard_argument(extract, "patients (merge the N tables with merge-features)")
    extract.add_argument(
        "--lung-masks",
        type=Path,
        default=None,
        metavar="DIR",
        help="lung label images <PatientID>.mha (or .nii.gz, .nrrd) to use instead of the "
        "U-Net; labels 1 right, 2 left, or a binary mask",
    )
    extract.add_argument("--batch-size", type=int, default=None, help="slices per encoder batch")
    add_model_arguments(extract)
    extract.set_defaults(handler=run_extract_features)


def _register_merge_features(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    merge = commands.add_parser(
        "merge-features",
        help="merge shard feature tables into one",
        description="Merge the feature tables of the shards of one extract-features run "
        "(same model files and precision). Refused, naming them, when a shard is missing "
        "or given twice, a patient of a shard is in neither its rows nor its failures, or "
        "a patient is in two tables.",
    )
    merge.add_argument("tables", nargs="+", type=Path, metavar="TABLE")
    merge.add_argument("--out", type=Path, required=True, help="merged table to write")
    merge.set_defaults(handler=run_merge_features)


def _register_fit_heads(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fit = commands.add_parser(
        "fit-heads",
        help="fit the four logistic regressions: a new balaitous.npz",
        description="Fit the covid heads (features only) on every labelled patient and the "
        "severity heads (features, age, sex) on the COVID-positive ones; choose each C and "
        "the full/lung weights by stratified cross-validation; write MODEL_DIR/balaitous.npz "
        "in the published layout and MODEL_DIR/heads.json (data, settings, scores). With "
        "the encoder and U-Net files beside it, MODEL_DIR is a --model-dir for process.py.",
    )
    fit.add_argument("features", type=Path, metavar="FEATURES")
    fit.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR")
    _fit_arguments(fit)
    fit.set_defaults(handler=run_fit_heads)


def _register_install_heads(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    install = commands.add_parser(
        "install-heads",
        help="put fitted heads into a model folder",
        description="Copy HEADS_DIR/balaitous.npz and heads.json (from fit-heads or train.py) "
        "into the model folder, after checking that they take the encoders' features and, "
        "where heads.json records them, that the encoder files are the ones the features "
        "came from; update its MANIFEST, so that build.sh and fetch-weights keep them.",
    )
    install.add_argument("heads_dir", type=Path, metavar="HEADS_DIR")
    install.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="model folder (default: the repository's model/)",
    )
    install.set_defaults(handler=run_install_heads)


def _register_evaluate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="cross-validated ROC-AUC of the heads, or a score of given predictions",
        description="With FEATURES: stratified repeated k-fold nested cross-validation of "
        "fit-heads (default 4 repeats of 8 folds), out-of-fold ROC-AUC of each head and of "
        "their weighted average with 95%% bootstrap intervals. With --predictions and "
        "--reference: the ROC-AUC of given predictions. Severity is scored among "
        "COVID-positive patients only. Writes report.json, report.md, roc.png and "
        "calibration.png to --out, and with FEATURES oof.csv (each patient's out-of-fold "
        "probabilities, for fit-ensemble).",
    )
    evaluate.add_argument("features", type=Path, nargs="?", metavar="FEATURES")
    evaluate.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    evaluate.add_argument(
        "--folds", type=int, default=OUTER_FOLDS, help=f"outer folds (default {OUTER_FOLDS})"
    )
    evaluate.add_argument(
        "--repeats", type=int, default=REPEATS, help=f"repetitions (default {REPEATS})"
    )
    evaluate.add_argument(
        "--predictions",
        type=Path,
        default=None,
        help="a CSV of PatientID,probCOVID,probSevere (or predict --csv output) to score",
    )
    evaluate.add_argument(
        "--reference", type=Path, default=None, help="reference.csv to score --predictions against"
    )
    _fit_arguments(evaluate)
    evaluate.set_defaults(handler=run_evaluate)


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inner-folds",
        type=int,
        default=5,
        help="folds of the cross-validation that chooses C and the weights (default 5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the fold assignments (default 0)")


def run_extract_features(args: argparse.Namespace) -> int:
    """The `extract-features` command; 1 when some scans failed (the table holds the rest)."""
    log_runtime()
    from stoic_ct.head_training.features import encoder_key, extract
    from stoic_ct.inference.pipeline import Balaitous
    from stoic_ct.inference.precision import numerics_of
    from stoic_ct.inference.systems import fit_to_gpu
    from stoic_ct.io.cohort import UNKNOWN, read_cohort, shard, shard_record
    from stoic_ct.weights.system_record import choose

    index, count = resolve_shard(args.shard)
    cohort = read_cohort(args.data_dir)
    patients = shard(cohort, index, count)
    labelled = sum(1 for p in patients if p.covid != UNKNOWN)
    logger.info(
        "%d scans in shard %d/%d of %s, %d of them in the reference",
        len(patients),
        index,
        count,
        args.data_dir,
        labelled,
    )
    if args.lung_masks is not None and not args.lung_masks.is_dir():
        raise StoicError("--lung-masks is not a folder", args.lung_masks)
    model_dir = args.model_dir or default_model_dir()
    encoder = choose(model_dir, encoder=args.encoder).encoder
    settings = replace(model_settings(args), encoder=encoder)
    model = Balaitous.feature_extractor(
        model_dir, settings, lung_masks="r231" if args.lung_masks is None else "given"
    )
    fit_to_gpu(model, settings)
    numbers = numerics_of(settings.device, settings.precision)  # fast differs by device
    key = encoder_key(model_dir, numbers, args.lung_masks is None, encoder, args.orientation)
    cache = args.cache or args.out.parent / ".feature-cache"
    table = extract(patients, model, cache, key, masks_dir=args.lung_masks)
    record = shard_record([p.id for p in cohort], index, count)
    table = replace(table, provenance=table.provenance | record)
    table.save(args.out)
    failures = table.provenance["failures"]
    logger.info("wrote %s: %d patients, features of length %d", args.out, len(table), table.dim)
    if failures:
        logger.error(
            "%d of %d scans failed and are not in the table: %s",
            len(failures),
            len(patients),
            "; ".join(f["patient_id"] for f in failures[:10]),
        )
    return 1 if failures else 0


def run_merge_features(args: argparse.Namespace) -> int:
    """The `merge-features` command."""
    from stoic_ct.head_training.features import FeatureTable, merge_tables

    merged = merge_tables(
        [FeatureTable.load(path) for path in args.tables], [str(path) for path in args.tables]
    )
    merged.save(args.out)
    logger.info("wrote %s: %d patients from %d tables", args.out, len(merged), len(args.tables))
    return 0


def _fit_settings(args: argparse.Namespace) -> FitSettings:
    from stoic_ct.head_training.training import FitSettings

    if args.inner_folds < 2:
        raise StoicError(f"--inner-folds must be at least 2, not {args.inner_folds}")
    return FitSettings(inner_folds=args.inner_folds, seed=args.seed)


def run_fit_heads(args: argparse.Namespace) -> int:
    """The `fit-heads` command."""
    from stoic_ct.head_training.features import FeatureTable
    from stoic_ct.head_training.training import fit_heads as fit
    from stoic_ct.head_training.training import (
        heads_document,
        record_heads,
        recorded_encoder,
        to_logistic_heads,
        write_heads,
    )

    table = FeatureTable.load(args.features)
    settings = _fit_settings(args)
    fits = fit(table, settings)
    document = heads_document(fits, table, settings)
    path = write_heads(args.out, to_logistic_heads(fits), document)
    logger.info("wrote %s and %s", path, path.with_name(recorded_encoder(document).report))
    record_heads(args.out, document, f"heads fitted on {args.features}")
    return 0


def run_install_heads(args: argparse.Namespace) -> int:
    """The `install-heads` command."""
    from stoic_ct.head_training.training import install_heads as install

    model_dir = args.model_dir or REPOSITORY_MODEL_DIR
    path = install(args.heads_dir, model_dir)
    logger.info("installed %s (and heads.json); MANIFEST updated where there is one", path)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """The `evaluate` command: nested cross-validation, or a score of given predictions."""
    from stoic_ct.head_training.evaluation import (
        cross_validate,
        protocol,
        report,
        score_predictions,
        write_oof,
    )
    from stoic_ct.head_training.features import FeatureTable

    settings = _fit_settings(args)
    if args.predictions is not None or args.reference is not None:
        if args.predictions is None or args.reference is None or args.features is not None:
            raise StoicError("give --predictions and --reference together, without FEATURES")
        results = score_predictions(args.predictions, args.reference)
        about = {
            "title": f"Predictions {args.predictions.name} against {args.reference.name}",
            "protocol": {"predictions": str(args.predictions), "reference": str(args.reference)},
        }
    else:
        if args.features is None:
            raise StoicError("give FEATURES, or --predictions and --reference")
        if args.folds < 2 or args.repeats < 1:
            raise StoicError("--folds must be at least 2 and --repeats at least 1")
        table = FeatureTable.load(args.features)
        results = cross_validate(table, settings, args.folds, args.repeats)
        about = {
            "title": f"Nested cross-validation of fit-heads on {args.features.name}",
            "protocol": {
                "features": str(args.features),
                "patients": len(table),
                "encoder_key": table.provenance.get("encoder_key"),
            }
            | protocol(settings, args.folds, args.repeats),
        }
    document = report(results, about, args.out, seed=settings.seed)
    if args.features is not None:
        write_oof(results, args.out / "oof.csv")
    for task, entry in document["tasks"].items():
        for head, score in entry["heads"].items():
            low, high = score["ci95"]
            print(f"{task}\t{head}\tAUC {score['auc']:.3f}\t95% CI {low:.3f}-{high:.3f}")
    logger.info("report written to %s", args.out)
    return 0
