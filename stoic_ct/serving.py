"""The invoke API: a web server that loads the model once and runs one job per POST /invoke.

grand-challenge starts an image labelled `org.grand-challenge.api-method="invoke"` once,
as a web server on port 4743, behind its shim: the shim polls `GET /health` (200: ready;
any other status or a refused connection: it tries again every 10 s, for 300 s in all),
then for each case empties /output, stages the case's files at /input (with inputs.json)
and calls `POST /invoke` with no body; only 201 is success. At the end it sends SIGTERM
to the process group, and SIGKILL 5 s later.

Here: /health answers 503 while the model loads (in the background, so that the server
answers at once) and 200 once it is ready; if loading fails, the error goes to stderr and
the server stops with status 1. /invoke runs `stoic_ct.job.run_job` on the folders as they
are at that moment (a symbolic link /input is resolved anew for each case): 201 once both
outputs are written; 422 for an input the job refuses, 500 for a model file or a bug,
each with its one line on stderr and nothing written; 409 while another job runs; 503
while loading. A failed case leaves the server healthy for the next. Our own log lines go
to stdout (warnings and errors to stderr), uvicorn's to stdout.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from stoic_ct.errors import InputError, StoicError
from stoic_ct.inference.prediction import System
from stoic_ct.io.orientation import Orientation
from stoic_ct.job import run_job
from stoic_ct.logs import DATE_FORMAT, LOG_FORMAT

logger = logging.getLogger(__name__)

PORT = 4743  # the platform's; its shim keeps 8080 for itself
HOST = "0.0.0.0"  # as the platform's template: the shim calls it from inside the container
# After SIGTERM, how long a running request may go on before uvicorn stops waiting (the
# platform sends SIGKILL 5 s after SIGTERM).
GRACEFUL_SECONDS = 2


@dataclass(frozen=True)
class JobFolders:
    """Where each job reads and writes, and how it reads the scan."""

    input_dir: Path
    output_dir: Path
    orientation: Orientation = "canonical"


class InvokeService:
    """The model, loaded once in the background, and the jobs it runs one at a time."""

    def __init__(self, load: Callable[[], System], folders: JobFolders) -> None:
        self._load, self.folders = load, folders
        self.model: System | None = None
        self.failure: str | None = None
        self.jobs = 0
        self._busy = threading.Lock()
        self.loaded = threading.Event()

    def start_loading(self, on_failure: Callable[[], None] = lambda: None) -> threading.Thread:
        """Load the model in a daemon thread; `on_failure` runs after a failed load."""

        def load() -> None:
            started = time.perf_counter()
            try:
                self.model = self._load()
            except StoicError as error:
                self.failure = str(error)
            except Exception as error:
                logger.exception("loading the model failed")
                self.failure = f"loading the model failed: {error!r}"
            if self.failure is not None:
                logger.error("%s", self.failure)
                self.loaded.set()
                on_failure()
                return
            logger.info("model loaded in %.1f s: ready for jobs", time.perf_counter() - started)
            self.loaded.set()

        thread = threading.Thread(target=load, name="load-model", daemon=True)
        thread.start()
        return thread

    @property
    def running(self) -> bool:
        """A job is running now."""
        return self._busy.locked()

    def health(self) -> tuple[int, dict[str, Any]]:
        """200 when the model is ready, 503 while it loads, 500 when loading failed."""
        if self.model is not None:
            return 200, {"status": "ready", "jobs": self.jobs}
        if self.failure is not None:
            return 500, {"status": "failed", "error": self.failure}
        return 503, {"status": "loading"}

    def invoke(self) -> tuple[int, dict[str, Any]]:
        """Run one job on the folders; (HTTP status, body)."""
        if self.model is None:
            return self.health()
        if not self._busy.acquire(blocking=False):
            return 409, {"status": "busy", "error": "a job is running; one at a time"}
        try:
            number = self.jobs + 1
            started = time.perf_counter()
            logger.info("job %d: %s -> %s", number, self.folders.input_dir, self.folders.output_dir)
            try:
                p = run_job(
                    self.model,
                    self.folders.input_dir,
                    self.folders.output_dir,
                    self.folders.orientation,
                )
            except StoicError as error:
                logger.error("%s", error)
                return (422 if isinstance(error, InputError) else 500), {"error": str(error)}
            except Exception as error:
                logger.exception("job %d failed", number)
                return 500, {"error": f"job {number} failed: {error!r}"}
            finally:
                self.jobs = number
            seconds = time.perf_counter() - started
            logger.info("job %d done in %.1f s", number, seconds)
            return 201, {"covid": p.covid, "severe": p.severe, "seconds": round(seconds, 3)}
        finally:
            self._busy.release()


def create_app(service: InvokeService) -> FastAPI:
    """The two routes the platform's shim calls."""
    app = FastAPI(title="STOIC2021 COVID-19 CT", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health() -> JSONResponse:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.post("/invoke")
    def invoke() -> JSONResponse:
        status, body = service.invoke()
        return JSONResponse(body, status_code=status)

    return app


def uvicorn_logging() -> dict[str, Any]:
    """uvicorn's loggers, every line to stdout in this package's format."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": {"format": LOG_FORMAT, "datefmt": DATE_FORMAT}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "line",
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {
            name: {"handlers": ["stdout"], "level": "INFO", "propagate": False}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def serve(service: InvokeService, host: str = HOST, port: int = PORT) -> int:
    """Serve until the model fails to load (then 1) or a SIGTERM or SIGINT arrives (0).

    On a signal uvicorn stops taking requests, waits GRACEFUL_SECONDS for one that is
    running, then raises the signal again, so that the process ends as the signal ends it.
    As a container's first process (PID 1) the kernel ignores that second signal: a job
    still running then is abandoned here (its outputs are not written), so that the
    process stops within the platform's grace rather than when the job ends.
    """
    config = uvicorn.Config(
        create_app(service),
        host=host,
        port=port,
        log_config=uvicorn_logging(),
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )
    server = uvicorn.Server(config)

    def stop() -> None:
        server.should_exit = True

    service.start_loading(on_failure=stop)
    server.run()
    status = 1 if service.failure is not None else 0
    if service.running:
        logger.warning("stopped during job %d: its outputs are not written", service.jobs + 1)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # the job's thread would otherwise keep the interpreter alive
    return status
