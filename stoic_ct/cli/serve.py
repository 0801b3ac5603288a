"""The `serve` command: the invoke API's web server (stoic_ct.serving)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stoic_ct.io.contract import INPUT_DIR, OUTPUT_DIR
from stoic_ct.options import add_model_arguments, model_settings
from stoic_ct.runtime import log_runtime
from stoic_ct.weights.model_files import default_model_dir

logger = logging.getLogger("stoic_ct")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """serve."""
    from stoic_ct.serving import HOST, PORT

    serve = commands.add_parser(
        "serve",
        help="the invoke API: a web server that loads the model once, one job per POST /invoke",
        description="grand-challenge's invoke API, what the image runs by default: a web "
        f"server on port {PORT} that loads the system the model folder holds once (in the "
        "background: GET /health answers 503 until it is ready, then 200) and runs one job "
        "per POST /invoke, exactly as process.py runs one (the inputs of --input, the "
        "outputs to --output): 201 when both outputs are written; otherwise 422 (a bad "
        "input) or 500, the one-line error on stderr, nothing written, and the server "
        "ready for the next job. Stops on SIGTERM within seconds; exits with status 1 when "
        "the model cannot be loaded.",
    )
    serve.add_argument(
        "--input", type=Path, default=INPUT_DIR, help="each job's input folder (default /input)"
    )
    serve.add_argument(
        "--output",
        type=Path,
        default=OUTPUT_DIR,
        help="each job's output folder (default /output)",
    )
    add_model_arguments(serve, system=True)
    serve.add_argument("--port", type=int, default=PORT, help=f"default {PORT}")
    serve.add_argument(
        "--host", default=HOST, help=f"address to listen on (default {HOST}: every interface)"
    )
    serve.set_defaults(handler=run_serve, information_to_stdout=True)


def run_serve(args: argparse.Namespace) -> int:
    """The `serve` command: 0 after SIGTERM, 1 when the model cannot be loaded."""
    from stoic_ct.inference.prediction import System
    from stoic_ct.inference.systems import load_model_folder
    from stoic_ct.serving import InvokeService, JobFolders, serve

    log_runtime()
    model_dir = args.model_dir or default_model_dir()
    settings = model_settings(args)

    def load() -> System:
        model, choice = load_model_folder(model_dir, settings, system=args.system)
        logger.info(
            "%s loaded on %s (%s precision)", choice.system, settings.device, args.precision
        )
        return model

    folders = JobFolders(args.input, args.output, args.orientation)
    logger.info(
        "serving on %s:%d: each POST /invoke reads %s and writes %s",
        args.host,
        args.port,
        folders.input_dir,
        folders.output_dir,
    )
    return serve(InvokeService(load, folders), args.host, args.port)
