"""Commands for the 3D ConvNeXt: inflate-convnext, pretrain, finetune."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stoic_ct.errors import StoicError
from stoic_ct.models.convnext3d import SIZES as CONVNEXT_SIZES
from stoic_ct.models.inflation import INFLATIONS, NORMALISATIONS

logger = logging.getLogger("stoic_ct")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """inflate-convnext, finetune and pretrain."""
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
    from stoic_ct.convnext_training.augmentation import AUGMENTATIONS
    from stoic_ct.convnext_training.finetuning import FinetuneSettings
    from stoic_ct.convnext_training.pretraining import MODES, PretrainSettings
    from stoic_ct.preprocessing.cubes import FINETUNE_TASKS

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune the 3D ConvNeXt end to end (k folds): convnext3d_<task>.pth",
        description="Fine-tune a 3D ConvNeXt on DATA_DIR (STOIC layout) as Kienzle et al.: "
        "stratified k-fold cross-validation, AdamW, cross-entropy balanced by the training "
        "fold's class frequencies, their 3D augmentation, an EMA of the weights (validated, "
        "kept, shipped), the best epoch by ROC-AUC (macro F1 for severity4), float16 on a "
        "GPU. Writes OUT/fold-K/ (checkpoints, metrics.csv, learning-curves.png), "
        "OUT/oof.csv, OUT/finetune.json and OUT/convnext3d_<task>.pth, the fold ensemble "
        "that process.py --model convnext3d reads from the model folder. Start from "
        "--init: inflate-convnext's ImageNet weights or pretrain's pretrained.pth.",
    )
    defaults = FinetuneSettings()
    finetune.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    finetune.add_argument("--out", type=Path, required=True, help="run folder")
    finetune.add_argument(
        "--task",
        choices=FINETUNE_TASKS,
        default=defaults.task,
        help="covid (every labelled patient), severe (COVID-positive patients, the STOIC "
        "rule), severity4 (the `severity` column, grades 1-4 of COV19-CT-DB)",
    )
    finetune.add_argument("--folds", type=int, default=defaults.folds, help="default 5")
    finetune.add_argument("--epochs", type=int, default=defaults.epochs, help="default 30")
    _convnext_training_arguments(finetune, defaults.batch_size, defaults.lr, AUGMENTATIONS)
    finetune.add_argument(
        "--resume", action="store_true", help="continue the run in --out where it stopped"
    )

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
    pretrain.add_argument("--mode", choices=MODES, default=pre.mode, help="default segmentation")
    pretrain.add_argument("--epochs", type=int, default=pre.epochs, help="default 30")
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
    _convnext_training_arguments(pretrain, pre.batch_size, pre.lr, AUGMENTATIONS)
    finetune.set_defaults(handler=run_finetune)
    pretrain.set_defaults(handler=run_pretrain)


def _convnext_training_arguments(
    parser: argparse.ArgumentParser, batch_size: int, lr: float, augmentations: Sequence[str]
) -> None:
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="CONVNEXT3D",
        help="encoder to start from (inflate-convnext's file or pretrain's pretrained.pth); "
        "default: random initialisation",
    )
    parser.add_argument(
        "--size", choices=tuple(CONVNEXT_SIZES), default="tiny", help="default tiny"
    )
    parser.add_argument("--input-size", type=int, default=224, help="cube side (default 224)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"default {batch_size}")
    parser.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate ({lr:g})")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="default 0.05")
    parser.add_argument("--ema", type=float, default=0.99, help="EMA decay (default 0.99)")
    parser.add_argument("--drop-path", type=float, default=0.1, help="default 0.1")
    parser.add_argument(
        "--augment",
        choices=augmentations,
        default="paper",
        help="paper: Kienzle et al.'s (default); orientation: flips and 90-degree turns "
        "only (small cohorts); none",
    )
    parser.add_argument("--seed", type=int, default=0, help="folds, order, augmentation")
    parser.add_argument(
        "--cache", type=Path, default=None, help="cube cache folder (default OUT/cubes)"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto"
    )


def run_inflate_convnext(args: argparse.Namespace) -> int:
    """The `inflate-convnext` command."""
    import torch

    from stoic_ct.models.convnext3d import ConvNeXt3D, save_convnext3d
    from stoic_ct.models.inflation import inflate_convnext as inflate
    from stoic_ct.models.inflation import load_2d_checkpoint

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


def _network_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings finetune and pretrain share, from `_convnext_training_arguments`."""
    return {
        "size": args.size,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "ema_decay": args.ema,
        "drop_path": args.drop_path,
        "augment": args.augment,
        "seed": args.seed,
        "init": None if args.init is None else str(args.init.resolve()),
    }


def run_finetune(args: argparse.Namespace) -> int:
    """The `finetune` command."""
    from stoic_ct.convnext_training.finetuning import FinetuneSettings
    from stoic_ct.convnext_training.finetuning import finetune as run
    from stoic_ct.inference.precision import resolve_device
    from stoic_ct.preprocessing.cubes import task_patients

    if args.init is not None and not args.init.exists():
        raise StoicError("is missing (--init)", args.init)
    try:
        settings = FinetuneSettings(
            task=args.task, folds=args.folds, epochs=args.epochs, **_network_settings(args)
        )
    except ValueError as error:
        raise StoicError(str(error)) from None
    if args.init is None:
        logger.warning("no --init: the ConvNeXt starts from random weights")
    patients, labels = task_patients(args.data_dir, args.task)
    logger.info(
        "%s task: %d patients (%s) from %s",
        args.task,
        len(patients),
        " / ".join(str(int((labels == c).sum())) for c in range(int(labels.max()) + 1)),
        args.data_dir,
    )
    result = run(
        patients,
        labels,
        settings,
        args.out,
        device=resolve_device(args.device),
        cache_dir=args.cache,
        resume=args.resume,
    )
    print(f"{args.task}: out-of-fold metric {result.metric:.4f}; wrote {result.ensemble}")
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    """The `pretrain` command."""
    from stoic_ct.convnext_training.pretraining import PretrainSettings
    from stoic_ct.convnext_training.pretraining import pretrain as run
    from stoic_ct.inference.precision import resolve_device
    from stoic_ct.io.cohort import read_cohort
    from stoic_ct.preprocessing.cubes import LESION_DIR, task_patients

    for path in (args.init, args.pseudo_labels_from):
        if path is not None and not path.exists():
            raise StoicError("is missing", path)
    try:
        settings = PretrainSettings(
            mode=args.mode,
            epochs=args.epochs,
            **_network_settings(args),
            pseudo_labels_from=None
            if args.pseudo_labels_from is None
            else str(args.pseudo_labels_from.resolve()),
        )
    except ValueError as error:
        raise StoicError(str(error)) from None
    lesions = args.data_dir / LESION_DIR
    if args.mode == "multitask":
        patients, labels = task_patients(args.data_dir, "covid")
    else:
        patients, labels = read_cohort(args.data_dir), None
    path = run(
        patients,
        labels,
        settings,
        args.out,
        device=resolve_device(args.device),
        lesion_dir=lesions if lesions.is_dir() else None,
        cache_dir=args.cache,
        resume=args.resume,
    )
    print(f"wrote {path}")
    return 0
