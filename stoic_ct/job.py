"""One grand-challenge job: the CT and its age and sex in, both probabilities out.

`StoicAlgorithm` is evalutils' Algorithm around one of the systems; process.py runs it once
per process (the exec API), `python -m stoic_ct serve` once per POST /invoke with the model
loaded once (the invoke API). A job reads only what lies inside its input folder, resolved
(under invoke, /input is a symbolic link to the case's staged folder): a scan whose reading
would open a file elsewhere is refused.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from functools import cached_property
from pathlib import Path

import SimpleITK
from evalutils.evalutils import Algorithm

from stoic_ct.errors import StoicError
from stoic_ct.inference.prediction import System
from stoic_ct.io.contract import (
    JobInputs,
    Probabilities,
    demographics_for,
    find_input_image,
    prepare_output_dir,
    read_job_inputs,
    write_outputs,
)
from stoic_ct.io.imageio import Scan, read_scan, scan_from_image
from stoic_ct.io.orientation import Orientation
from stoic_ct.io.output_names import COVID_OUTPUT, SEVERE_OUTPUT

logger = logging.getLogger(__name__)


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
        """Find and read the one input image, with clear errors instead of evalutils'
        skipping; nothing outside the input folder is read."""
        image = find_input_image(self.inputs.image_dir)
        self.scans = [read_scan(image, self.orientation, within=self.input_dir)]

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


def run_job(
    model: System | Future[System],
    input_dir: Path,
    output_dir: Path,
    orientation: Orientation = "canonical",
) -> Probabilities:
    """One job: the inputs of `input_dir` scored, both outputs written to `output_dir`.

    Raises:
        StoicError: one line naming the file at fault; no output is left behind then.
    """
    algorithm = StoicAlgorithm(
        input_dir=input_dir, output_dir=output_dir, model=model, orientation=orientation
    )
    algorithm.process()
    (result,) = algorithm.results
    return Probabilities(covid=result[COVID_OUTPUT], severe=result[SEVERE_OUTPUT])
