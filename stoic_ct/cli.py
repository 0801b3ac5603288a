"""Command line: `python -m stoic_ct COMMAND ...`.

Commands:
    predict         run the model on any number of scans and print or write the probabilities
    fetch-weights   download the four model files from where they are published, and check them
    phantom         write a synthetic chest CT phantom
    phantom-cohort  write a synthetic cohort in the STOIC training layout
    random-weights  write randomly initialised model files in the published layouts
    sample-scans    fetch two public chest CTs (pyradiomics 3.1.0's test data) into a cache
    extract-features  encoder features of every scan of a STOIC-layout cohort (cached, shardable)
    merge-features  merge the feature tables of several shards
    inflate-convnext  make convnext3d.pth from 2D ConvNeXt weights (--encoder convnext3d)
    fit-heads       fit the four logistic regressions on a feature table: a new balaitous.npz
    install-heads   put fitted heads into a model folder (checked, MANIFEST updated)
    evaluate        nested cross-validated ROC-AUC of the heads, or a score of given predictions
    pretrain        pretrain the 3D ConvNeXt: lesion segmentation, or multitask with pseudo-labels
    finetune        fine-tune the 3D ConvNeXt end to end, k folds: convnext3d_<task>.pth
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from stoic_ct.errors import StoicError
from stoic_ct.inference.batch import append_row, collected_warnings, qc_file_names, start_csv
from stoic_ct.io.demographics import parse_age, resolve_demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.logs import configure_logging
from stoic_ct.models.convnext3d import SIZES as CONVNEXT_SIZES
from stoic_ct.models.inflation import INFLATIONS, NORMALISATIONS
from stoic_ct.options import add_model_arguments
from stoic_ct.weights.fetch import INDEX_URL, ZENODO_URL, configured_index
from stoic_ct.weights.model_files import (
    R231,
    REPOSITORY_MODEL_DIR,
    REPOSITORY_ROOT,
    default_model_dir,
)

if TYPE_CHECKING:
    from stoic_ct.head_training.training import FitSettings

logger = logging.getLogger("stoic_ct")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stoic_ct",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="P(COVID-19) and P(severe COVID-19) for each scan",
        description="Run Balaitous on each scan (.mha, .mhd, .nii.gz, .nrrd or a DICOM folder). "
        "Models load once. Results go to stdout, one line per scan, and to --csv.",
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
        "binary mask), any geometry; give it once per IMAGE, in the same order",
    )
    predict.add_argument(
        "--qc",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a quality-control PNG per scan to this folder",
    )
    predict.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="slices per encoder batch (default: 32 on a GPU, 16 on a CPU)",
    )
    add_model_arguments(predict)

    fetch = commands.add_parser(
        "fetch-weights",
        help="download and check the four model files",
        description="Download the model files from where they are published (Zenodo, "
        "lungmask's GitHub release, the balaitous 1.2 wheel on the package index), resuming "
        "broken downloads; check each (published digest, keys and shapes); record their "
        "sha256 in DEST/MANIFEST. Files already present and valid are kept. Offline, it "
        "says per file where to fetch it by hand and where to put it.",
    )
    fetch.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="folder for the files (default: the repository's model/)",
    )
    fetch.add_argument(
        "--zenodo-url",
        default=ZENODO_URL,
        help=f"base URL of the ViT-L files (default {ZENODO_URL})",
    )
    fetch.add_argument(
        "--lungmask-url",
        default=R231.url,
        help="URL of the R231 file; its name carries the sha256 prefix to check",
    )
    fetch.add_argument(
        "--index-url",
        default=configured_index(),
        help="package index holding the balaitous 1.2 wheel "
        f"(default: $PIP_INDEX_URL, else {INDEX_URL})",
    )

    phantom = commands.add_parser(
        "phantom",
        help="write a synthetic chest CT phantom",
        description="Write a synthetic chest CT (body, lungs, heart, spine, trachea, lesions) "
        "in HU, with PatientAge and PatientSex in its header.",
    )
    phantom.add_argument("output", type=Path, help="image file to write (.mha, .nii.gz, ...)")
    phantom.add_argument(
        "--size",
        type=int,
        nargs=3,
        default=(128, 128, 64),
        metavar=("X", "Y", "Z"),
        help="voxels (default 128 128 64)",
    )
    phantom.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(2.8, 2.8, 5.0),
        metavar=("X", "Y", "Z"),
        help="mm (default 2.8 2.8 5)",
    )
    phantom.add_argument(
        "--lesion-burden",
        type=float,
        default=0.05,
        help="fraction of the lungs covered by lesions (default 0.05)",
    )
    phantom.add_argument("--age", default="065Y", help="PatientAge header (default 065Y)")
    phantom.add_argument("--sex", default="M", help="PatientSex header (default M)")
    phantom.add_argument("--seed", type=int, default=0)

    cohort = commands.add_parser(
        "phantom-cohort",
        help="write a synthetic cohort in the STOIC training layout",
        description="Write small chest phantoms to DATA_DIR/data/mha and their labels to "
        "DATA_DIR/metadata/reference.csv: COVID-19 when the lesion burden exceeds 0.12, "
        "severe when age + 100 x burden exceeds 85. To try extract-features, fit-heads and "
        "evaluate end to end; --shuffle-labels gives a cohort with nothing to learn.",
    )
    cohort.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    cohort.add_argument("--patients", type=int, default=48, help="how many (default 48)")
    cohort.add_argument("--seed", type=int, default=0)
    cohort.add_argument("--shuffle-labels", action="store_true")

    samples = commands.add_parser(
        "sample-scans",
        help="fetch two public chest CTs (from the pyradiomics 3.1.0 source archive)",
        description="Fetch the pyradiomics 3.1.0 source archive from the package index "
        "(checked against its pinned sha256) and extract its two chest CTs, lung1_image.nrrd "
        "(neck to mid-thorax) and lung2_image.nrrd (the whole chest), into DEST; kept there "
        "for later calls. Prints their paths.",
    )
    samples.add_argument(
        "--dest",
        type=Path,
        default=REPOSITORY_ROOT / ".cache" / "sample-scans",
        help="folder for the scans (default: .cache/sample-scans in the repository)",
    )
    samples.add_argument(
        "--index-url",
        default=configured_index(),
        help=f"package index (default: $PIP_INDEX_URL, else {INDEX_URL})",
    )

    random = commands.add_parser(
        "random-weights",
        help="write random model files in the published layouts",
        description="Write the four model files, randomly initialised, in the published "
        "layouts, with a RANDOM_WEIGHTS marker. For tests, benchmarks and setup checks "
        "where the real files cannot be downloaded; their probabilities mean nothing.",
    )
    random.add_argument("--dest", type=Path, required=True, help="folder to write to")
    random.add_argument(
        "--heads",
        type=Path,
        default=None,
        help="a real balaitous.npz to copy instead of random heads",
    )
    random.add_argument("--seed", type=int, default=0)
    _training_parsers(commands)
    _convnext_training_parsers(commands)
    return parser


def _training_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """extract-features, merge-features, fit-heads and evaluate."""
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
    extract.add_argument(
        "--shard",
        default="1/1",
        metavar="I/N",
        help="extract only the I-th of N interleaved shards of the patients (default 1/1); "
        "merge the N tables with merge-features",
    )
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

    merge = commands.add_parser(
        "merge-features",
        help="merge shard feature tables into one",
        description="Merge the feature tables of the shards of one extract-features run "
        "(same model files and precision, no patient twice).",
    )
    merge.add_argument("tables", nargs="+", type=Path, metavar="TABLE")
    merge.add_argument("--out", type=Path, required=True, help="merged table to write")

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

    inflate = commands.add_parser(
        "inflate-convnext",
        help="make convnext3d.pth: a 3D ConvNeXt inflated from 2D ConvNeXt weights",
        description="Inflate a 2D ConvNeXt checkpoint (the official release's, with its "
        "'model' key, or timm's) into the 3D ConvNeXt of Kienzle et al. and write it for "
        "--encoder convnext3d. The RGB stem is summed to one channel; the 2D head is "
        "dropped. See stoic_ct/models/inflation.py for the kernel layouts and normalisations.",
    )
    inflate.add_argument(
        "checkpoint", type=Path, nargs="?", metavar="CHECKPOINT_2D", help="2D ConvNeXt weights"
    )
    inflate.add_argument(
        "--out", type=Path, required=True, help="file to write (model/convnext3d.pth)"
    )
    inflate.add_argument("--size", choices=list(CONVNEXT_SIZES), default="tiny")
    inflate.add_argument(
        "--inflation",
        choices=INFLATIONS,
        default="full",
        help="full: copies along depth (default); 1g: Gaussian-weighted copies; 2g: two "
        "orthogonal Gaussian-weighted planes",
    )
    inflate.add_argument(
        "--normalisation",
        choices=NORMALISATIONS,
        default="sum",
        help="sum: keep each kernel's sum, so that the 3D network reproduces the 2D one on "
        "volumes constant in depth (default, as the published code); l2: keep its L2 norm "
        "(as the paper's text)",
    )
    inflate.add_argument(
        "--input-size", type=int, default=224, help="the cube the volume is resized to (224)"
    )
    inflate.add_argument(
        "--random",
        type=int,
        default=None,
        metavar="SEED",
        help="no checkpoint: a randomly initialised 3D ConvNeXt (for tests and setup checks)",
    )

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

    evaluate = commands.add_parser(
        "evaluate",
        help="cross-validated ROC-AUC of the heads, or a score of given predictions",
        description="With FEATURES: stratified repeated k-fold nested cross-validation of "
        "fit-heads (default 4 repeats of 8 folds), out-of-fold ROC-AUC of each head and of "
        "their weighted average with 95%% bootstrap intervals. With --predictions and "
        "--reference: the ROC-AUC of given predictions. Severity is scored among "
        "COVID-positive patients only. Writes report.json, report.md, roc.png and "
        "calibration.png to --out.",
    )
    evaluate.add_argument("features", type=Path, nargs="?", metavar="FEATURES")
    evaluate.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    evaluate.add_argument("--folds", type=int, default=8, help="outer folds (default 8)")
    evaluate.add_argument("--repeats", type=int, default=4, help="repetitions (default 4)")
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


def _convnext_training_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """finetune and pretrain."""
    from stoic_ct.convnext_training.augmentation import AUGMENTATIONS
    from stoic_ct.convnext_training.finetuning import FinetuneSettings
    from stoic_ct.convnext_training.pretraining import MODES, PretrainSettings
    from stoic_ct.preprocessing.cubes import FINETUNE_TASKS

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune the 3D ConvNeXt end to end (k folds): convnext3d_<task>.pth",
        description="Fine-tune a 3D ConvNeXt on DATA_DIR (STOIC layout) as Kienzle et al.: "
        "stratified k-fold cross-validation, AdamW, cross-entropy balanced by the training "
        "fold's class frequencies, their 3D augmentation, an EMA of the weights (validated, "
        "kept, shipped), the best epoch by ROC-AUC (macro F1 for severity4), float16 on a "
        "GPU. Writes OUT/fold-K/ (checkpoints, metrics.csv, learning-curves.png), "
        "OUT/oof.csv, OUT/finetune.json and OUT/convnext3d_<task>.pth, the fold ensemble "
        "that process.py --model convnext3d reads from the model folder. Start from "
        "--init: inflate-convnext's ImageNet weights or pretrain's pretrained.pth.",
    )
    defaults = FinetuneSettings()
    finetune.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    finetune.add_argument("--out", type=Path, required=True, help="run folder")
    finetune.add_argument(
        "--task",
        choices=FINETUNE_TASKS,
        default=defaults.task,
        help="covid (every labelled patient), severe (COVID-positive patients, the STOIC "
        "rule), severity4 (the `severity` column, grades 1-4 of COV19-CT-DB)",
    )
    finetune.add_argument("--folds", type=int, default=defaults.folds, help="default 5")
    finetune.add_argument("--epochs", type=int, default=defaults.epochs, help="default 30")
    _convnext_training_arguments(finetune, defaults.batch_size, defaults.lr, AUGMENTATIONS)
    finetune.add_argument(
        "--resume", action="store_true", help="continue the run in --out where it stopped"
    )

    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain the 3D ConvNeXt (lesion segmentation or multitask): pretrained.pth",
        description="Pretrain a 3D ConvNeXt for `finetune --init`: segmentation of the "
        "lesion masks DATA_DIR/data/lesions/<PatientID>.mha (UperNet-style head, Dice + "
        "cross-entropy), or multitask: COVID-19 classification plus segmentation of "
        "pseudo-labels made by a segmentation-pretrained model (--pseudo-labels-from). A "
        "fifth of the patients is held out to pick the best epoch. Writes OUT/pretrained.pth.",
    )
    pre = PretrainSettings()
    pretrain.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    pretrain.add_argument("--out", type=Path, required=True, help="run folder")
    pretrain.add_argument("--mode", choices=MODES, default=pre.mode, help="default segmentation")
    pretrain.add_argument("--epochs", type=int, default=pre.epochs, help="default 30")
    pretrain.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.pt (same settings; --epochs may grow)",
    )
    pretrain.add_argument(
        "--pseudo-labels-from",
        type=Path,
        default=None,
        metavar="PRETRAINED",
        help="multitask: the pretrained.pth of a segmentation run, to make the lesion "
        "masks with (default: the masks in DATA_DIR/data/lesions)",
    )
    _convnext_training_arguments(pretrain, pre.batch_size, pre.lr, AUGMENTATIONS)


def _convnext_training_arguments(
    parser: argparse.ArgumentParser, batch_size: int, lr: float, augmentations: Sequence[str]
) -> None:
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="CONVNEXT3D",
        help="encoder to start from (inflate-convnext's file or pretrain's pretrained.pth); "
        "default: random initialisation",
    )
    parser.add_argument(
        "--size", choices=tuple(CONVNEXT_SIZES), default="tiny", help="default tiny"
    )
    parser.add_argument("--input-size", type=int, default=224, help="cube side (default 224)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"default {batch_size}")
    parser.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate ({lr:g})")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="default 0.05")
    parser.add_argument("--ema", type=float, default=0.99, help="EMA decay (default 0.99)")
    parser.add_argument("--drop-path", type=float, default=0.1, help="default 0.1")
    parser.add_argument(
        "--augment",
        choices=augmentations,
        default="paper",
        help="paper: Kienzle et al.'s (default); orientation: flips and 90-degree turns "
        "only (small cohorts); none",
    )
    parser.add_argument("--seed", type=int, default=0, help="folds, order, augmentation")
    parser.add_argument(
        "--cache", type=Path, default=None, help="cube cache folder (default OUT/cubes)"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto"
    )


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inner-folds",
        type=int,
        default=5,
        help="folds of the cross-validation that chooses C and the weights (default 5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the fold assignments (default 0)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status."""
    args = _parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.command == "predict":
            return predict(args)
        if args.command == "fetch-weights":
            return fetch_weights(args)
        if args.command == "phantom":
            return phantom(args)
        if args.command == "random-weights":
            return random_weights(args)
        if args.command == "sample-scans":
            return sample_scans(args)
        if args.command == "phantom-cohort":
            return phantom_cohort(args)
        if args.command == "extract-features":
            return extract_features(args)
        if args.command == "merge-features":
            return merge_features(args)
        if args.command == "fit-heads":
            return fit_heads(args)
        if args.command == "evaluate":
            return evaluate(args)
        if args.command == "install-heads":
            return install_heads(args)
        if args.command == "inflate-convnext":
            return inflate_convnext(args)
        if args.command == "finetune":
            return finetune(args)
        if args.command == "pretrain":
            return pretrain(args)
    except StoicError as error:
        logger.error("%s", error)
        return 1
    raise AssertionError(f"unhandled command {args.command}")


def predict(args: argparse.Namespace) -> int:
    """The `predict` command; 0 when every scan gave a result, 1 otherwise."""
    from stoic_ct.inference.pipeline import Balaitous, resolve_device
    from stoic_ct.inference.qc import write_qc

    masks: list[Path | None] = list(args.lung_mask) if args.lung_mask else [None] * len(args.images)
    if len(masks) != len(args.images):
        raise StoicError(
            f"{len(masks)} --lung-mask files for {len(args.images)} images; "
            "give one mask per image, in the same order"
        )
    if args.batch_size is not None and args.batch_size < 1:
        raise StoicError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.resume and args.csv is None:
        raise StoicError("--resume needs --csv: the results table tells which scans are done")
    model_dir = args.model_dir or default_model_dir()
    device = resolve_device(args.device)
    started = time.perf_counter()
    model = Balaitous.from_model_dir(
        model_dir,
        device,
        with_segmenter=args.lung_mask is None,
        batch_size=args.batch_size,
        precision=args.precision,
        encoder=args.encoder,
    )
    logger.info(
        "models loaded from %s on %s in %.1f s", model_dir, device, time.perf_counter() - started
    )

    images = list(zip(args.images, masks, strict=True))
    done: set[str] = set()
    if args.csv is not None:
        try:
            done = start_csv(args.csv, args.resume)
        except ValueError as error:
            raise StoicError(str(error)) from None
        if done:
            logger.info("%s holds results for %d of the scans: skipping them", args.csv, len(done))
    qc_names = qc_file_names(args.images)
    failed = 0
    progress = tqdm(images, desc="scans", unit="scan", disable=None, file=sys.stderr)
    for (image_path, mask_path), qc_name in zip(progress, qc_names, strict=True):
        if str(image_path) in done:
            continue
        row: dict[str, object] = {"image": str(image_path)}
        with collected_warnings() as warnings:
            try:
                scan = read_scan(image_path, args.orientation)
                demographics = resolve_demographics(
                    ages=[
                        ("--age", args.age),
                        (f"{image_path} header PatientAge", scan.header.get("PatientAge")),
                    ],
                    sexes=[
                        ("--sex", args.sex),
                        (f"{image_path} header PatientSex", scan.header.get("PatientSex")),
                    ],
                )
                logger.info("%s; %s", scan.describe(), demographics.describe())
                mask = read_scan(mask_path).volume if mask_path is not None else None
                try:
                    result = model.predict(scan.volume, demographics, lung_labels=mask)
                except StoicError as error:
                    raise error.with_path(mask_path or image_path) from None
            except StoicError as error:
                logger.error("%s", error)
                row["error"] = str(error)
                result = None
        row["warnings"] = " | ".join(warnings)
        if result is None:
            failed += 1
            if args.csv is not None:
                append_row(args.csv, row)
            continue
        p = result.probabilities
        row |= {
            "probability_covid_19": f"{p.covid:.6f}",
            "probability_severe_covid_19": f"{p.severe:.6f}",
            "age_years": f"{demographics.age_years:g}",
            "age_source": demographics.age_source,
            "sex": demographics.sex or "",
            "sex_source": demographics.sex_source,
            "lung_found": result.slices.lung_found,
        }
        if args.csv is not None:
            append_row(args.csv, row)
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
        logger.info("%s: %s", image_path, timings)
        print(
            f"{image_path}\tP(COVID-19)={p.covid:.4f}\tP(severe COVID-19)={p.severe:.4f}",
            flush=True,
        )
        if args.qc is not None:
            png = write_qc(result, str(image_path), args.qc / qc_name, warnings)
            logger.info("quality-control picture: %s", png)

    if args.csv is not None:
        logger.info("results in %s", args.csv)
    if failed:
        logger.error("%d of %d scans failed; see the messages above", failed, len(images))
    return 1 if failed else 0


def _age(text: str) -> float:
    try:
        return parse_age(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def fetch_weights(args: argparse.Namespace) -> int:
    """The `fetch-weights` command."""
    import torch

    from stoic_ct.inference.pipeline import Balaitous, check_model_file
    from stoic_ct.weights.fetch import Sources
    from stoic_ct.weights.fetch import fetch_weights as fetch

    dest = args.dest or REPOSITORY_MODEL_DIR
    fetch(dest, Sources(args.zenodo_url, args.lungmask_url, args.index_url), check_model_file)
    # The files fit together: the encoders' features are what the heads take.
    Balaitous.from_model_dir(dest, torch.device("cpu"), with_segmenter=False)
    return 0


def phantom(args: argparse.Namespace) -> int:
    """The `phantom` command: a phantom centred on the origin."""
    from stoic_ct.phantom import PhantomSpec, make_phantom, write_phantom

    size = tuple(args.size)
    spacing = tuple(args.spacing)
    origin = tuple(-n * s / 2 for n, s in zip(size, spacing, strict=True))
    spec = PhantomSpec(
        size=size,
        spacing=spacing,
        origin=origin,
        lesion_burden=args.lesion_burden,
        age=args.age or None,
        sex=args.sex or None,
        seed=args.seed,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_phantom(make_phantom(spec), str(args.output), spec)
    logger.info(
        "wrote %s (%s voxels at %s mm)",
        args.output,
        "x".join(map(str, size)),
        "x".join(f"{s:g}" for s in spacing),
    )
    return 0


def phantom_cohort(args: argparse.Namespace) -> int:
    """The `phantom-cohort` command."""
    from stoic_ct.phantom import write_phantom_cohort

    if args.patients < 8:
        raise StoicError(f"--patients must be at least 8, not {args.patients}")
    write_phantom_cohort(
        args.data_dir, args.patients, seed=args.seed, shuffle_labels=args.shuffle_labels
    )
    logger.info("wrote %d phantoms and their labels to %s", args.patients, args.data_dir)
    return 0


def sample_scans(args: argparse.Namespace) -> int:
    """The `sample-scans` command: one path per line on stdout."""
    from stoic_ct.io.sample_scans import sample_scans as fetch_sample_scans

    for path in fetch_sample_scans(args.dest, args.index_url).values():
        print(path)
    return 0


def random_weights(args: argparse.Namespace) -> int:
    """The `random-weights` command."""
    from stoic_ct.weights.random_weights import write_random_model_dir

    logger.info("writing random ViT-L, R231 and heads files to %s (about 2.5 GB)", args.dest)
    write_random_model_dir(args.dest, seed=args.seed, heads=args.heads)
    logger.warning("%s holds RANDOM weights: use it to check a setup, never for results", args.dest)
    return 0


def extract_features(args: argparse.Namespace) -> int:
    """The `extract-features` command; 1 when some scans failed (the table holds the rest)."""
    from stoic_ct.head_training.features import encoder_key, extract
    from stoic_ct.inference.pipeline import Balaitous, resolve_device
    from stoic_ct.io.cohort import UNKNOWN, parse_shard, read_cohort, shard

    try:
        index, count = parse_shard(args.shard)
    except ValueError as error:
        raise StoicError(f"--shard: {error}") from None
    patients = shard(read_cohort(args.data_dir), index, count)
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
    model = Balaitous.from_model_dir(
        model_dir,
        resolve_device(args.device),
        with_segmenter=args.lung_masks is None,
        batch_size=args.batch_size,
        precision=args.precision,
        encoder=args.encoder,
        with_heads=False,
    )
    key = encoder_key(
        model_dir, args.precision, args.lung_masks is None, args.encoder, args.orientation
    )
    cache = args.cache or args.out.parent / ".feature-cache"
    table = extract(patients, model, cache, key, masks_dir=args.lung_masks)
    table = replace(table, provenance=table.provenance | {"shard": f"{index}/{count}"})
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


def merge_features(args: argparse.Namespace) -> int:
    """The `merge-features` command."""
    from stoic_ct.head_training.features import FeatureTable, merge_tables

    merged = merge_tables([FeatureTable.load(path) for path in args.tables])
    merged.save(args.out)
    logger.info("wrote %s: %d patients from %d tables", args.out, len(merged), len(args.tables))
    return 0


def _fit_settings(args: argparse.Namespace) -> FitSettings:
    from stoic_ct.head_training.training import FitSettings

    if args.inner_folds < 2:
        raise StoicError(f"--inner-folds must be at least 2, not {args.inner_folds}")
    return FitSettings(inner_folds=args.inner_folds, seed=args.seed)


def fit_heads(args: argparse.Namespace) -> int:
    """The `fit-heads` command."""
    from stoic_ct.head_training.features import FeatureTable
    from stoic_ct.head_training.training import fit_heads as fit
    from stoic_ct.head_training.training import (
        heads_document,
        report_name,
        to_logistic_heads,
        write_heads,
    )

    table = FeatureTable.load(args.features)
    settings = _fit_settings(args)
    fits = fit(table, settings)
    document = heads_document(fits, table, settings)
    path = write_heads(args.out, to_logistic_heads(fits), document)
    logger.info("wrote %s and %s", path, path.with_name(report_name(document["data"]["encoder"])))
    return 0


def inflate_convnext(args: argparse.Namespace) -> int:
    """The `inflate-convnext` command."""
    import torch

    from stoic_ct.models.convnext3d import ConvNeXt3D, save_convnext3d
    from stoic_ct.models.inflation import inflate_convnext as inflate
    from stoic_ct.models.inflation import load_2d_checkpoint

    if (args.checkpoint is None) == (args.random is None):
        raise StoicError("give a 2D CHECKPOINT, or --random SEED, not both")
    if args.input_size < 32:
        raise StoicError(f"--input-size must be at least 32, not {args.input_size}")
    if args.random is not None:
        torch.manual_seed(args.random)
        model = ConvNeXt3D(args.size)
        about = {"source": f"random initialisation, seed {args.random}"}
        logger.warning("%s: RANDOM weights, for tests and setup checks only", args.out)
    else:
        model = ConvNeXt3D(args.size)
        state = inflate(
            load_2d_checkpoint(args.checkpoint), model, args.inflation, args.normalisation
        )
        model.load_state_dict(state, strict=True)
        about = {
            "source": args.checkpoint.name,
            "inflation": args.inflation,
            "normalisation": args.normalisation,
        }
    save_convnext3d(args.out, model, args.size, args.input_size, about)
    logger.info("wrote %s (ConvNeXt3D %s, input %d^3)", args.out, args.size, args.input_size)
    return 0


def install_heads(args: argparse.Namespace) -> int:
    """The `install-heads` command."""
    from stoic_ct.head_training.training import install_heads as install

    model_dir = args.model_dir or REPOSITORY_MODEL_DIR
    path = install(args.heads_dir, model_dir)
    logger.info("installed %s (and heads.json); MANIFEST updated where there is one", path)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """The `evaluate` command: nested cross-validation, or a score of given predictions."""
    from stoic_ct.head_training.evaluation import (
        cross_validate,
        protocol,
        report,
        score_predictions,
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
    for task, entry in document["tasks"].items():
        for head, score in entry["heads"].items():
            low, high = score["ci95"]
            print(f"{task}\t{head}\tAUC {score['auc']:.3f}\t95% CI {low:.3f}-{high:.3f}")
    logger.info("report written to %s", args.out)
    return 0


def _network_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings finetune and pretrain share, from `_convnext_training_arguments`."""
    return {
        "size": args.size,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "ema_decay": args.ema,
        "drop_path": args.drop_path,
        "augment": args.augment,
        "seed": args.seed,
        "init": None if args.init is None else str(args.init.resolve()),
    }


def finetune(args: argparse.Namespace) -> int:
    """The `finetune` command."""
    from stoic_ct.convnext_training.finetuning import FinetuneSettings
    from stoic_ct.convnext_training.finetuning import finetune as run
    from stoic_ct.inference.pipeline import resolve_device
    from stoic_ct.preprocessing.cubes import task_patients

    if args.init is not None and not args.init.exists():
        raise StoicError("is missing (--init)", args.init)
    try:
        settings = FinetuneSettings(
            task=args.task, folds=args.folds, epochs=args.epochs, **_network_settings(args)
        )
    except ValueError as error:
        raise StoicError(str(error)) from None
    if args.init is None:
        logger.warning("no --init: the ConvNeXt starts from random weights")
    patients, labels = task_patients(args.data_dir, args.task)
    logger.info(
        "%s task: %d patients (%s) from %s",
        args.task,
        len(patients),
        " / ".join(str(int((labels == c).sum())) for c in range(int(labels.max()) + 1)),
        args.data_dir,
    )
    result = run(
        patients,
        labels,
        settings,
        args.out,
        device=resolve_device(args.device),
        cache_dir=args.cache,
        resume=args.resume,
    )
    print(f"{args.task}: out-of-fold metric {result.metric:.4f}; wrote {result.ensemble}")
    return 0


def pretrain(args: argparse.Namespace) -> int:
    """The `pretrain` command."""
    from stoic_ct.convnext_training.pretraining import PretrainSettings
    from stoic_ct.convnext_training.pretraining import pretrain as run
    from stoic_ct.inference.pipeline import resolve_device
    from stoic_ct.io.cohort import read_cohort
    from stoic_ct.preprocessing.cubes import LESION_DIR, task_patients

    for path in (args.init, args.pseudo_labels_from):
        if path is not None and not path.exists():
            raise StoicError("is missing", path)
    try:
        settings = PretrainSettings(
            mode=args.mode,
            epochs=args.epochs,
            **_network_settings(args),
            pseudo_labels_from=None
            if args.pseudo_labels_from is None
            else str(args.pseudo_labels_from.resolve()),
        )
    except ValueError as error:
        raise StoicError(str(error)) from None
    lesions = args.data_dir / LESION_DIR
    if args.mode == "multitask":
        patients, labels = task_patients(args.data_dir, "covid")
    else:
        patients, labels = read_cohort(args.data_dir), None
    path = run(
        patients,
        labels,
        settings,
        args.out,
        device=resolve_device(args.device),
        lesion_dir=lesions if lesions.is_dir() else None,
        cache_dir=args.cache,
        resume=args.resume,
    )
    print(f"wrote {path}")
    return 0
