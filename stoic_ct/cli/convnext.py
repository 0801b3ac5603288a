"""Commands for the 3D ConvNeXt: inflate-convnext, pretrain, finetune."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from stoic_ct.distributed import Ranks, run_ranks
from stoic_ct.errors import StoicError
from stoic_ct.models.convnext3d import SIZES as CONVNEXT_SIZES
from stoic_ct.models.inflation import INFLATIONS, NORMALISATIONS
from stoic_ct.options import add_rank_arguments, own_command
from stoic_ct.runtime import log_runtime

if TYPE_CHECKING:
    import torch

    from stoic_ct.convnext_training.trainer import NetworkSettings

logger = logging.getLogger("stoic_ct")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """inflate-convnext, finetune and pretrain."""
    _register_inflate(commands)
    _register_finetune(commands)
    _register_pretrain(commands)


def _register_inflate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inflate = commands.add_parser(
        "inflate-convnext",
        help="make convnext3d.pth: a 3D ConvNeXt inflated from 2D ConvNeXt weights",
        description="Inflate a 2D ConvNeXt checkpoint (the official release's, with its "
        "'model' key, or timm's) into the 3D ConvNeXt of Kienzle et al. and write it for "
        "--encoder convnext3d-frozen. The RGB stem is summed to one channel; the 2D head is "
        "dropped. See stoic_ct/models/inflation.py for the kernel layouts and normalisations.",
    )
    inflate.add_argument(
        "checkpoint", type=Path, nargs="?", metavar="CHECKPOINT_2D", help="2D ConvNeXt weights"
    )
    inflate.add_argument(
        "--out", type=Path, required=True, help="file to write (model/convnext3d.pth)"
    )
    inflate.add_argument("--size", choices=list(CONVNEXT_SIZES), default="tiny")
    inflate.add_argument(
        "--inflation",
        choices=INFLATIONS,
        default="full",
        help="full: copies along depth (default); 1g: Gaussian-weighted copies; 2g: two "
        "orthogonal Gaussian-weighted planes",
    )
    inflate.add_argument(
        "--normalisation",
        choices=NORMALISATIONS,
        default="sum",
        help="sum: keep each kernel's sum, so that the 3D network reproduces the 2D one on "
        "volumes constant in depth (default, as the published code); l2: keep its L2 norm "
        "(as the paper's text)",
    )
    inflate.add_argument(
        "--input-size", type=int, default=224, help="the cube the volume is resized to (224)"
    )
    inflate.add_argument(
        "--random",
        type=int,
        default=None,
        metavar="SEED",
        help="no checkpoint: a randomly initialised 3D ConvNeXt (for tests and setup checks)",
    )
    inflate.set_defaults(handler=run_inflate_convnext)


def _register_finetune(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from stoic_ct.convnext_training.recipes import PRESETS

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune the 3D ConvNeXt end to end (k folds): convnext3d_<task>.pth",
        description="Fine-tune a 3D ConvNeXt on DATA_DIR (STOIC layout) as Kienzle et al.: "
        "stratified k-fold cross-validation, AdamW, cross-entropy balanced by the training "
        "fold's class frequencies, their 3D augmentation, an EMA of the weights (validated, "
        "kept, shipped), the best epoch by ROC-AUC (macro F1 for severity4), float16 on a "
        "GPU. Writes OUT/fold-K/ (checkpoints, metrics.csv, learning-curves.png), "
        "OUT/oof.csv, OUT/finetune.json and OUT/convnext3d_<task>.pth, the fold ensemble "
        "that process.py --system convnext3d reads from the model folder. Start from "
        "--init: inflate-convnext's ImageNet weights or pretrain's pretrained.pth. "
        "--preset stoic2021-winner sets the STOIC2021 severity winner's recipe; any option "
        "given beside it overrides the preset's value. Every value used is logged and "
        "saved in OUT/settings.json.",
    )
    finetune.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    finetune.add_argument("--out", type=Path, required=True, help="run folder")
    finetune.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="stoic2021-winner: severity, tiny, 256^3 cubes, sigmoid head with age and sex, "
        "AdamW 5e-5, weight decay 1e-8, cosine to 1e-6 over 20 epochs, no drop path",
    )
    finetune_settings_arguments(finetune)
    _run_arguments(finetune)
    finetune.add_argument(
        "--resume", action="store_true", help="continue the run in --out where it stopped"
    )
    finetune.set_defaults(handler=run_finetune)


def _register_pretrain(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from stoic_ct.convnext_training.pretraining import MODES, PretrainSettings

    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain the 3D ConvNeXt (lesion segmentation or multitask): pretrained.pth",
        description="Pretrain a 3D ConvNeXt for `finetune --init`: segmentation of the "
        "lesion masks DATA_DIR/data/lesions/<PatientID>.mha (UperNet-style head, Dice + "
        "cross-entropy), or multitask: COVID-19 classification plus segmentation of "
        "pseudo-labels made by a segmentation-pretrained model (--pseudo-labels-from). A "
        "fifth of the patients is held out to pick the best epoch. Writes OUT/pretrained.pth.",
    )
    pre = PretrainSettings()
    pretrain.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    pretrain.add_argument("--out", type=Path, required=True, help="run folder")
    pretrain.add_argument(
        "--mode", choices=MODES, default=argparse.SUPPRESS, help=f"default {pre.mode}"
    )
    pretrain.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.pt (same settings; --epochs may grow)",
    )
    pretrain.add_argument(
        "--pseudo-labels-from",
        type=Path,
        default=None,
        metavar="PRETRAINED",
        help="multitask: the pretrained.pth of a segmentation run, to make the lesion "
        "masks with (default: the masks in DATA_DIR/data/lesions)",
    )
    _network_arguments(pretrain, pre)
    _run_arguments(pretrain)
    pretrain.set_defaults(handler=run_pretrain)


# Options that set a settings field, when it is named otherwise.
FIELD_OF_OPTION = {"ema": "ema_decay"}


def finetune_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """An option for each FinetuneSettings field (the task, the folds, the head and the
    network's), each absent from the parsed arguments unless given (so that a preset's
    value stands unless the option overrides it)."""
    from stoic_ct.convnext_training.cube_cache import FINETUNE_TASKS
    from stoic_ct.convnext_training.recipes import FinetuneSettings
    from stoic_ct.inference.fold_ensemble import HEAD_TYPES

    defaults = FinetuneSettings()
    parser.add_argument(
        "--task",
        choices=FINETUNE_TASKS,
        default=argparse.SUPPRESS,
        help="covid (every labelled patient), severe (COVID-positive patients, the STOIC "
        f"rule), severity4 (the `severity` column, grades 1-4 of COV19-CT-DB); default "
        f"{defaults.task}",
    )
    parser.add_argument(
        "--folds", type=int, default=argparse.SUPPRESS, help=f"default {defaults.folds}"
    )
    parser.add_argument(
        "--head",
        choices=HEAD_TYPES,
        default=argparse.SUPPRESS,
        help="softmax: one logit per class, cross-entropy (default); sigmoid: one logit, "
        "binary cross-entropy (binary tasks)",
    )
    parser.add_argument(
        "--metadata",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="append age and sex (from each scan's header; age/100 clipped, sex 1/0/0.5) "
        "to the pooled features before the head (default: no)",
    )
    _network_arguments(parser, defaults)


def _network_arguments(parser: argparse.ArgumentParser, defaults: NetworkSettings) -> None:
    """The NetworkSettings options, each absent from the parsed arguments unless given."""
    from stoic_ct.convnext_training.augmentation import AUGMENTATIONS
    from stoic_ct.convnext_training.trainer import SCHEDULES

    given = argparse.SUPPRESS
    parser.add_argument(
        "--init",
        type=Path,
        default=given,
        metavar="CONVNEXT3D",
        help="encoder to start from (inflate-convnext's file or pretrain's pretrained.pth); "
        "default: random initialisation",
    )
    parser.add_argument(
        "--size", choices=tuple(CONVNEXT_SIZES), default=given, help=f"default {defaults.size}"
    )
    parser.add_argument(
        "--input-size", type=int, default=given, help=f"cube side (default {defaults.input_size})"
    )
    parser.add_argument("--epochs", type=int, default=given, help=f"default {defaults.epochs}")
    parser.add_argument(
        "--batch-size", type=int, default=given, help=f"default {defaults.batch_size}"
    )
    parser.add_argument(
        "--lr", type=float, default=given, help=f"AdamW learning rate ({defaults.lr:g})"
    )
    parser.add_argument(
        "--weight-decay", type=float, default=given, help=f"default {defaults.weight_decay:g}"
    )
    parser.add_argument(
        "--ema", type=float, default=given, help=f"EMA decay (default {defaults.ema_decay:g})"
    )
    parser.add_argument(
        "--drop-path", type=float, default=given, help=f"default {defaults.drop_path:g}"
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=given,
        help="constant: --lr throughout (default); cosine: from --lr at the first epoch to "
        "--lr-floor at epoch --schedule-end, set per epoch, then the floor",
    )
    parser.add_argument(
        "--lr-floor", type=float, default=given, help=f"default {defaults.lr_floor:g}"
    )
    parser.add_argument(
        "--schedule-end",
        type=int,
        default=given,
        metavar="EPOCH",
        help="the epoch the cosine reaches the floor at (default: the last)",
    )
    parser.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default=given,
        help="paper: Kienzle et al.'s (default); orientation: flips and 90-degree turns "
        "only (small cohorts); none",
    )
    parser.add_argument(
        "--seed", type=int, default=given, help="folds, order, augmentation (default 0)"
    )


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a training run keeps its cubes and runs: --cache and the rank options."""
    parser.add_argument(
        "--cache", type=Path, default=None, help="cube cache folder (default OUT/cubes)"
    )
    add_rank_arguments(parser)


class _RefusedError(Exception):
    """What argparse says of a value its option refuses."""


class _RaisingParser(argparse.ArgumentParser):
    """A parser that raises _RefusedError where argparse would exit with a usage message."""

    def error(self, message: str) -> NoReturn:
        raise _RefusedError(message)


def finetune_values(pairs: Sequence[str], flag: str = "--convnext") -> dict[str, Any]:
    """KEY=VALUE pairs, KEY a FinetuneSettings field (as in settings.json), as settings
    values: each VALUE read by the `finetune` option that sets that field (true or false
    for a switch; none clears a field that may be empty).

    Raises:
        StoicError: for an unknown key, or a value that the option refuses.
    """
    from stoic_ct.convnext_training.recipes import FinetuneSettings

    parser = _RaisingParser(add_help=False)
    finetune_settings_arguments(parser)
    option_of = {field: option for option, field in FIELD_OF_OPTION.items()}
    defaults = {f.name: f.default for f in fields(FinetuneSettings)}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if key not in defaults or not equals:
            raise StoicError(
                f"{flag} {pair!r}: expected KEY=VALUE, KEY one of {', '.join(defaults)}"
            )
        if text.lower() == "none" and defaults[key] is None:
            values[key] = None
            continue
        option = option_of.get(key, key).replace("_", "-")
        if isinstance(defaults[key], bool):
            switch = {"true": f"--{option}", "false": f"--no-{option}"}.get(text.lower())
            tokens = [switch] if switch else []
        else:
            tokens = [f"--{option}", text]
        try:
            if not tokens:
                raise _RefusedError("true or false")
            values |= given_settings(parser.parse_args(tokens), list(defaults))
        except _RefusedError as error:
            raise StoicError(f"{flag} {pair!r}: {text!r} is not a valid {key} ({error})") from None
    return values


def run_inflate_convnext(args: argparse.Namespace) -> int:
    """The `inflate-convnext` command."""
    import torch

    from stoic_ct.models.convnext3d import ConvNeXt3D
    from stoic_ct.models.inflation import inflate_convnext as inflate
    from stoic_ct.weights.network_files import load_2d_checkpoint, save_convnext3d

    if (args.checkpoint is None) == (args.random is None):
        raise StoicError("give a 2D CHECKPOINT, or --random SEED, not both")
    if args.input_size < 32:
        raise StoicError(f"--input-size must be at least 32, not {args.input_size}")
    if args.random is not None:
        torch.manual_seed(args.random)
        model = ConvNeXt3D(args.size)
        about = {"source": f"random initialisation, seed {args.random}"}
        logger.warning("%s: RANDOM weights, for tests and setup checks only", args.out)
    else:
        model = ConvNeXt3D(args.size)
        state = inflate(
            load_2d_checkpoint(args.checkpoint), model, args.inflation, args.normalisation
        )
        model.load_state_dict(state, strict=True)
        about = {
            "source": args.checkpoint.name,
            "inflation": args.inflation,
            "normalisation": args.normalisation,
        }
    save_convnext3d(args.out, model, args.size, args.input_size, about)
    logger.info("wrote %s (ConvNeXt3D %s, input %d^3)", args.out, args.size, args.input_size)
    return 0


def given_settings(args: argparse.Namespace, fields: Sequence[str]) -> dict[str, Any]:
    """The settings among `fields` that the command line gives (options absent otherwise)."""
    given = {}
    for option, value in vars(args).items():
        field = FIELD_OF_OPTION.get(option, option)
        if field in fields:
            given[field] = str(value.resolve()) if isinstance(value, Path) else value
    return given


def log_settings(settings: Any, preset: dict[str, Any], given: dict[str, Any], name: str) -> None:
    """One line per value, with where it comes from: the command line, the preset, or
    the default."""
    for field, value in asdict(settings).items():
        origin = "option" if field in given else f"preset {name}" if field in preset else "default"
        logger.info("setting %-14s %-12s (%s)", field, value, origin)


def run_finetune(args: argparse.Namespace) -> int:
    """The `finetune` command."""
    log_runtime()
    from stoic_ct.convnext_training.cube_cache import task_patients
    from stoic_ct.convnext_training.finetuning import finetune_on_ranks as run
    from stoic_ct.convnext_training.recipes import PRESETS, FinetuneSettings

    given = given_settings(args, [f.name for f in fields(FinetuneSettings)])
    if "init" in given and not Path(given["init"]).exists():
        raise StoicError("is missing (--init)", Path(given["init"]))
    preset = PRESETS.get(args.preset, {}) if args.preset else {}
    try:
        settings = FinetuneSettings(**(preset | given))
    except ValueError as error:
        raise StoicError(str(error)) from None
    log_settings(settings, preset, given, args.preset)
    if settings.init is None:
        logger.warning("no --init: the ConvNeXt starts from random weights")
    patients, labels = task_patients(args.data_dir, settings.task)
    logger.info(
        "%s task: %d patients (%s) from %s",
        settings.task,
        len(patients),
        " / ".join(str(int((labels == c).sum())) for c in range(int(labels.max()) + 1)),
        args.data_dir,
    )

    def on_rank(ranks: Ranks, device: torch.device) -> int:
        result = run(
            patients,
            labels,
            settings,
            args.out,
            device=device,
            ranks=ranks,
            cache_dir=args.cache,
            resume=args.resume,
            progress=ranks.alone,
        )
        if result is not None:
            print(
                f"{settings.task}: out-of-fold metric {result.metric:.4f}; wrote {result.ensemble}"
            )
        return 0

    return run_ranks(own_command(args), args.devices, args.rank_timeout, on_rank)


def run_pretrain(args: argparse.Namespace) -> int:
    """The `pretrain` command."""
    log_runtime()
    from stoic_ct.convnext_training.cube_cache import LESION_DIR, task_patients
    from stoic_ct.convnext_training.pretraining import PretrainSettings
    from stoic_ct.convnext_training.pretraining import pretrain_on_ranks as run
    from stoic_ct.io.cohort import read_cohort

    given = given_settings(args, [f.name for f in fields(PretrainSettings)])
    for path in (given.get("init"), given.get("pseudo_labels_from")):
        if path is not None and not Path(path).exists():
            raise StoicError("is missing", Path(path))
    try:
        settings = PretrainSettings(**given)
    except ValueError as error:
        raise StoicError(str(error)) from None
    log_settings(settings, {}, given, "")
    lesions = args.data_dir / LESION_DIR
    if settings.mode == "multitask":
        patients, labels = task_patients(args.data_dir, "covid")
    else:
        patients, labels = read_cohort(args.data_dir), None

    def on_rank(ranks: Ranks, device: torch.device) -> int:
        path = run(
            patients,
            labels,
            settings,
            args.out,
            device=device,
            ranks=ranks,
            lesion_dir=lesions if lesions.is_dir() else None,
            cache_dir=args.cache,
            resume=args.resume,
            progress=ranks.alone,
        )
        if path is not None:
            print(f"wrote {path}")
        return 0

    return run_ranks(own_command(args), args.devices, args.rank_timeout, on_rank)
