"""STOIC2021 algorithm container entry point: one chest CT in, two probabilities out.

Reads the CT, age and sex from the sockets listed in /input/inputs.json when it exists,
else from the STOIC layout (the single image under /input/images/ct/, /input/patient-age.json,
/input/patient-sex.json); age and sex fall back to the image header, then to the defaults.
Writes /output/probability-covid-19.json and /output/probability-severe-covid-19.json.
Progress goes to stdout; stderr carries only warnings and errors (the platform shows it as
warnings on the result).

Local use:
    python process.py --input test/input --output /tmp/out [--model-dir DIR] [--device cpu]
        [--model balaitous|convnext3d|ensemble]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import SimpleITK
import torch
from evalutils.evalutils import Algorithm

from stoic_ct.errors import StoicError
from stoic_ct.inference.prediction import System
from stoic_ct.inference.systems import load_system
from stoic_ct.io.contract import (
    COVID_OUTPUT,
    INPUT_DIR,
    OUTPUT_DIR,
    SEVERE_OUTPUT,
    JobInputs,
    demographics_for,
    find_input_image,
    prepare_output_dir,
    read_job_inputs,
    write_outputs,
)
from stoic_ct.io.imageio import Scan, read_scan, scan_from_image
from stoic_ct.io.orientation import Orientation
from stoic_ct.logs import configure_logging
from stoic_ct.models.heads import Probabilities
from stoic_ct.options import add_model_arguments, model_settings
from stoic_ct.weights.model_files import MODEL_KINDS, default_model_dir

logger = logging.getLogger("stoic_ct.process")


class StoicAlgorithm(Algorithm):  # type: ignore[misc]
    """evalutils' load -> validate -> process_cases -> save, around one of the systems.

    Only evalutils' public hooks are overridden; the one case (the job's one scan) and its
    result are kept here, not in evalutils' private tables.
    """

    def __init__(
        self,
        *,
        input_dir: Path,
        output_dir: Path,
        model: System | Future[System],
        orientation: Orientation = "canonical",
    ) -> None:
        """`model` may still be loading (a Future): the image is read meanwhile."""
        super().__init__(input_path=input_dir, output_path=output_dir, validators={})
        self.input_dir, self.output_dir, self._model = input_dir, output_dir, model
        self.orientation = orientation
        self.scans: list[Scan] = []
        self.results: list[dict[str, float]] = []

    @cached_property
    def inputs(self) -> JobInputs:
        """The job's inputs: from inputs.json's sockets, else the STOIC layout."""
        return read_job_inputs(self.input_dir)

    @property
    def model(self) -> System:
        """The loaded model, waiting for it if it is still loading."""
        if isinstance(self._model, Future):
            self._model = self._model.result()
        return self._model

    def process(self) -> None:
        """Check the output folder first, so that a bad one fails before any work."""
        prepare_output_dir(self.output_dir)
        super().process()

    def load(self) -> None:
        """Find and read the one input image, with clear errors instead of evalutils' skipping."""
        self.scans = [read_scan(find_input_image(self.inputs.image_dir), self.orientation)]

    def validate(self) -> None:
        """Nothing to add: read_scan has checked the image (evalutils validates its tables)."""

    def process_cases(self, file_loader_key: str | None = None) -> None:
        """Predict every scan `load` read (one per job)."""
        self.results = [self.process_case(idx=i, case=scan) for i, scan in enumerate(self.scans)]

    def process_case(self, *, idx: int, case: Scan) -> dict[str, float]:
        """The outputs of the `idx`-th scan."""
        return self.predict_scan(case)

    def predict(self, *, input_image: SimpleITK.Image) -> dict[str, float]:
        """evalutils' per-image hook: the outputs for an image already in memory."""
        return self.predict_scan(scan_from_image(input_image, self.inputs.image_dir))

    def predict_scan(self, scan: Scan) -> dict[str, float]:
        """Both output values for one scan, keyed by output file name."""
        demographics = demographics_for(scan, self.inputs)
        logger.info("%s; %s", scan.describe(), demographics.describe())
        try:
            result = self.model.predict(scan.volume, demographics)
        except StoicError as error:
            raise error.with_path(scan.path) from None
        logger.info("stages: %s", ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
        return {
            COVID_OUTPUT: result.probabilities.covid,
            SEVERE_OUTPUT: result.probabilities.severe,
        }

    def save(self) -> None:
        """Write the two output files (atomically: both or none)."""
        (result,) = self.results
        written = write_outputs(
            self.output_dir, Probabilities(covid=result[COVID_OUTPUT], severe=result[SEVERE_OUTPUT])
        )
        for name, path in written.items():
            logger.info("%s = %.6f", path, result[name])


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
    add_model_arguments(parser)
    parser.add_argument(
        "--model",
        choices=MODEL_KINDS,
        default="balaitous",
        help="balaitous: the published model (default); convnext3d: the fine-tuned 3D "
        "ConvNeXt fold ensembles (convnext3d_covid.pth, convnext3d_severe.pth); ensemble: "
        "both, averaged with the weights of ensemble.json",
    )
    args = parser.parse_args(argv)
    configure_logging(information_to_stdout=True)
    started = time.perf_counter()
    try:
        settings = model_settings(args)
        model_dir = args.model_dir or default_model_dir()

        def load() -> System:
            model = load_system(args.model, model_dir, settings)
            logger.info(
                "%s loaded from %s on %s (torch %s, %s precision) in %.1f s",
                args.model,
                model_dir,
                settings.device,
                torch.__version__,
                args.precision,
                time.perf_counter() - started,
            )
            return model

        # The models load while the image is read: both take seconds, mostly outside the GIL.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
            loading = pool.submit(load)
            StoicAlgorithm(
                input_dir=args.input,
                output_dir=args.output,
                model=loading,
                orientation=args.orientation,
            ).process()
    except StoicError as error:
        logger.error("%s", error)
        return 1
    logger.info("done in %.1f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
