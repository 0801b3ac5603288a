"""The `predict` command: any number of scans, a results table, QC pictures."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from stoic_ct.errors import StoicError
from stoic_ct.inference.results_table import (
    append_row,
    merge_results,
    qc_file_names,
    start_csv,
    write_shard_record,
)
from stoic_ct.io.cohort import shard_record, take_shard
from stoic_ct.io.demographics import parse_age
from stoic_ct.options import add_model_arguments, add_shard_argument, model_settings, resolve_shard
from stoic_ct.runtime import log_runtime
from stoic_ct.weights.model_files import (
    default_model_dir,
)

if TYPE_CHECKING:
    from stoic_ct.inference.pipeline import BalaitousPrediction
    from stoic_ct.inference.precision import ModelSettings
    from stoic_ct.inference.prediction import System
    from stoic_ct.inference.scan_pipeline import Outcome

logger = logging.getLogger("stoic_ct")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """predict."""
    _register_predict(commands)
    _register_merge_predictions(commands)


def _register_predict(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    predict = commands.add_parser(
        "predict",
        help="P(COVID-19) and P(severe COVID-19) for each scan",
        description="Run the system the model folder holds (its system.json; Balaitous for "
        "the published files; --system chooses another) on each scan (.mha, .mhd, .nii.gz, "
        ".nrrd or a DICOM folder). Models load once. Results go to stdout, one line per "
        "scan, and to --csv.",
    )
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument(
        "--age",
        type=_age,
        default=None,
        help="age in years for every scan (default: the PatientAge header, else 65)",
    )
    predict.add_argument(
        "--sex",
        type=str,
        default=None,
        choices=("M", "F"),
        help="sex for every scan (default: the PatientSex header, else unknown)",
    )
    predict.add_argument(
        "--csv",
        type=Path,
        default=None,
        help="write the results to this CSV file, a row as each scan finishes",
    )
    predict.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of --csv that hold results and skip their scans (failed scans "
        "run again)",
    )
    predict.add_argument(
        "--lung-mask",
        type=Path,
        action="append",
        default=None,
        metavar="FILE",
        help="a lung label image to use instead of the U-Net (labels 1 right, 2 left, or a "
        "binary mask), any geometry; give it once per IMAGE, in the same order (Balaitous "
        "and the ensemble; the convnext3d system uses none)",
    )
    predict.add_argument(
        "--qc",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a quality-control PNG per scan to this folder: what Balaitous saw "
        "(Balaitous and the ensemble)",
    )
    predict.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="slices per encoder batch (default: 16 on a CPU; on a GPU the largest up to 32 "
        "that the memory model says fits the free memory)",
    )
    predict.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that read and prepare the next scans while the networks run on "
        "this one (default with several scans: on a GPU half the CPU cores, at most 8; on a "
        "CPU 0: every stage in this process, one scan at a time)",
    )
    add_shard_argument(predict, "images, in the order of their paths (needs --csv)")
    add_model_arguments(predict, system=True)
    predict.set_defaults(handler=run_predict)


def _register_merge_predictions(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    merge = commands.add_parser(
        "merge-predictions",
        help="merge the results tables of every shard of a predict run",
        description="Merge the tables that predict --shard I/N --csv wrote (each with its "
        "TABLE.shard.json) into one, in the order of the image paths. Refused, naming "
        "them, when a shard is missing or given twice, a table lacks some of its shard's "
        "images (the shard did not finish: run it again with --resume), or an image is in "
        "two tables.",
    )
    merge.add_argument("tables", nargs="+", type=Path, metavar="TABLE")
    merge.add_argument("--out", type=Path, required=True, help="the merged table to write")
    merge.set_defaults(handler=run_merge_predictions)


def run_predict(args: argparse.Namespace) -> int:
    """The `predict` command; 0 when every scan gave a result, 1 otherwise."""
    log_runtime()
    from stoic_ct.inference.qc import write_qc
    from stoic_ct.inference.scan_pipeline import WORKERS, ScanJob, predict_scans

    images, (index, count) = _images_to_score(args)
    settings = model_settings(args)
    model, system = _load_model(args, settings)
    done = _open_table(args, index, count)
    qc_names = dict(zip(images, qc_file_names([image for image, _ in images]), strict=True))
    jobs = [
        ScanJob(image, mask, args.age, args.sex, args.orientation)
        for image, mask in images
        if str(image) not in done
    ]
    workers = (
        args.workers
        if args.workers is not None
        else (WORKERS[settings.device.type] if len(jobs) > 1 else 0)
    )
    if workers:
        logger.info("%d worker processes read and prepare the scans", workers)
    failed = 0
    progress = tqdm(
        total=len(images),
        initial=len(images) - len(jobs),
        desc="scans",
        unit="scan",
        disable=None,
        file=sys.stderr,
    )
    for outcome in predict_scans(model, jobs, workers):
        progress.update()
        row, seen = _result_row(outcome, system)
        if args.csv is not None:
            append_row(args.csv, row)
        if outcome.prediction is None or outcome.demographics is None:
            failed += 1
            continue
        job, p = outcome.job, outcome.prediction.probabilities
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in outcome.prediction.seconds.items())
        logger.info("%s: %s", job.image, timings)
        print(
            f"{job.image}\tP(COVID-19)={p.covid:.4f}\tP(severe COVID-19)={p.severe:.4f}",
            flush=True,
        )
        if args.qc is not None and seen is not None:
            qc_name = qc_names[(job.image, job.mask)]
            png = write_qc(seen, str(job.image), args.qc / qc_name, outcome.warnings)
            logger.info("quality-control picture: %s", png)
    progress.close()

    if args.csv is not None:
        logger.info("results in %s", args.csv)
    if failed:
        logger.error("%d of %d scans failed; see the messages above", failed, len(images))
    return 1 if failed else 0


def _images_to_score(
    args: argparse.Namespace,
) -> tuple[list[tuple[Path, Path | None]], tuple[int, int]]:
    """The (image, lung mask) pairs of this shard, and the shard (index, count).

    Raises:
        StoicError: for options that do not go together.
    """
    masks: list[Path | None] = list(args.lung_mask) if args.lung_mask else [None] * len(args.images)
    if len(masks) != len(args.images):
        raise StoicError(
            f"{len(masks)} --lung-mask files for {len(args.images)} images; "
            "give one mask per image, in the same order"
        )
    if args.batch_size is not None and args.batch_size < 1:
        raise StoicError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise StoicError(f"--workers must be 0 or more, not {args.workers}")
    if args.resume and args.csv is None:
        raise StoicError("--resume needs --csv: the results table tells which scans are done")
    images = list(zip(args.images, masks, strict=True))
    index, count = resolve_shard(args.shard)
    if count > 1:
        if args.csv is None:
            raise StoicError(
                "--shard needs --csv: each shard writes its own table, which "
                "merge-predictions merges"
            )
        images = take_shard(images, index, count, lambda pair: str(pair[0]))
        logger.info("shard %d/%d: %d of %d images", index, count, len(images), len(masks))
    return images, (index, count)


def _load_model(args: argparse.Namespace, settings: ModelSettings) -> tuple[System, str]:
    """The system to run (loaded once) and its name.

    Raises:
        StoicError: for a lung mask or QC asked of the ConvNeXt, or a model file problem.
    """
    from stoic_ct.inference.systems import load_model_folder
    from stoic_ct.weights.system_record import choose

    model_dir = args.model_dir or default_model_dir()
    if (args.system or choose(model_dir).system) == "convnext3d":
        for flag, given in (("--lung-mask", args.lung_mask), ("--qc", args.qc)):
            if given is not None:
                raise StoicError(
                    f"{flag} is for Balaitous and the ensemble: the convnext3d system sees "
                    "the whole scan, without a lung mask"
                )
    started = time.perf_counter()
    model, choice = load_model_folder(
        model_dir,
        settings,
        system=args.system,
        lung_masks="r231" if args.lung_mask is None else "given",
    )
    logger.info(
        "%s loaded from %s on %s in %.1f s",
        choice.system,
        model_dir,
        settings.device,
        time.perf_counter() - started,
    )
    return model, choice.system


def _open_table(args: argparse.Namespace, index: int, count: int) -> set[str]:
    """Start --csv (or take up the rows it holds, with --resume): the images already done."""
    if args.csv is None:
        return set()
    try:
        done = start_csv(args.csv, args.resume)
    except ValueError as error:
        raise StoicError(str(error)) from None
    if count > 1:
        record = shard_record([str(path) for path in args.images], index, count)
        write_shard_record(args.csv, record)
    if done:
        logger.info("%s holds results for %d of the scans: skipping them", args.csv, len(done))
    return done


def _result_row(
    outcome: Outcome, system: str
) -> tuple[dict[str, object], BalaitousPrediction | None]:
    """The results table's row of one scan (its error where it failed), and what Balaitous
    saw of it (for the QC picture; None for the ConvNeXt or a failed scan)."""
    from stoic_ct.inference.systems import balaitous_part

    result, demographics = outcome.prediction, outcome.demographics
    row: dict[str, object] = {"image": str(outcome.job.image)}
    if outcome.error is not None:
        logger.error("%s", outcome.error)
        row["error"] = str(outcome.error)
    row["warnings"] = " | ".join(outcome.warnings)
    if result is None or demographics is None:
        return row, None
    p, seen = result.probabilities, balaitous_part(result)
    row |= {
        "probability_covid_19": f"{p.covid:.6f}",
        "probability_severe_covid_19": f"{p.severe:.6f}",
        "age_years": f"{demographics.age_years:g}",
        "age_source": demographics.age_source,
        "sex": demographics.sex or "",
        "sex_source": demographics.sex_source,
        "lung_found": "" if seen is None else seen.slices.lung_found,
        "system": system,
    }
    return row, seen


def run_merge_predictions(args: argparse.Namespace) -> int:
    """The `merge-predictions` command."""
    rows = merge_results(args.tables, args.out)
    logger.info("wrote %s: %d rows from %d tables", args.out, rows, len(args.tables))
    return 0


def _age(text: str) -> float:
    try:
        return parse_age(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
