"""Command line: `python -m stoic_ct COMMAND ...`.

One module per command group, each registering its parsers with their handlers:
`predict` (predict, merge-predictions), `serve` (the invoke API's web server), `files`
(fetch-weights, check-model, sample-scans, random-weights), `phantoms` (phantom,
phantom-cohort), `heads` (extract-features, merge-features, fit-heads, install-heads,
evaluate), `convnext` (inflate-convnext, finetune, pretrain) and `ensemble` (fit-ensemble).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from stoic_ct.cli import convnext, ensemble, files, heads, phantoms, predict, serve
from stoic_ct.errors import StoicError
from stoic_ct.logs import configure_logging
from stoic_ct.weights.system_record import invoked_as

logger = logging.getLogger("stoic_ct")

DESCRIPTION = """Commands:
    predict         run the model on any number of scans and print or write the probabilities
    merge-predictions  merge the results tables of every shard of a predict run
    serve           the invoke API: a web server on port 4743, the model loaded once
    fetch-weights   download the four model files from where they are published, and check them
    check-model     say which system a model folder holds (system.json), and check its files
    sample-scans    fetch two public chest CTs (pyradiomics 3.1.0's test data) into a cache
    random-weights  write randomly initialised model files in the published layouts
    phantom         write a synthetic chest CT phantom
    phantom-cohort  write a synthetic cohort in the STOIC training layout
    extract-features  encoder features of every scan of a STOIC-layout cohort (cached, shardable)
    merge-features  merge the feature tables of several shards
    fit-heads       fit the four logistic regressions on a feature table: a new balaitous.npz
    install-heads   put fitted heads into a model folder (checked, MANIFEST updated)
    evaluate        nested cross-validated ROC-AUC of the heads, or a score of given predictions
    inflate-convnext  make convnext3d.pth from 2D ConvNeXt weights (--encoder convnext3d-frozen)
    finetune        fine-tune the 3D ConvNeXt end to end, k folds: convnext3d_<task>.pth
    pretrain        pretrain the 3D ConvNeXt: lesion segmentation, or multitask with pseudo-labels
    fit-ensemble    weights of the ensemble of both systems from out-of-fold predictions
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stoic_ct",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (predict, serve, files, phantoms, heads, convnext, ensemble):
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status."""
    given = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(given)
    args.argv = given
    invoked_as("python -m stoic_ct", given)
    # A command the container runs as its entry point logs as process.py does.
    configure_logging(
        args.verbose, information_to_stdout=getattr(args, "information_to_stdout", False)
    )
    try:
        status: int = args.handler(args)
    except StoicError as error:
        logger.error("%s", error)
        return 1
    return status
