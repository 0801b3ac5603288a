"""STOIC2021 final-phase training: both systems and their ensemble, from a cohort in the
training layout, into one model folder.

    python train.py [--system balaitous|convnext3d|ensemble] [--input /input] [--output /output]
                    [--scratch /scratch] [--model-dir DIR] [--devices auto|cpu|cuda:0,...]
                    [--rank-timeout 60]
                    [--precision exact|fast] [--encoder vit|convnext3d-frozen]
                    [--lung-masks DIR] [--convnext KEY=VALUE ...]
                    [--evaluate] [--folds N] [--repeats N] [--seed N]

Reads INPUT/data/mha/<PatientID>.mha and INPUT/metadata/reference.csv. balaitous: extracts
both encoders' features of every scan and fits the four logistic regressions
(OUTPUT/balaitous.npz, heads.json); convnext3d: fine-tunes the 3D ConvNeXt for COVID-19 and
for severity with the STOIC2021 winner's recipe (OUTPUT/convnext3d_covid.pth,
convnext3d_severe.pth; starting from the model folder's convnext3d.pth when it has one);
ensemble (the default): the two, then the ensemble's weights from their out-of-fold
predictions (OUTPUT/ensemble.json, ensemble-report/). The encoders and the U-Net are copied
from the model folder and OUTPUT/MANIFEST lists every model file: OUTPUT is a complete
model folder for process.py and export.sh. Scans that fail are reported and left out.
Everything slow is cached under SCRATCH: run it again after an interruption and it
resumes.

On several GPUs or machines: `torchrun --nproc_per_node=G [--nnodes=M --rdzv_backend=c10d
--rdzv_endpoint=HOST:PORT] train.py ...` (or --devices cuda:0,cuda:1 on one machine).
The ranks share the scans' features in chunks and the ConvNeXt's (task, fold) units,
each claimed in SCRATCH (which every rank must see) so that none is done twice; where
ranks outnumber the units left, several train one together (DistributedDataParallel).
Rank 0 writes OUTPUT once every unit is done.

In the container: `docker run --entrypoint python IMAGE train.py`, with the cohort at
/input, the model folder at /opt/ml/model, a writable /output and /scratch. Progress goes
to stdout; stderr carries only warnings and errors. Then `./export.sh --model-dir OUTPUT`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoic_ct.errors import StoicError
from stoic_ct.head_training.defaults import OUTER_FOLDS, REPEATS
from stoic_ct.logs import configure_logging
from stoic_ct.options import add_model_arguments, add_rank_arguments, add_system_argument
from stoic_ct.runtime import log_runtime
from stoic_ct.weights.model_files import default_model_dir
from stoic_ct.weights.system_record import invoked_as

if TYPE_CHECKING:
    import torch

    from stoic_ct.distributed import Ranks

logger = logging.getLogger("stoic_ct.train")


def trained_system(value: str) -> str:
    """--system's value, with the old name `both` turned into `ensemble` (and a notice)."""
    if value != "both":
        return value
    logger.warning(
        "--system both is deprecated and will be removed in the next release: it is now "
        "called --system ensemble"
    )
    return "ensemble"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_system_argument(
        parser,
        old=None,
        type=trained_system,
        default="ensemble",
        help="what to train: balaitous (the heads), convnext3d (the fine-tuned ConvNeXt) or "
        "ensemble (both, and the weights that average them; the default; formerly 'both')",
    )
    parser.add_argument("--input", type=Path, default=Path("/input"))
    parser.add_argument("--output", type=Path, default=Path("/output"))
    parser.add_argument("--scratch", type=Path, default=Path("/scratch"))
    add_model_arguments(parser, device=False)
    add_rank_arguments(parser)
    parser.add_argument(
        "--lung-masks",
        type=Path,
        default=None,
        help="lung label images <PatientID>.mha to use instead of the U-Net",
    )
    parser.add_argument(
        "--convnext",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="fine-tuning settings that replace the recipe's for both tasks, e.g. epochs=10 "
        "batch_size=2 init=/path/pretrained.pth: the fields of `finetune`'s settings.json, "
        "each value read as its `finetune` option reads it (true/false for metadata, none "
        "to clear init or schedule_end)",
    )
    parser.add_argument("--evaluate", action="store_true", help="also write OUTPUT/report/")
    nested = "of the heads' nested cross-validation (default %(default)s)"
    parser.add_argument("--folds", type=int, default=OUTER_FOLDS, help=nested)
    parser.add_argument("--repeats", type=int, default=REPEATS, help=nested)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, write; 0 on success, 1 with a one-line message otherwise."""
    given = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(given)
    invoked_as("train.py", given)
    configure_logging(information_to_stdout=True)
    log_runtime()
    try:
        from stoic_ct.cli.convnext import finetune_values
        from stoic_ct.distributed import run_ranks

        convnext = finetune_values(args.convnext)
        command = [sys.executable, str(Path(__file__).resolve()), *given]
        return run_ranks(command, args.devices, args.rank_timeout, partial(on_rank, args, convnext))
    except StoicError as error:
        logger.error("%s", error)
        return 1


def on_rank(
    args: argparse.Namespace, convnext: dict[str, Any], ranks: Ranks, device: torch.device
) -> int:
    """This rank's part of the training run; `convnext`: the fine-tuning values given."""
    from stoic_ct.final_training import TrainingRun, train
    from stoic_ct.head_training.training import FitSettings
    from stoic_ct.inference.precision import ModelSettings
    from stoic_ct.weights.system_record import choose

    model_dir = args.model_dir or default_model_dir()
    encoder = choose(model_dir, encoder=args.encoder).encoder
    run = TrainingRun(
        input_dir=args.input,
        output_dir=args.output,
        scratch_dir=args.scratch,
        model_dir=model_dir,
        system=args.system,
        model=ModelSettings(device, args.precision, encoder),
        ranks=ranks,
        orientation=args.orientation,
        lung_masks=args.lung_masks,
        heads=FitSettings(seed=args.seed),
        folds=args.folds,
        repeats=args.repeats,
        evaluate=args.evaluate,
        convnext=convnext,
    )
    train(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
