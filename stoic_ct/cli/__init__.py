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

DESCRIPTION = "The STOIC2021 COVID-19 CT models: predict, retrain, fetch and check model files."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stoic_ct", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND"
    )
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
