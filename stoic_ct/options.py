"""The model options every command that runs a model takes: process.py, train.py and the
`predict`, `serve` and `extract-features` commands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stoic_ct.inference.precision import PRECISIONS, ModelSettings, resolve_device
from stoic_ct.io.orientation import ORIENTATIONS
from stoic_ct.weights.model_files import ENCODER_ALIASES, ENCODER_KINDS, MODEL_KINDS

logger = logging.getLogger(__name__)


def encoder_name(value: str) -> str:
    """--encoder's value, with an old name turned into the new one and a deprecation notice."""
    new = ENCODER_ALIASES.get(value)
    if new is None:
        return value
    logger.warning(
        "--encoder %s is deprecated and will be removed in the next release: it is now "
        "called --encoder %s (the frozen 3D ConvNeXt under logistic heads; the fine-tuned "
        "one is --model convnext3d)",
        value,
        new,
    )
    return new


def add_model_arguments(
    parser: argparse.ArgumentParser, device: bool = True, system: bool = False
) -> None:
    """--model-dir, --precision, --device (unless `device` is False: train.py has
    --devices), --encoder and --orientation; with `system`, --model too."""
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="folder with the model files (default: /opt/ml/model when it holds them, "
        "else the repository's model/)",
    )
    if system:
        parser.add_argument(
            "--model",
            choices=MODEL_KINDS,
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
        help="exact: the published numbers (default); fast: float16 on a GPU, int8 on a CPU, "
        "within 0.02 of exact on the benchmark",
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
