"""Runs on several processes, GPUs and machines, with torch.distributed.

A launcher starts one process (a *rank*) per device and tells each, in its environment,
who it is: `torchrun` (on one machine, or `--nnodes=M` over several), `srun torchrun`
under Slurm, or `--devices cuda:0,cuda:1`, which starts the same workers through
torch's own launcher (`launch`). `launched_ranks` reads RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE; `rank_device` pins each rank to its own GPU; `joined` opens the process
group (nccl on CUDA, gloo on the CPU) with a timeout, so that a rank that stops answering
fails the others in seconds instead of hanging them.

Jobs that need no communication (feature extraction, `predict`) are split by
`environment_shard` instead: torchrun's RANK/WORLD_SIZE, a Slurm job array's
SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, or a Kubernetes indexed Job's
JOB_COMPLETION_INDEX with WORLD_SIZE.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from stoic_ct.claims import Board, chunks, work_through
from stoic_ct.errors import StoicError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a collective waits for a rank before the run fails, seconds.
RANK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: rank `rank` of `size`, `local_rank` of `local_size`
    on its machine. The default is a run of one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes what the run writes once."""
        return self.rank == 0

    @property
    def alone(self) -> bool:
        return self.size == 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} (local rank {self.local_rank})"


ONE_PROCESS = Ranks()


def launched_ranks(environ: Mapping[str, str] = os.environ) -> Ranks:
    """The ranks a launcher (torchrun, `launch`) set in the environment; one process without.

    Raises:
        StoicError: when the variables are there but inconsistent.
    """
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return Ranks()
    try:
        ranks = Ranks(
            int(environ["RANK"]),
            int(environ["WORLD_SIZE"]),
            int(environ.get("LOCAL_RANK", "0")),
            int(environ.get("LOCAL_WORLD_SIZE", "1")),
        )
    except ValueError:
        raise StoicError(
            f"RANK={environ['RANK']!r} and WORLD_SIZE={environ['WORLD_SIZE']!r} are not numbers"
        ) from None
    if not 0 <= ranks.rank < ranks.size or not 0 <= ranks.local_rank < ranks.local_size:
        raise StoicError(
            f"RANK={ranks.rank}, WORLD_SIZE={ranks.size}, LOCAL_RANK={ranks.local_rank} "
            f"and LOCAL_WORLD_SIZE={ranks.local_size} do not fit together"
        )
    return ranks


def parse_devices(spec: str) -> list[torch.device]:
    """ "auto" (every CUDA GPU, else the CPU) or a comma list such as "cuda:0,cuda:1".

    Raises:
        StoicError: when a device is malformed or a GPU is asked for that is not there.
    """
    if spec == "auto":
        count = torch.cuda.device_count()
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    devices = []
    for name in (part.strip() for part in spec.split(",")):
        try:
            device = torch.device(name)
        except RuntimeError:
            raise StoicError(f"--devices: {name!r} is not a device (cpu, cuda, cuda:1)") from None
        if device.type not in ("cpu", "cuda"):
            raise StoicError(f"--devices: {name!r} is neither cpu nor cuda")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise StoicError(
                f"--devices: {name} was asked for, but PyTorch sees "
                f"{torch.cuda.device_count()} CUDA GPU(s)"
            )
        devices.append(device)
    if not devices:
        raise StoicError("--devices names no device")
    return devices


def rank_device(ranks: Ranks, spec: str = "auto") -> torch.device:
    """The device of this rank: the `local_rank`-th of `--devices` when a list is given;
    with "auto", GPU `local_rank` when there are GPUs (one per rank), else the CPU.

    Raises:
        StoicError: when the machine has fewer devices than ranks on it.
    """
    if spec == "auto" and ranks.alone:
        return parse_devices("auto")[0]
    if spec == "auto":
        count = torch.cuda.device_count()
        if count == 0:
            return torch.device("cpu")
        if count < ranks.local_size:
            raise StoicError(
                f"{ranks.local_size} ranks on this machine but {count} GPU(s): start one "
                "rank per GPU (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", ranks.local_rank)
    devices = parse_devices(spec)
    if ranks.alone:
        return devices[0]
    if len(devices) < ranks.local_size:
        raise StoicError(
            f"--devices {spec} names {len(devices)} device(s) for {ranks.local_size} ranks "
            "on this machine"
        )
    return devices[ranks.local_rank]


def environment_shard(environ: Mapping[str, str] = os.environ) -> tuple[int, int, str] | None:
    """The (1-based index, count) of this process's shard, and the variables it came from:
    torchrun's RANK/WORLD_SIZE, Slurm's SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT
    (counted from SLURM_ARRAY_TASK_MIN in steps of SLURM_ARRAY_TASK_STEP, so that
    --array=1-8 and --array=0-7 both give shards 1..8), or a Kubernetes indexed Job's
    JOB_COMPLETION_INDEX with WORLD_SIZE. None when none is set.

    Raises:
        StoicError: when the variables do not describe a shard.
    """

    def number(name: str, default: str | None = None) -> int:
        text = environ.get(name, default)
        try:
            return int(str(text))
        except ValueError:
            raise StoicError(f"{name}={text!r} is not a number") from None

    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        task, count = number("SLURM_ARRAY_TASK_ID"), number("SLURM_ARRAY_TASK_COUNT")
        first, step = number("SLURM_ARRAY_TASK_MIN", "0"), number("SLURM_ARRAY_TASK_STEP", "1")
        index = (task - first) // max(step, 1)
        where = (
            f"SLURM_ARRAY_TASK_ID={task} (from {first} in steps of {step}) and "
            f"SLURM_ARRAY_TASK_COUNT={count}"
        )
    elif "WORLD_SIZE" in environ and ("RANK" in environ or "JOB_COMPLETION_INDEX" in environ):
        name = "RANK" if "RANK" in environ else "JOB_COMPLETION_INDEX"
        index, count = number(name), number("WORLD_SIZE")
        where = f"{name}={index} and WORLD_SIZE={count}"
    else:
        return None
    if not 0 <= index < count:
        raise StoicError(f"{where} do not name a shard: the index must lie in [0, count)")
    return index + 1, count, where


def backend(device: torch.device) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def joined(ranks: Ranks, device: torch.device, timeout_s: float = RANK_TIMEOUT_S) -> Iterator[None]:
    """The default process group for the block (none for a run of one process).

    The launcher's rendezvous (MASTER_ADDR, MASTER_PORT) is used; every collective fails
    after `timeout_s` without an answer, and on CUDA errors are raised rather than hung on.
    """
    if ranks.alone:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(
        backend(device),
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    logger.info("%s on %s (%s)", ranks.describe(), device, backend(device))
    try:
        yield
    finally:
        dist.destroy_process_group()


def broadcast(value: T, group: Any = None, source: int = 0) -> T:
    """`value` of rank `source` (a global rank) on every rank of `group`; unchanged alone."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source, group=group)
    return box[0]


def gather(value: T, group: Any = None) -> list[T]:
    """Every rank's `value`, in the group's rank order; [value] alone."""
    if not dist.is_initialized():
        return [value]
    size = dist.get_world_size(group)
    values: list[Any] = [None] * size
    dist.all_gather_object(values, value, group=group)
    return values


def on_leader(action: Callable[[], object], ranks: Ranks) -> None:
    """`action()` on the leader only; a StoicError it raises is raised on every rank."""
    error: StoicError | None = None
    if ranks.leader:
        try:
            action()
        except StoicError as raised:
            error = raised
    error = broadcast(error)
    if error is not None:
        raise error


def interleave(parts: Sequence[Sequence[T]]) -> list[T]:
    """The inverse of taking items[j::k] for j in range(k): the items in their order."""
    total = sum(len(p) for p in parts)
    return [parts[i % len(parts)][i // len(parts)] for i in range(total)]


# What gloo's and NCCL's errors say when a peer died or stopped answering.
_LOST = re.compile(r"gloo|NCCL|Timed out|timeout|Connection (closed|reset|refused)|peer")


def lost_rank(error: BaseException) -> str:
    """One line for a collective that failed: a rank died or stopped answering."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"another rank of the run was lost or stopped answering ({first[:300]})"


def run_ranks(
    command: Sequence[str],
    devices: str,
    timeout_s: float,
    body: Callable[[Ranks, torch.device], int],
) -> int:
    """An entry point's work on every rank: `body(ranks, device)` inside the process group.

    Started by a launcher (torchrun), this process is one rank of it. Started alone with
    `devices` naming several devices, `command` (this entry point's own command line) is
    started once per device with `launch`, and this process only waits for them.

    Raises:
        StoicError: for unusable devices, and with one line when a collective fails
            because another rank was lost.
    """
    ranks = launched_ranks()
    if ranks.alone and len(listed := parse_devices(devices)) > 1:
        return launch(command, len(listed))
    device = rank_device(ranks, devices)
    try:
        with joined(ranks, device, timeout_s):
            return body(ranks, device)
    except RuntimeError as error:  # DistError is one; gloo raises plain RuntimeErrors
        if not isinstance(error, dist.DistError) and not _LOST.search(str(error)):
            raise
        raise StoicError(f"{ranks.describe()}: {lost_rank(error)}") from None


def launch(command: Sequence[str], processes: int) -> int:
    """Run `command` (a Python interpreter and its arguments) `processes` times on this
    machine, as `torchrun --standalone --nproc_per_node=PROCESSES` does, with torch's own
    launcher; 0 when every process succeeded, 1 otherwise (the failure is logged).

    One process failing stops the others.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    logger.info("starting %d processes: %s", processes, " ".join(command))
    # CPU threads per process: the machine's cores shared among them, unless set already
    # (torchrun would set 1 and say so). The processes take this environment when started.
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = threads or str(max(1, (os.cpu_count() or 1) // processes))
    try:
        elastic_launch(config, command[0])(*command[1:])
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        logger.error(
            "rank %d of %d failed (exit status %s); the others were stopped",
            rank,
            processes,
            failure.exitcode,
        )
        return 1
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
    return 0


@dataclass(frozen=True)
class Team:
    """The ranks that train one unit together with DistributedDataParallel: this one is
    `rank` of `size` in `group`, whose first member is global rank `first`."""

    group: Any
    rank: int
    size: int
    first: int

    @property
    def writes(self) -> bool:
        """The team's first rank writes its checkpoints."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's interleaved share of `items` (no item twice, none padded in)."""
        return list(items[self.rank :: self.size])

    def gather(self, value: T) -> list[T]:
        """Every team member's `value`, in team order."""
        return gather(value, self.group)

    def total(self, value: float) -> float:
        """The sum of `value` over the team."""
        tensor = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend(self.group) == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, group=self.group)
        return float(tensor.item())


def teams(size: int, units: int, largest: int) -> list[list[int]]:
    """The ranks 0..size-1 dealt to `units` teams of at most `largest` ranks each: rank r
    joins team r mod units. Ranks left over (when size > units x largest) are in none."""
    return [
        [r for r in range(size) if r % units == t and r < units * largest] for t in range(units)
    ]


def first_team(ranks: Ranks, largest: int) -> Team | None:
    """The first `largest` ranks as one team (every rank must call this); None on a rank
    outside it, and alone."""
    if ranks.alone:
        return None
    members = list(range(min(ranks.size, largest)))
    group = dist.new_group(members)
    if ranks.rank not in members:
        return None
    return Team(group, ranks.rank, len(members), 0)


def share_units(
    units: Sequence[tuple[Board, str]],
    work: Callable[[int, Team | None], None],
    ranks: Ranks,
    *,
    largest_team: int,
) -> None:
    """Do the pending units among the ranks, each unit once: `work(i, team)` does units[i].

    With at least as many pending units as ranks (or one rank), each rank claims units
    one after the other and does them alone (team None). With fewer, the ranks form one
    team per unit (at most `largest_team` ranks each) that does it together. Then every
    rank takes what is left (units whose claim went stale); the leader waits until every
    unit is done, so that what follows sees them all.
    """
    pending = broadcast([i for i, (board, unit) in enumerate(units) if not board.done(unit)])
    if not ranks.alone and 0 < len(pending) < ranks.size:
        dealt = teams(ranks.size, len(pending), largest_team)
        groups = [dist.new_group(members) for members in dealt]  # every rank, in one order
        for i, members, group in zip(pending, dealt, groups, strict=True):
            if ranks.rank not in members:
                continue
            team = Team(group, members.index(ranks.rank), len(members), members[0])
            board, unit = units[i]
            lease = board.claim(unit) if team.writes else None
            if not broadcast(lease is not None, group, source=team.first):
                continue
            logger.info("%s: %d ranks together (ranks %s)", unit, len(members), members)
            with lease if lease is not None else nullcontext():
                work(i, team)
                if lease is not None:
                    lease.finish()
    work_through(units, lambda i: work(i, None), wait=ranks.leader, first=ranks.rank)


CHUNK = 16  # items per claimed chunk of preparation


def chunk_names(ids: Sequence[str], size: int = CHUNK) -> list[tuple[str, range]]:
    """`ids` cut into consecutive chunks of `size`, each named by its position and a
    digest of its ids (so that a changed cohort makes new chunks)."""
    named = []
    for k, rows in enumerate(chunks(len(ids), size)):
        digest = hashlib.sha256(" ".join(ids[i] for i in rows).encode()).hexdigest()[:8]
        named.append((f"chunk-{k:05d}-{digest}", rows))
    return named


def in_chunks(
    ids: Sequence[str],
    folder: Path,
    key: str,
    prepare: Callable[[str, range], object],
    ranks: Ranks,
) -> None:
    """`prepare(name, rows)` for every chunk of `ids`, each chunk by one rank (claimed
    under FOLDER/claims, done for `key`); returns when every chunk is done. Alone:
    `prepare("all", range(len(ids)))`."""
    if ranks.alone:
        prepare("all", range(len(ids)))
        return
    named = chunk_names(ids)
    board = Board(folder / "claims", key)
    work_through(
        [(board, name) for name, _ in named],
        lambda k: prepare(*named[k]),
        wait=True,
        first=ranks.rank * max(1, len(named) // ranks.size),
    )
