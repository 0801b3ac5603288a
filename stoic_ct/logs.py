"""Log lines of every entry point: one line per message, and which stream gets which."""

from __future__ import annotations

import logging
import sys

# The format of every line; imageio recognises it when it sorts ITK's output from ours.
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


def configure_logging(verbose: bool = False, *, information_to_stdout: bool = False) -> None:
    """One line per message, to stderr: the CLI keeps stdout for results.

    With `information_to_stdout` (the container's entry points) messages below WARNING go
    to stdout and only warnings and errors to stderr, which grand-challenge shows as
    warnings on the job's result: a successful run stays quiet there.
    """
    formatter = logging.Formatter(LOG_FORMAT, datefmt=DATE_FORMAT)
    problems = logging.StreamHandler(sys.stderr)
    handlers: list[logging.Handler] = [problems]
    if information_to_stdout:
        problems.setLevel(logging.WARNING)
        information = logging.StreamHandler(sys.stdout)
        information.addFilter(lambda record: record.levelno < logging.WARNING)
        handlers.append(information)
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers)
