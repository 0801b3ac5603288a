"""Commands that write synthetic data: phantom, phantom-cohort."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stoic_ct.errors import StoicError

logger = logging.getLogger("stoic_ct")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """phantom and phantom-cohort."""
    phantom = commands.add_parser(
        "phantom",
        help="write a synthetic chest CT phantom",
        description="Write a synthetic chest CT (body, lungs, heart, spine, trachea, lesions) "
        "in HU, with PatientAge and PatientSex in its header.",
    )
    phantom.add_argument("output", type=Path, help="image file to write (.mha, .nii.gz, ...)")
    phantom.add_argument(
        "--size",
        type=int,
        nargs=3,
        default=(128, 128, 64),
        metavar=("X", "Y", "Z"),
        help="voxels (default 128 128 64)",
    )
    phantom.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(2.8, 2.8, 5.0),
        metavar=("X", "Y", "Z"),
        help="mm (default 2.8 2.8 5)",
    )
    phantom.add_argument(
        "--lesion-burden",
        type=float,
        default=0.05,
        help="fraction of the lungs covered by lesions (default 0.05)",
    )
    phantom.add_argument("--age", default="065Y", help="PatientAge header (default 065Y)")
    phantom.add_argument("--sex", default="M", help="PatientSex header (default M)")
    phantom.add_argument("--seed", type=int, default=0)
    phantom.set_defaults(handler=run_phantom)
    cohort = commands.add_parser(
        "phantom-cohort",
        help="write a synthetic cohort in the STOIC training layout",
        description="Write small chest phantoms to DATA_DIR/data/mha and their labels to "
        "DATA_DIR/metadata/reference.csv: COVID-19 when the lesion burden exceeds 0.12, "
        "severe when age + 100 x burden exceeds 85. To try extract-features, fit-heads and "
        "evaluate end to end; --shuffle-labels gives a cohort with nothing to learn.",
    )
    cohort.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    cohort.add_argument("--patients", type=int, default=48, help="how many (default 48)")
    cohort.add_argument("--seed", type=int, default=0)
    cohort.add_argument("--shuffle-labels", action="store_true")
    cohort.set_defaults(handler=run_phantom_cohort)


def run_phantom(args: argparse.Namespace) -> int:
    """The `phantom` command: a phantom centred on the origin."""
    from stoic_ct.phantom import PhantomSpec, make_phantom, write_phantom

    size = tuple(args.size)
    spacing = tuple(args.spacing)
    origin = tuple(-n * s / 2 for n, s in zip(size, spacing, strict=True))
    spec = PhantomSpec(
        size=size,
        spacing=spacing,
        origin=origin,
        lesion_burden=args.lesion_burden,
        age=args.age or None,
        sex=args.sex or None,
        seed=args.seed,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_phantom(make_phantom(spec), str(args.output), spec)
    logger.info(
        "wrote %s (%s voxels at %s mm)",
        args.output,
        "x".join(map(str, size)),
        "x".join(f"{s:g}" for s in spacing),
    )
    return 0


def run_phantom_cohort(args: argparse.Namespace) -> int:
    """The `phantom-cohort` command."""
    from stoic_ct.phantom import write_phantom_cohort

    if args.patients < 8:
        raise StoicError(f"--patients must be at least 8, not {args.patients}")
    write_phantom_cohort(
        args.data_dir, args.patients, seed=args.seed, shuffle_labels=args.shuffle_labels
    )
    logger.info("wrote %d phantoms and their labels to %s", args.patients, args.data_dir)
    return 0
