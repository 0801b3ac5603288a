"""Units claimed in a shared folder: one holder at a time, stale claims taken over, done
marks per key, and processes racing over the same units doing each once."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stoic_ct.claims import Board, chunks, wait_until, work_through


def test_a_unit_is_held_by_one_claim_and_done_for_its_key(tmp_path: Path) -> None:
    board = Board(tmp_path, key="settings-a")
    lease = board.claim("fold-1")
    assert lease is not None
    assert board.claim("fold-1") is None  # this process holds it: alive
    assert board.holder("fold-1")["pid"] == os.getpid()  # type: ignore[index]
    with lease:
        lease.finish(epochs=3)
    assert board.done("fold-1") and board.pending(["fold-1", "fold-2"]) == ["fold-2"]
    assert board.claim("fold-1") is None  # never done twice
    assert not list(tmp_path.glob("*.claim"))
    # Done for other settings only: the unit is pending again for these.
    assert not Board(tmp_path, key="settings-b").done("fold-1")


def test_a_claim_released_by_an_error_is_taken_at_once(tmp_path: Path) -> None:
    board = Board(tmp_path, key="k")
    lease = board.claim("fold-1")
    assert lease is not None
    with pytest.raises(ValueError, match="the fold failed"), lease:
        raise ValueError("the fold failed")
    assert not board.done("fold-1")
    again = board.claim("fold-1")
    assert again is not None and again.path.name == "fold-1.1.claim"


def test_the_claim_of_a_process_that_died_is_taken_over_at_once(tmp_path: Path) -> None:
    # A process claims the unit and dies without a word (as SIGKILL leaves it).
    program = (
        "import os, sys; from pathlib import Path; from stoic_ct.claims import Board; "
        "assert Board(Path(sys.argv[1]), 'k').claim('fold-1') is not None; os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", program, str(tmp_path)], check=True)
    assert (tmp_path / "fold-1.0.claim").exists()
    lease = Board(tmp_path, key="k").claim("fold-1")
    assert lease is not None and lease.path.name == "fold-1.1.claim"


def test_a_claim_from_another_machine_is_stale_after_its_lease(tmp_path: Path) -> None:
    claim = tmp_path / "fold-1.0.claim"
    claim.write_text(json.dumps({"host": "node-7", "pid": 1, "pid_namespace": 1}))
    board = Board(tmp_path, key="k", lease_s=60)
    assert board.claim("fold-1") is None  # touched just now: its holder may be working
    old = time.time() - 61
    os.utime(claim, (old, old))
    lease = board.claim("fold-1")
    assert lease is not None and lease.path.name == "fold-1.1.claim"


def test_a_held_claim_is_kept_alive_by_its_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("stoic_ct.claims.HEARTBEAT_S", 0.05)
    board = Board(tmp_path, key="k", lease_s=0.4)
    lease = board.claim("fold-1")
    assert lease is not None
    old = time.time() - 100
    os.utime(lease.path, (old, old))
    with lease:
        time.sleep(0.3)
        assert time.time() - lease.path.stat().st_mtime < 0.2


def _work_through_units(folder: str, log: str) -> int:
    units = [(Board(Path(folder), "k"), f"unit-{i}") for i in range(12)]

    def work(i: int) -> None:
        time.sleep(0.02)
        with Path(log).open("a") as f:
            f.write(f"{i} {os.getpid()}\n")

    return work_through(units, work, wait=True, first=os.getpid())


def test_processes_racing_over_the_units_do_each_exactly_once(tmp_path: Path) -> None:
    log = tmp_path / "done.txt"
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        did = pool.starmap(_work_through_units, [(str(tmp_path / "claims"), str(log))] * 3)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(unit) for unit, _ in lines) == list(range(12))
    assert sum(did) == 12


def test_waiting_and_chunks() -> None:
    answers = iter([None, None, 3])
    assert wait_until(lambda: next(answers), "the third answer", poll_s=0.01) == 3
    assert chunks(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert chunks(0, 2) == []
