"""Units of work claimed in a shared folder, so that no two processes do one twice.

A run's work is a list of named units (a fold of a task, a chunk of scans). Before
working on a unit, a process claims it by creating FOLDER/<unit>.<generation>.claim with
O_CREAT | O_EXCL, which one process only can do (on local file systems and on NFS v3
and later), and keeps the claim alive by touching it every HEARTBEAT_S seconds while it
works. Done, it writes FOLDER/<unit>.done with the work's key (a digest of its settings):
a unit is done for the settings that made it only, and is never done again.

A claim is stale when its process let go of it (it failed), or is gone: at once when it
ran on this machine in this PID namespace (its PID no longer exists), otherwise when it
has not been touched for `lease_s` seconds. A stale claim is taken over by creating the
next generation's file, which again only one process can; claim files are removed only
once the unit is done, so the newest generation is always the holder. So overlapping
runs on one scratch folder share its units, and a run started again after a crash takes
up what the crashed run left unfinished.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from stoic_ct.atomic import atomic_write_text

logger = logging.getLogger(__name__)

T = TypeVar("T")

LEASE_S = 120.0  # a claim untouched for this long, from another machine, is stale
HEARTBEAT_S = 10.0
POLL_S = 2.0  # how often a process waiting for others' units looks again


def _identity() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": _pid_namespace(),
        "rank": os.environ.get("RANK"),
    }


def _pid_namespace() -> int | None:
    try:
        return Path("/proc/self/ns/pid").stat().st_ino
    except OSError:
        return None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class Board:
    """The claims and done marks of one kind of unit, under `folder`, for work `key`."""

    folder: Path
    key: str
    lease_s: float = LEASE_S

    def done(self, unit: str) -> bool:
        """Whether `unit` was finished with this board's key."""
        path = self.folder / f"{unit}.done"
        try:
            return bool(json.loads(path.read_text(encoding="utf-8")).get("key") == self.key)
        except (OSError, ValueError):
            return False

    def pending(self, units: Sequence[str]) -> list[str]:
        """The units not done yet, in their order."""
        return [unit for unit in units if not self.done(unit)]

    def claim(self, unit: str) -> Lease | None:
        """A lease on `unit`, or None when it is done or a live process holds it."""
        if self.done(unit):
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        generations = self._generations(unit)
        if generations and not self._stale(self._path(unit, generations[-1])):
            return None
        generation = generations[-1] + 1 if generations else 0
        path = self._path(unit, generation)
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(_identity() | {"since": time.time()}, f)
        if generations:
            logger.info("%s: took over the stale claim of generation %d", unit, generations[-1])
        if self.done(unit):  # finished by its holder between our two looks
            self.clear(unit)
            return None
        return Lease(self, unit, path)

    def clear(self, unit: str) -> None:
        """Remove `unit`'s claim files (once it is done)."""
        for generation in self._generations(unit):
            self._path(unit, generation).unlink(missing_ok=True)

    def holder(self, unit: str) -> dict[str, Any] | None:
        """Who holds `unit`'s newest claim (host, pid, rank), if anyone."""
        generations = self._generations(unit)
        if not generations:
            return None
        try:
            info: dict[str, Any] = json.loads(self._path(unit, generations[-1]).read_text())
        except (OSError, ValueError):
            return {}
        return info

    def _path(self, unit: str, generation: int) -> Path:
        return self.folder / f"{unit}.{generation}.claim"

    def _generations(self, unit: str) -> list[int]:
        prefix, numbers = f"{unit}.", []
        for path in self.folder.glob(f"{unit}.*.claim"):
            middle = path.name[len(prefix) : -len(".claim")]
            if middle.isdigit():
                numbers.append(int(middle))
        return sorted(numbers)

    def _stale(self, path: Path) -> bool:
        try:
            touched = path.stat().st_mtime
            info = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return True  # released between our two looks
        except ValueError:
            info = {}  # being written: judged by its age alone
        if info.get("released"):
            return True
        same_process_space = (
            info.get("host") == socket.gethostname()
            and info.get("pid_namespace") == _pid_namespace()
            and isinstance(info.get("pid"), int)
        )
        if same_process_space:
            return _process_gone(info["pid"])
        return time.time() - touched > self.lease_s


class Lease:
    """A held claim: touched in the background while the block runs; `finish` marks the
    unit done; leaving the block unfinished (an error) releases the claim for another
    process."""

    def __init__(self, board: Board, unit: str, path: Path) -> None:
        self.board, self.unit, self.path = board, unit, path
        self.finished = False
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease {unit}", daemon=True)

    def __enter__(self) -> Lease:
        self._beat.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._beat.join()
        if not self.finished and self.path.exists():
            released = _identity() | {"released": time.time()}
            atomic_write_text(self.path, json.dumps(released))

    def finish(self, **details: Any) -> None:
        """Mark the unit done (with `details` for a reader) and release the claim."""
        record = {"key": self.board.key, "finished": time.time(), **_identity(), **details}
        atomic_write_text(self.board.folder / f"{self.unit}.done", json.dumps(record) + "\n")
        self.finished = True
        self.board.clear(self.unit)

    def _heartbeat(self) -> None:
        interval = min(HEARTBEAT_S, self.board.lease_s / 4)
        while not self._stop.wait(interval):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                logger.warning("%s: its claim file was removed by another process", self.unit)
                return
            newest = self.board._generations(self.unit)
            if newest and self.path != self.board._path(self.unit, newest[-1]):
                logger.warning(
                    "%s: another process took the claim over (this one was silent for over "
                    "%.0f s); both may now work on the unit",
                    self.unit,
                    self.board.lease_s,
                )
                return


def work_through(
    units: Sequence[tuple[Board, str]],
    work: Callable[[int], object],
    *,
    wait: bool,
    first: int = 0,
    poll_s: float = POLL_S,
) -> int:
    """Claim and do pending units, one at a time, until none is left to claim; returns
    how many this process did.

    `work(i)` does units[i] (the lease is held around it and the unit marked done after
    it). Units are tried from the `first`-th on, so that ranks start on different ones.
    With `wait`, also wait for the units live processes hold, and take over those whose
    claim goes stale, until every unit is done.
    """
    did, waiting_for = 0, ""
    while True:
        pending = [i for i, (board, unit) in enumerate(units) if not board.done(unit)]
        if not pending:
            return did
        start = first % len(pending)
        for i in pending[start:] + pending[:start]:
            board, unit = units[i]
            lease = board.claim(unit)
            if lease is None:
                continue
            with lease:
                work(i)
                lease.finish()
            logger.info("%s done", unit)
            did += 1
            break
        else:
            if not wait:
                return did
            held = ", ".join(
                f"{unit} ({_describe(board.holder(unit))})"
                for board, unit in (units[i] for i in pending)
            )
            if held != waiting_for:
                logger.info("waiting for the units other processes hold: %s", held)
                waiting_for = held
            time.sleep(poll_s)


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "being claimed"
    rank = f"rank {holder['rank']}, " if holder.get("rank") is not None else ""
    return f"{rank}pid {holder.get('pid')} on {holder.get('host')}"


def wait_until(check: Callable[[], T | None], what: str, poll_s: float = POLL_S) -> T:
    """`check()`'s first value that is not None, asked every `poll_s` seconds."""
    announced = False
    while (value := check()) is None:
        if not announced:
            logger.info("waiting for %s", what)
            announced = True
        time.sleep(poll_s)
    return value


def chunks(count: int, size: int) -> list[range]:
    """range(count) cut into consecutive ranges of `size` (the last one shorter)."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]
