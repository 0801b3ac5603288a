"""Runs on several ranks (torch.distributed, gloo on this CPU): what each rank reads from
its launcher, the shards of job arrays, and whole fine-tuning runs under torchrun: ranks
that share the folds, teams under DDP, two machines, a rank that dies, a rank that hangs."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stoic_ct.cli import main as cli
from stoic_ct.distributed import (
    Ranks,
    environment_shard,
    interleave,
    launched_ranks,
    parse_devices,
    rank_device,
    teams,
)
from stoic_ct.errors import StoicError
from stoic_ct.phantom import write_phantom_cohort
from timings import Timings

REPOSITORY = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# A micro ConvNeXt on 32^3 cubes of 10 phantoms: a fold takes about a second.
TINY = [
    *("--size", "micro", "--input-size", "32", "--batch-size", "2"),
    *("--augment", "none", "--drop-path", "0", "--seed", "3"),
]


def test_ranks_are_read_from_the_launchers_environment() -> None:
    assert launched_ranks({}) == Ranks()
    ranks = launched_ranks(
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    )
    assert (ranks.rank, ranks.size, ranks.local_rank, ranks.local_size) == (5, 8, 1, 4)
    assert not ranks.leader and not ranks.alone
    with pytest.raises(StoicError, match="do not fit together"):
        launched_ranks({"RANK": "8", "WORLD_SIZE": "8"})


def test_shards_come_from_torchrun_a_slurm_array_or_an_indexed_job() -> None:
    assert environment_shard({}) is None
    assert environment_shard({"RANK": "0", "WORLD_SIZE": "4"}) == (
        1,
        4,
        "RANK=0 and WORLD_SIZE=4",
    )
    # --array=1-8: the tasks 1..8 are shards 1..8; --array=0-7 gives the same shards.
    for first in (0, 1):
        index, count, where = environment_shard(  # type: ignore[misc]
            {
                "SLURM_ARRAY_TASK_ID": str(first + 2),
                "SLURM_ARRAY_TASK_COUNT": "8",
                "SLURM_ARRAY_TASK_MIN": str(first),
            }
        )
        assert (index, count) == (3, 8) and "SLURM_ARRAY_TASK_ID" in where
    stepped = {
        "SLURM_ARRAY_TASK_ID": "5",
        "SLURM_ARRAY_TASK_COUNT": "3",
        "SLURM_ARRAY_TASK_MIN": "1",
        "SLURM_ARRAY_TASK_STEP": "2",
    }
    assert environment_shard(stepped)[:2] == (3, 3)  # type: ignore[index]
    job = {"JOB_COMPLETION_INDEX": "7", "WORLD_SIZE": "8"}
    assert environment_shard(job)[:2] == (8, 8)  # type: ignore[index]
    with pytest.raises(StoicError, match="do not name a shard"):
        environment_shard({"JOB_COMPLETION_INDEX": "8", "WORLD_SIZE": "8"})
    with pytest.raises(StoicError, match="SLURM_ARRAY_TASK_COUNT='many' is not a number"):
        environment_shard({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "many"})


def test_devices_are_read_from_a_comma_list() -> None:
    assert parse_devices("cpu, cpu") == [CPU, CPU]
    if not torch.cuda.is_available():
        assert parse_devices("auto") == [CPU]
    with pytest.raises(StoicError, match="cuda:99 was asked for, but PyTorch sees"):
        parse_devices("cuda:99")
    with pytest.raises(StoicError, match="'gpu' is not a device"):
        parse_devices("gpu")


def test_each_rank_takes_the_device_of_its_local_rank() -> None:
    second = Ranks(rank=3, size=4, local_rank=1, local_size=2)
    assert rank_device(second, "cpu,cpu") == CPU
    with pytest.raises(StoicError, match="names 1 device"):
        rank_device(second, "cpu")
    if torch.cuda.device_count() == 0:
        assert rank_device(second, "auto") == CPU


def test_ranks_are_dealt_to_teams_and_shares_interleave_back() -> None:
    assert teams(8, 3, largest=4) == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert teams(8, 2, largest=2) == [[0, 2], [1, 3]]  # ranks 4..7 beyond the batch: idle
    items = list(range(11))
    parts = [items[j::3] for j in range(3)]
    assert interleave(parts) == items


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_cohort(tmp_path_factory.mktemp("cohort"), 10, seed=1)


def _finetune(cohort: Path, out: Path, *options: str) -> list[str]:
    return ["finetune", str(cohort), "--out", str(out), *TINY, *options]


def _oof(folder: Path) -> np.ndarray:
    rows = list(csv.DictReader((folder / "oof.csv").open()))
    return np.array([[float(r["p_negative"]), float(r["p_positive"])] for r in rows])


@pytest.fixture(scope="module")
def one_process(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: four folds of six epochs in this process."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert cli([*_finetune(cohort, out, "--folds", "4", "--epochs", "6", "--devices", "cpu")]) == 0
    return out


def _environment(threads: int = 1) -> dict[str, str]:
    """Where torchrun's processes find the package; CPU threads per process."""
    return os.environ | {"PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": str(threads)}


def test_a_team_of_two_ranks_at_batch_one_steps_as_one_process_at_batch_two(
    cohort: Path, tmp_path: Path
) -> None:
    """Four ranks, two folds: each fold is trained by a team of two under DDP, each rank
    taking one patient of every batch of two; after the three steps of an epoch the weights
    are those of one process at batch two, within 1e-5.

    All but one weight in ten thousand: AdamW's first step is lr g / (|g| + eps), so where
    a gradient is of the order of eps (1e-8) the rounding of a sum taken in another order
    moves the step by up to the learning rate (5e-5), which bounds every weight."""
    one, four = tmp_path / "one", tmp_path / "four"
    common = ("--folds", "2", "--epochs", "1")
    assert cli(_finetune(cohort, one, *common, "--devices", "cpu")) == 0
    assert cli(_finetune(cohort, four, *common, "--devices", "cpu,cpu,cpu,cpu")) == 0
    for fold in (1, 2):
        a, b = (
            torch.load(run / f"fold-{fold}" / "last.pt", weights_only=True)["trainer"]
            for run in (one, four)
        )
        differences = torch.cat(
            [(b["model"][n] - a["model"][n]).abs().flatten() for n in a["model"]]
        )
        assert float(differences.max()) < 5e-5
        assert int((differences > 1e-5).sum()) <= differences.numel() // 10_000
        assert float(differences.median()) < 1e-7
    np.testing.assert_allclose(_oof(four), _oof(one), atol=1e-5)
    assert json.loads((four / "finetune.json").read_text())["devices"] == ["cpu"] * 4


def test_two_ranks_share_the_folds_each_once_as_one_process_would(
    cohort: Path, one_process: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    command = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "stoic_ct"]
    command += _finetune(cohort, out, "--folds", "4", "--epochs", "6")
    subprocess.run(command, check=True, cwd=REPOSITORY, env=_environment(), timeout=300)
    done = [json.loads((out / "claims" / f"fold-{k}.done").read_text()) for k in range(1, 5)]
    assert {d["rank"] for d in done} <= {"0", "1"}
    assert not list((out / "claims").glob("*.claim"))
    np.testing.assert_allclose(_oof(out), _oof(one_process), atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_machines_meet_at_a_rendezvous_and_finish_the_run(
    cohort: Path, one_process: Path, tmp_path: Path
) -> None:
    """Two torchrun agents, as on two nodes, rendezvous over c10d on 127.0.0.1."""
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{_free_port()}"
    command = [
        *TORCHRUN,
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        "--rdzv_id=two-machines",
        "-m",
        "stoic_ct",
        *_finetune(cohort, out, "--folds", "4", "--epochs", "6"),
    ]
    nodes = [
        subprocess.Popen(
            command,
            cwd=REPOSITORY,
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0].decode() for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "rank 0 of 2" in "".join(outputs) and "rank 1 of 2" in "".join(outputs)
    np.testing.assert_allclose(_oof(out), _oof(one_process), atol=1e-5)


def test_a_rank_killed_mid_fold_stops_the_run_and_a_restart_retrains_nothing_done(
    cohort: Path, one_process: Path, tmp_path: Path, timings: Timings
) -> None:
    out = tmp_path / "run"
    command = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "stoic_ct"]
    command += _finetune(cohort, out, "--folds", "4", "--epochs", "6")
    run = subprocess.Popen(command, cwd=REPOSITORY, env=_environment(), stdout=subprocess.DEVNULL)
    claims = out / "claims"
    deadline = time.monotonic() + 240
    victim = None
    while victim is None and run.poll() is None and time.monotonic() < deadline:
        # Once a fold is done, kill the rank that holds a fold in the middle of training.
        if list(claims.glob("*.done")):
            for claim in claims.glob("*.claim"):
                fold_dir = out / claim.name.split(".")[0]
                if (fold_dir / "last.pt").exists():
                    victim = json.loads(claim.read_text())
                    break
        time.sleep(0.05)
    assert victim is not None, "no fold was caught in the middle of its training"
    killed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    assert run.wait(timeout=60) != 0
    timings.add("torchrun, 2 ranks: a killed rank to the run stopped", time.monotonic() - killed)
    assert time.monotonic() - killed < 30
    finished = {
        p.stem: (out / p.stem / "best.pt").stat().st_mtime_ns for p in claims.glob("*.done")
    }
    assert finished and len(finished) < 4

    subprocess.run(
        [*command, "--resume"], check=True, cwd=REPOSITORY, env=_environment(), timeout=300
    )
    for fold, stamp in finished.items():
        assert (out / fold / "best.pt").stat().st_mtime_ns == stamp, f"{fold} was trained again"
    assert len(list(claims.glob("*.done"))) == 4
    np.testing.assert_allclose(_oof(out), _oof(one_process), atol=1e-5)


def test_a_rank_that_stops_answering_fails_the_run_within_the_timeout(
    timings: Timings,
) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc_per_node=2", "test/rank_programs.py", "silent", "3"],
        cwd=REPOSITORY,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - started
    timings.add("torchrun, 2 ranks: a silent rank to the run failed (3 s timeout)", seconds)
    assert result.returncode != 0
    assert "rank 0 of 2 (local rank 0): another rank of the run was lost or stopped" in (
        result.stderr
    )
    assert "Timed out" in result.stderr
    assert seconds < 60


def _metrics(folder: Path) -> np.ndarray:
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    return np.array([[float(v) for k, v in row.items() if k != "seconds"] for row in rows])


def test_pretraining_on_two_ranks_learns_as_one_process(cohort: Path, tmp_path: Path) -> None:
    """Segmentation, then the multitask on its pseudo-labels (made by the two ranks in
    chunks), each by a team of two at batch two: the same epochs as one process."""
    common = [*TINY, "--epochs", "2"]
    runs = {}
    for devices in ("cpu", "cpu,cpu"):
        out = tmp_path / devices.replace(",", "-")
        segmentation = ["pretrain", str(cohort), "--out", str(out / "seg"), *common]
        assert cli([*segmentation, "--devices", devices]) == 0
        multitask = ["pretrain", str(cohort), "--out", str(out / "multi"), "--mode", "multitask"]
        multitask += ["--pseudo-labels-from", str(out / "seg" / "pretrained.pth"), *common]
        assert cli([*multitask, "--devices", devices]) == 0
        runs[devices] = out
    one, two = runs["cpu"], runs["cpu,cpu"]
    for stage in ("seg", "multi"):
        np.testing.assert_allclose(_metrics(two / stage), _metrics(one / stage), atol=1e-4)
    labels = sorted(p.name for p in (two / "multi" / "pseudo-labels").glob("*.npy"))
    assert len(labels) == 10
    for name in labels:
        a, b = (np.load(run / "multi" / "pseudo-labels" / name) for run in (one, two))
        assert (a != b).mean() < 1e-3, name
