"""The model options every command that runs a model takes: process.py, train.py and the
`predict` and `extract-features` commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from stoic_ct.inference.precision import PRECISIONS
from stoic_ct.io.orientation import ORIENTATIONS
from stoic_ct.weights.model_files import ENCODER_KINDS


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model-dir, --precision, --device, --encoder and --orientation."""
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="folder with the model files (default: /opt/ml/model when it holds them, "
        "else the repository's model/)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="exact",
        help="exact: the published numbers (default); fast: float16 on a GPU, int8 on a CPU, "
        "within 0.02 of exact on the benchmark",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run the networks (default: auto, a GPU when there is one)",
    )
    parser.add_argument(
        "--encoder",
        choices=ENCODER_KINDS,
        default="vit",
        help="vit: the published Balaitous encoders (default); convnext3d: the 3D ConvNeXt "
        "of convnext3d.pth with the heads of convnext3d_heads.npz",
    )
    parser.add_argument(
        "--orientation",
        choices=ORIENTATIONS,
        default="canonical",
        help="canonical: reorient each scan to LPS, as STOIC stores scans (default; exact, "
        "no interpolation); as-stored: feed the voxels in the file's order, as the "
        "published package does",
    )
