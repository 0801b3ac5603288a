"""The model options every command that runs a model takes: process.py, train.py and the
`predict`, `serve` and `extract-features` commands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stoic_ct.inference.precision import PRECISIONS, ModelSettings, resolve_device
from stoic_ct.io.orientation import ORIENTATIONS
from stoic_ct.weights.model_files import ENCODER_ALIASES, ENCODER_KINDS, SYSTEMS

logger = logging.getLogger(__name__)


def encoder_name(value: str) -> str:
    """--encoder's value, with an old name turned into the new one and a deprecation notice."""
    new = ENCODER_ALIASES.get(value)
    if new is None:
        return value
    logger.warning(
        "--encoder %s is deprecated and will be removed in the next release: it is now "
        "called --encoder %s (the frozen 3D ConvNeXt under logistic heads; the fine-tuned "
        "one is --system convnext3d)",
        value,
        new,
    )
    return new


class DeprecatedOption(argparse.Action):
    """An option's old name, kept for one release: stores into the new option's `dest`
    with a deprecation notice, and is left out of --help."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        logger.warning(
            "%s is deprecated and will be removed in the next release: it is now called %s",
            option_string,
            self.new,
        )
        setattr(namespace, self.dest, values)


def add_system_argument(
    parser: argparse.ArgumentParser, help: str, old: str | None = "--model", **kwargs: Any
) -> None:
    """--system, one of SYSTEMS, and its old name `old` (deprecated) where there was one."""
    parser.add_argument("--system", choices=SYSTEMS, help=help, **kwargs)
    if old is not None:
        parser.add_argument(
            old, dest="system", choices=SYSTEMS, action=DeprecatedOption, new="--system"
        )


def add_model_arguments(
    parser: argparse.ArgumentParser, device: bool = True, system: bool = False
) -> None:
    """--model-dir, --precision, --device (unless `device` is False: train.py has
    --devices), --encoder and --orientation; with `system`, --system too."""
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="folder with the model files (default: /opt/ml/model when it holds them, "
        "else the repository's model/)",
    )
    if system:
        add_system_argument(
            parser,
            default=None,
            help="the system to run instead of the one the model folder holds (its "
            "system.json; balaitous, the published model, without one): balaitous, "
            "convnext3d (the fine-tuned 3D ConvNeXt fold ensembles) or ensemble (both, "
            "averaged with the weights of ensemble.json)",
        )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="exact",
        help="exact: the published numbers (default); fast: float16 on a GPU, on a CPU "
        "bfloat16 where it has AMX, int8 elsewhere (within 0.02 of exact on the benchmark); "
        "int8, bfloat16: one of the CPU's fast modes, whatever the CPU",
    )
    if device:
        parser.add_argument(
            "--device",
            choices=("auto", "cpu", "cuda"),
            default="auto",
            help="where to run the networks (default: auto, a GPU when there is one)",
        )
    parser.add_argument(
        "--encoder",
        type=encoder_name,
        choices=ENCODER_KINDS,
        default=None,
        help="the frozen encoders under the logistic heads (default: the model folder's "
        "choice, in its system.json; vit without one). vit: the published Balaitous "
        "ViTs; convnext3d-frozen: the 3D ConvNeXt of convnext3d.pth with the heads "
        "of convnext3d_heads.npz (formerly 'convnext3d', still accepted for one release)",
    )
    parser.add_argument(
        "--orientation",
        choices=ORIENTATIONS,
        default="canonical",
        help="canonical: reorient each scan to LPS, as STOIC stores scans (default; exact, "
        "no interpolation); as-stored: feed the voxels in the file's order, as the "
        "published package does",
    )


def model_settings(args: argparse.Namespace) -> ModelSettings:
    """The ModelSettings that add_model_arguments' options (and --batch-size, where a
    command has it) ask for.

    Raises:
        StoicError: when --device cuda is asked for without a GPU, or --batch-size < 1.
    """
    return ModelSettings(
        resolve_device(args.device),
        args.precision,
        args.encoder,
        getattr(args, "batch_size", None),
    )


def add_rank_arguments(parser: argparse.ArgumentParser) -> None:
    """--devices and --rank-timeout, of the commands that train on several ranks."""
    from stoic_ct.distributed import RANK_TIMEOUT_S

    parser.add_argument(
        "--devices",
        "--device",
        dest="devices",
        default="auto",
        metavar="DEVICES",
        help="where to train: auto (every CUDA GPU, one process each, else the CPU; the "
        "default), cpu, cuda, or a comma list such as cuda:0,cuda:1 (one process per "
        "device, started with torch.distributed's launcher). Under torchrun, each rank "
        "takes the GPU of its LOCAL_RANK (or the LOCAL_RANK-th device of the list)",
    )
    parser.add_argument(
        "--rank-timeout",
        type=float,
        default=RANK_TIMEOUT_S,
        metavar="SECONDS",
        help="how long a rank waits for another in a collective before the run fails "
        f"(default {RANK_TIMEOUT_S:g})",
    )


def own_command(args: argparse.Namespace) -> list[str]:
    """The command line that runs this command again (`launch` starts it once per device):
    the interpreter, `-m stoic_ct` and the arguments the command was given."""
    return [sys.executable, "-m", "stoic_ct", *args.argv]


def add_shard_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """--shard I/N, its default taken from the environment (`resolve_shard`)."""
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help=f"only the I-th of N interleaved shards of the {what} (1-based). Default: from "
        "torchrun's RANK/WORLD_SIZE, a Slurm job array's SLURM_ARRAY_TASK_ID/"
        "SLURM_ARRAY_TASK_COUNT, or a Kubernetes indexed Job's JOB_COMPLETION_INDEX with "
        "WORLD_SIZE, else 1/1 (all)",
    )


def resolve_shard(text: str | None) -> tuple[int, int]:
    """--shard's (index, count): as given, else from the environment (logged), else (1, 1).

    Raises:
        StoicError: for a malformed --shard or shard variables.
    """
    from stoic_ct.distributed import environment_shard
    from stoic_ct.errors import StoicError
    from stoic_ct.io.cohort import parse_shard

    if text is not None:
        try:
            return parse_shard(text)
        except ValueError as error:
            raise StoicError(f"--shard: {error}") from None
    found = environment_shard()
    if found is None:
        return 1, 1
    index, count, where = found
    logger.info("shard %d/%d, from %s", index, count, where)
    return index, count
