"""Small programs that torchrun starts in the distributed tests.

python test/rank_programs.py silent TIMEOUT   rank 1 stops answering; rank 0 waits for it
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from stoic_ct.distributed import Ranks, broadcast, run_ranks
from stoic_ct.errors import StoicError
from stoic_ct.logs import configure_logging

logger = logging.getLogger("rank_programs")


def silent(ranks: Ranks, device: torch.device) -> int:
    if ranks.rank == 1:
        time.sleep(600)  # alive, but never at the collective
    broadcast("a value every rank must receive")
    return 0


def main() -> int:
    configure_logging()
    try:
        return run_ranks([], "auto", float(sys.argv[2]), silent)
    except StoicError as error:
        logger.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
