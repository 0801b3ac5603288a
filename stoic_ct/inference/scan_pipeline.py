"""Many scans through one loaded system, the CPU stages of other scans in worker processes.

Each scan goes through four stages; the networks stay in this process, loaded once:

    prepare   (worker)  read the scan (and its lung mask), age and sex, resample, and
                        lungmask's pre-processing (body crop, resize to 256 x 256)
    segment   (here)    the R231 U-Net on those slices
    crop      (worker)  lungmask's post-processing (3D clean-up, resize back), then the
                        lung mask cleaning and the crop (published steps 4-7)
    classify  (here)    the encoders and heads; the fine-tuned ConvNeXt on the scan

While one scan's encoders run, the next scan's post-processing and the following scans'
reading run in the workers, so that a GPU waits on the CPU as little as the workers allow.
With no workers every stage runs here, one scan after the other: the same functions in
the same order, so the results are the same either way. Results come out in the order of
the scans.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stoic_ct.errors import StoicError
from stoic_ct.inference.lung_masks import R231Segmenter
from stoic_ct.inference.pipeline import Balaitous, Stopwatch
from stoic_ct.inference.prediction import Prediction, System
from stoic_ct.inference.results_table import collected_warnings
from stoic_ct.inference.systems import (
    ConvNeXtSystem,
    EnsembleSystem,
    balaitous_of,
    members_of,
)
from stoic_ct.io.demographics import Demographics, resolve_demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.io.orientation import Orientation
from stoic_ct.io.volume import Volume
from stoic_ct.preprocessing.cropping import SliceStack, prepare_slices
from stoic_ct.preprocessing.lung_segmentation import (
    UNetInput,
    labels_from_mask_image,
    lungmask_input,
    lungmask_labels,
)
from stoic_ct.preprocessing.resampling import resample

logger = logging.getLogger(__name__)

# Worker processes by device type when several scans are given: on a GPU, enough that the
# CPU stages of a chest scan (about 2.5 s on one core) keep pace with its networks; on a
# CPU none, as the networks take the cores (bench.cohort, one worker on two cores: 0.96x).
WORKERS = {"cuda": min(8, max(1, (os.cpu_count() or 2) // 2)), "cpu": 0}


@dataclass(frozen=True)
class ScanJob:
    """One scan to predict: its image, its lung mask (None: the U-Net's), and the age and
    sex given for it (None: from the header, else the defaults)."""

    image: Path
    mask: Path | None = None
    age: float | None = None
    sex: str | None = None
    orientation: Orientation = "canonical"


@dataclass(frozen=True)
class Plan:
    """Which stages a system needs, decided once from the loaded system."""

    balaitous: bool  # resample, lung mask, crop
    unet: bool  # the R231 U-Net, split into its pre-processing, network and post-processing
    volume: bool  # the scan itself, for the fine-tuned ConvNeXt


@dataclass
class Prepared:
    """What `prepare` gives a scan: everything up to its networks, or the error."""

    job: ScanJob
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    description: str = ""
    demographics: Demographics | None = None
    volume: Volume | None = None
    resampled: Volume | None = None
    labels: np.ndarray | None = None
    unet_input: UNetInput | None = None
    error: StoicError | None = None
    pid: int = field(default_factory=os.getpid)  # of the process that prepared it


@dataclass(frozen=True)
class Cropped:
    """What `crop` gives a scan: the slices the encoders see, or the error."""

    stack: SliceStack | None
    warnings: list[str]
    seconds: dict[str, float]
    error: StoicError | None = None
    pid: int = field(default_factory=os.getpid)


@dataclass(frozen=True)
class Outcome:
    """One scan's result, in the order the scans were given.

    Attributes:
        prediction: None when the scan failed (`error` says why, naming the file).
        description: the scan as read, for logs ("PATH: 512x512x61 voxels at ...").
        warnings: every warning logged for this scan, in any process.
    """

    job: ScanJob
    prediction: Prediction | None
    demographics: Demographics | None
    description: str
    warnings: list[str]
    error: StoicError | None = None


def plan_of(system: System) -> Plan:
    """The stages `system` needs."""
    balaitous = balaitous_of(system)
    return Plan(
        balaitous=balaitous is not None,
        unet=balaitous is not None and isinstance(balaitous.segmenter, R231Segmenter),
        volume=any(isinstance(m, ConvNeXtSystem) for m in members_of(system).values()),
    )


def prepare(job: ScanJob, plan: Plan) -> Prepared:
    """Stage 1 (a worker): read, age and sex, resample, lungmask's pre-processing."""
    prepared = Prepared(job)
    watch = Stopwatch(prepared.seconds)
    with collected_warnings() as warnings:
        try:
            scan = read_scan(job.image, job.orientation)
            prepared.description = scan.describe()
            prepared.demographics = resolve_demographics(
                ages=[
                    ("--age", job.age),
                    (f"{job.image} header PatientAge", scan.header.get("PatientAge")),
                ],
                sexes=[
                    ("--sex", job.sex),
                    (f"{job.image} header PatientSex", scan.header.get("PatientSex")),
                ],
            )
            mask = read_scan(job.mask).volume if job.mask is not None else None
            watch.lap("read")
            if plan.volume:
                prepared.volume = scan.volume
            if plan.balaitous:
                prepared.resampled = resample(scan.volume)
                watch.lap("resample")
                try:
                    if mask is not None:
                        prepared.labels = labels_from_mask_image(mask, prepared.resampled)
                    elif plan.unet:
                        prepared.unet_input = lungmask_input(prepared.resampled)
                except StoicError as error:
                    raise error.with_path(job.mask or job.image) from None
                watch.lap("lung mask")
        except StoicError as error:
            prepared.error = error.with_path(job.image)
    prepared.warnings = list(warnings)
    return prepared


def crop(prepared: Prepared, classes: np.ndarray | None) -> Cropped:
    """Stage 3 (a worker): the U-Net's classes to lung labels, then the published steps 4-7."""
    watch = Stopwatch()
    with collected_warnings() as warnings:
        try:
            labels = prepared.labels
            if classes is not None and prepared.unet_input is not None:
                labels = lungmask_labels(classes, prepared.unet_input)
                watch.lap("lung mask")
            if prepared.resampled is None or labels is None:
                raise ValueError("crop needs a resampled scan and its lung labels")
            stack = prepare_slices(prepared.resampled, labels)
            watch.lap("crop")
        except StoicError as error:
            return Cropped(None, list(warnings), watch.seconds, error.with_path(prepared.job.image))
    return Cropped(stack, list(warnings), watch.seconds)


class _Here(Executor):
    """Runs what it is given at once, in this process: the pipeline without workers."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _quiet_worker() -> None:
    # A worker's warnings come back with its scans, to be logged here; lungmask logs
    # every stage at INFO.
    import lungmask.utils  # noqa: F401  (it sets its logger's level when imported)

    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger("lungmask").setLevel(logging.WARNING)


def workers_pool(workers: int) -> Executor:
    """`workers` processes (forkserver: safe beside CUDA and threads), or this process."""
    if workers < 1:
        return _Here()
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("forkserver"), initializer=_quiet_worker
    )


def predict_scans(system: System, jobs: Iterable[ScanJob], workers: int = 0) -> Iterator[Outcome]:
    """Every job's Outcome, in order; `workers` processes run the CPU stages (0: none)."""
    plan = plan_of(system)
    queue = list(jobs)
    if workers < 1:
        here = _Here()
        for job in queue:
            prepared = prepare(job, plan)
            yield _classify(system, plan, prepared, _segment(system, plan, prepared, here))
        return
    with workers_pool(workers) as pool:
        ahead = max(1, 2 * workers)
        reading: deque[Future[Prepared]] = deque(
            pool.submit(prepare, job, plan) for job in queue[:ahead]
        )
        waiting: tuple[Prepared, Future[Cropped] | None] | None = None
        for later in [*queue[ahead:], *([None] * len(reading))]:
            prepared = reading.popleft().result()
            if later is not None:
                reading.append(pool.submit(prepare, later, plan))
            cropping = _segment(system, plan, prepared, pool)
            if waiting is not None:
                yield _classify(system, plan, *waiting)
            waiting = (prepared, cropping)
        if waiting is not None:
            yield _classify(system, plan, *waiting)


def _segment(
    system: System, plan: Plan, prepared: Prepared, pool: Executor
) -> Future[Cropped] | None:
    """Stage 2 (here): the U-Net, then stage 3 handed to a worker."""
    if prepared.error is not None or not plan.balaitous:
        return None
    segmenter, classes = _balaitous(system).segmenter, None
    watch = Stopwatch(prepared.seconds)
    if prepared.unet_input is not None:
        assert isinstance(segmenter, R231Segmenter)
        classes = segmenter.classify(prepared.unet_input.slices)
    elif prepared.labels is None:  # a segmenter of the caller's, or none
        assert prepared.resampled is not None
        try:
            if segmenter is None:
                raise StoicError(
                    "no lung segmenter is loaded (lung_masks='given') and no lung mask was given"
                )
            prepared.labels = segmenter(prepared.resampled)
        except StoicError as error:
            prepared.error = error.with_path(prepared.job.image)
            return None
    watch.lap("lung mask")
    return pool.submit(crop, replace(prepared, volume=None), classes)


def _classify(
    system: System, plan: Plan, prepared: Prepared, cropping: Future[Cropped] | None
) -> Outcome:
    """Stage 4 (here): the networks on what the workers prepared; the scan's Outcome."""
    warnings = _brought(prepared.warnings, prepared.pid)
    error, prediction = prepared.error, None
    if error is None:
        if prepared.demographics is not None:
            logger.info("%s; %s", prepared.description, prepared.demographics.describe())
        cropped = cropping.result() if cropping is not None else None
        if cropped is not None:
            warnings += _brought(cropped.warnings, cropped.pid)
            error = cropped.error
        if error is None:
            with collected_warnings() as here:
                try:
                    prediction = _predict(system, prepared, cropped)
                except StoicError as failure:
                    error = failure.with_path(prepared.job.image)
            warnings += here
    return Outcome(
        prepared.job, prediction, prepared.demographics, prepared.description, warnings, error
    )


def _brought(warnings: list[str], pid: int) -> list[str]:
    """Warnings of a stage, logged here when they were logged in another process."""
    if pid != os.getpid():
        for message in warnings:
            logger.warning("%s", message)
    return list(warnings)


def _predict(system: System, prepared: Prepared, cropped: Cropped | None) -> Prediction:
    demographics = prepared.demographics
    assert demographics is not None
    outcomes: dict[str, Prediction] = {}
    for name, member in members_of(system).items():
        if isinstance(member, Balaitous):
            assert cropped is not None and cropped.stack is not None
            seconds = _added(prepared.seconds, cropped.seconds)
            outcomes[name] = member.classify(
                member.encode_slices(cropped.stack, seconds), demographics
            )
        else:
            assert prepared.volume is not None
            outcomes[name] = member.predict(prepared.volume, demographics)
    if isinstance(system, EnsembleSystem):
        return system.combine(outcomes)
    return outcomes[""]


def _added(*parts: dict[str, float]) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for stage, seconds in part.items():
            total[stage] = total.get(stage, 0.0) + seconds
    return total


def _balaitous(system: System) -> Balaitous:
    balaitous = balaitous_of(system)
    assert balaitous is not None, "only a plan with Balaitous segments and crops"
    return balaitous
