"""STOIC2021 algorithm container entry point (the exec API): one chest CT in, two
probabilities out.

Reads the CT, age and sex from the sockets listed in /input/inputs.json when it exists,
else from the STOIC layout (the single image under /input/images/ct/, /input/patient-age.json,
/input/patient-sex.json); age and sex fall back to the image header, then to the defaults.
Writes /output/probability-covid-19.json and /output/probability-severe-covid-19.json.
Runs the system the model folder holds (its system.json: balaitous, convnext3d or ensemble;
balaitous for the published files). Progress goes to stdout; stderr carries only warnings
and errors (the platform shows it as warnings on the result).

Local use:
    python process.py --input test/input --output /tmp/out [--model-dir DIR] [--device cpu]
        [--system balaitous|convnext3d|ensemble]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stoic_ct.errors import StoicError
from stoic_ct.inference.prediction import System
from stoic_ct.inference.systems import load_model_folder
from stoic_ct.io.contract import INPUT_DIR, OUTPUT_DIR
from stoic_ct.job import run_job
from stoic_ct.logs import configure_logging
from stoic_ct.options import add_model_arguments, model_settings
from stoic_ct.runtime import log_runtime
from stoic_ct.weights.model_files import default_model_dir

logger = logging.getLogger("stoic_ct.process")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the container's job; 0 on success, 1 with one error line otherwise."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", type=Path, default=INPUT_DIR, help="input folder (default /input)"
    )
    parser.add_argument(
        "--output", type=Path, default=OUTPUT_DIR, help="output folder (default /output)"
    )
    add_model_arguments(parser, system=True)
    args = parser.parse_args(argv)
    configure_logging(information_to_stdout=True)
    started = time.perf_counter()
    log_runtime()
    try:
        settings = model_settings(args)
        model_dir = args.model_dir or default_model_dir()

        def load() -> System:
            model, choice = load_model_folder(model_dir, settings, system=args.system)
            logger.info(
                "%s loaded on %s (%s precision) in %.1f s",
                choice.system,
                settings.device,
                args.precision,
                time.perf_counter() - started,
            )
            return model

        # The models load while the image is read: both take seconds, mostly outside the GIL.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
            run_job(pool.submit(load), args.input, args.output, args.orientation)
    except StoicError as error:
        logger.error("%s", error)
        return 1
    logger.info("done in %.1f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
