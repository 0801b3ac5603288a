"""Named durations a test measures (the container test's start-up and job times): printed
at the end of the run and written to .cache/test-timings.json (test/conftest.py)."""

from __future__ import annotations

import time

MEASURED: dict[str, str] = {}


class Timings:
    """Named durations in seconds (and other figures), kept in MEASURED as text."""

    def add(self, name: str, seconds: float) -> None:
        MEASURED[name] = f"{seconds:.1f} s"

    def value(self, name: str, value: float) -> None:
        """A figure that is not a time, e.g. a probability to show beside another."""
        MEASURED[name] = f"{value:.8f}"

    def text(self, name: str, text: str) -> None:
        """A figure already written out, with its unit (a memory size, say)."""
        MEASURED[name] = text

    def since(self, name: str, started: float) -> None:
        """`name` took from `started` (time.perf_counter()) until now."""
        self.add(name, time.perf_counter() - started)
