"""STOIC2021 final-phase training: new Balaïtous heads from a cohort in the training layout.

    python train.py [--input /input] [--output /output] [--scratch /scratch]
                    [--model-dir DIR] [--device auto|cpu|cuda] [--precision exact|fast]
                    [--encoder vit|convnext3d-frozen] [--lung-masks DIR]
                    [--evaluate] [--folds 8] [--repeats 4] [--seed 0]

Reads INPUT/data/mha/<PatientID>.mha and INPUT/metadata/reference.csv, extracts both
encoders' features of every scan (cached under SCRATCH/feature-cache, so that a rerun
resumes), fits the four logistic regressions, and writes OUTPUT/balaitous.npz (the
published layout) and OUTPUT/heads.json; with --evaluate also OUTPUT/report/ (nested
cross-validation). Scans that fail are reported and left out. The encoders and the U-Net
are the ones in the model folder, unchanged.

In the container: `docker run --entrypoint python IMAGE train.py`, with the cohort at
/input, the model folder at /opt/ml/model, a writable /output and /scratch. Progress goes
to stdout; stderr carries only warnings and errors. Then put the heads into model/ with
`python -m stoic_ct install-heads OUTPUT` and run ./export.sh.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from stoic_ct.errors import StoicError
from stoic_ct.logs import configure_logging
from stoic_ct.options import add_model_arguments, model_settings
from stoic_ct.weights.model_files import default_model_dir

logger = logging.getLogger("stoic_ct.train")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, default=Path("/input"))
    parser.add_argument("--output", type=Path, default=Path("/output"))
    parser.add_argument("--scratch", type=Path, default=Path("/scratch"))
    add_model_arguments(parser)
    parser.add_argument(
        "--lung-masks",
        type=Path,
        default=None,
        help="lung label images <PatientID>.mha to use instead of the U-Net",
    )
    parser.add_argument("--evaluate", action="store_true", help="also write OUTPUT/report/")
    parser.add_argument("--folds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Extract, fit, write; 0 on success, 1 with a one-line message otherwise."""
    args = parse_args(argv)
    configure_logging(information_to_stdout=True)
    try:
        train(args)
    except StoicError as error:
        logger.error("%s", error)
        return 1
    return 0


def train(args: argparse.Namespace) -> None:
    from stoic_ct.head_training.evaluation import cross_validate, protocol, report
    from stoic_ct.head_training.features import encoder_key, extract
    from stoic_ct.head_training.training import (
        FitSettings,
        fit_heads,
        heads_document,
        to_logistic_heads,
        write_heads,
    )
    from stoic_ct.inference.pipeline import Balaitous
    from stoic_ct.io.cohort import read_cohort

    patients = read_cohort(args.input)
    model_dir = args.model_dir or default_model_dir()
    logger.info("%d scans in %s; models from %s", len(patients), args.input, model_dir)
    with_r231 = args.lung_masks is None
    model = Balaitous.feature_extractor(
        model_dir, model_settings(args), lung_masks="r231" if with_r231 else "given"
    )
    key = encoder_key(model_dir, args.precision, with_r231, args.encoder, args.orientation)
    table = extract(patients, model, args.scratch / "feature-cache", key, args.lung_masks)
    table.save(args.scratch / "features.npz")
    settings = FitSettings(seed=args.seed)
    fits = fit_heads(table, settings)
    path = write_heads(
        args.output,
        to_logistic_heads(fits),
        heads_document(fits, table, settings),
        expect_model_files=False,
    )
    logger.info(
        "new heads in %s; install them with: python -m stoic_ct install-heads %s", path, path.parent
    )
    if args.evaluate:
        results = cross_validate(table, settings, args.folds, args.repeats)
        about = {
            "title": "Nested cross-validation of the heads fitted by train.py",
            "protocol": {"patients": len(table)} | protocol(settings, args.folds, args.repeats),
        }
        report(results, about, args.output / "report", seed=settings.seed)
        logger.info("evaluation report in %s", args.output / "report")


if __name__ == "__main__":
    sys.exit(main())
