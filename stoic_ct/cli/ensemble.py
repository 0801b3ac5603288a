"""The command that fits the ensemble of the two systems: fit-ensemble."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stoic_ct.ensemble.defaults import FOLDS, REPEATS
from stoic_ct.errors import StoicError

logger = logging.getLogger("stoic_ct")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """fit-ensemble."""
    fit = commands.add_parser(
        "fit-ensemble",
        help="choose the ensemble's weights from out-of-fold predictions: ensemble.json",
        description="From out-of-fold predictions of Balaitous (evaluate FEATURES writes "
        "oof.csv) and of the fine-tuned ConvNeXt (finetune writes OUT/oof.csv for each task) "
        "for the same patients, choose each task's weight w of w * P(balaitous) + (1 - w) * "
        "P(convnext3d) by ROC-AUC, estimate the ensemble's AUC by nested cross-validation "
        "and report it beside each system's (report.json, report.md, roc.png, "
        "calibration.png), and write OUT/ensemble.json for process.py --system ensemble.",
    )
    fit.add_argument(
        "--reference", type=Path, required=True, help="the cohort's metadata/reference.csv"
    )
    fit.add_argument(
        "--balaitous",
        type=Path,
        nargs="+",
        required=True,
        metavar="CSV",
        help="Balaitous's out-of-fold predictions (evaluate's oof.csv)",
    )
    fit.add_argument(
        "--convnext3d",
        type=Path,
        nargs="+",
        required=True,
        metavar="CSV",
        help="the fine-tuned ConvNeXt's out-of-fold predictions (finetune's oof.csv of the "
        "covid run and of the severe run)",
    )
    fit.add_argument(
        "--out", type=Path, required=True, help="folder for ensemble.json and the report"
    )
    fit.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="also put ensemble.json into this model folder, which must hold both systems' "
        "files, and record there that it holds the ensemble (system.json, MANIFEST)",
    )
    fit.add_argument("--folds", type=int, default=FOLDS, help=f"outer folds (default {FOLDS})")
    fit.add_argument(
        "--repeats", type=int, default=REPEATS, help=f"repetitions (default {REPEATS})"
    )
    fit.add_argument("--seed", type=int, default=0, help="of the splits and the bootstrap")
    fit.set_defaults(handler=run_fit_ensemble)


def run_fit_ensemble(args: argparse.Namespace) -> int:
    """The `fit-ensemble` command: prints each task's AUCs and weight."""
    from stoic_ct.ensemble.fitting import fit_ensemble, install_ensemble

    if args.folds < 2 or args.repeats < 1:
        raise StoicError("--folds must be at least 2 and --repeats at least 1")
    if args.model_dir is not None and not args.model_dir.is_dir():
        raise StoicError("--model-dir is not a folder", args.model_dir)
    document = fit_ensemble(
        args.reference,
        args.balaitous,
        args.convnext3d,
        args.out,
        folds=args.folds,
        repeats=args.repeats,
        seed=args.seed,
    )
    weights = document["protocol"]["weights (chosen on all patients)"]
    for task, entry in document["tasks"].items():
        for name, score in entry["heads"].items():
            low, high = score["ci95"]
            print(f"{task}\t{name}\tAUC {score['auc']:.3f}\t95% CI {low:.3f}-{high:.3f}")
        print(f"{task}\tweights\t{weights[task]}")
    logger.info("wrote %s and the report", args.out / "ensemble.json")
    if args.model_dir is not None:
        record = install_ensemble(args.out / "ensemble.json", args.model_dir, document)
        logger.info("%s now holds %s", args.model_dir, record.describe())
    return 0
