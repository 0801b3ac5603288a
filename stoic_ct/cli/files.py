"""Commands for the model files and data: fetch-weights, check-model, sample-scans,
random-weights."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stoic_ct.weights.fetch import ZENODO_URL, configured_index
from stoic_ct.weights.model_files import (
    R231,
    REPOSITORY_MODEL_DIR,
    REPOSITORY_ROOT,
    default_model_dir,
)

logger = logging.getLogger("stoic_ct")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """fetch-weights, check-model, sample-scans and random-weights."""
    _register_fetch_weights(commands)
    _register_check_model(commands)
    _register_sample_scans(commands)
    _register_random_weights(commands)


def _register_fetch_weights(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fetch = commands.add_parser(
        "fetch-weights",
        help="download and check the four model files",
        description="Download the model files from where they are published (Zenodo, "
        "lungmask's GitHub release, the balaitous 1.2 wheel on the package index), resuming "
        "broken downloads; check each (published digest, keys and shapes); record their "
        "sha256 in DEST/MANIFEST. Files already present and valid are kept. Offline, it "
        "says per file where to fetch it by hand and where to put it.",
    )
    fetch.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="folder for the files (default: the repository's model/)",
    )
    fetch.add_argument(
        "--zenodo-url",
        default=ZENODO_URL,
        help=f"base URL of the ViT-L files (default {ZENODO_URL})",
    )
    fetch.add_argument(
        "--lungmask-url",
        default=R231.url,
        help="URL of the R231 file; its name carries the sha256 prefix to check",
    )
    fetch.add_argument(
        "--index-url",
        default=None,
        help="package index holding the balaitous 1.2 wheel (default: the one pip uses: "
        "$PIP_INDEX_URL, else pip's configuration, else pip's default)",
    )
    fetch.set_defaults(handler=run_fetch_weights)


def _register_check_model(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = commands.add_parser(
        "check-model",
        help="say which system a model folder holds, and check its files",
        description="Read the model folder's system.json (without one: the four published "
        "Balaitous files) and check that every file of that system is there and that the "
        "folder's MANIFEST, which export.sh packs, lists it with its sha256. Prints the "
        "system, its encoder choice and where the folder came from.",
    )
    check.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="model folder (default: /opt/ml/model when it holds model files, else the "
        "repository's model/)",
    )
    check.set_defaults(handler=run_check_model)


def _register_sample_scans(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    samples = commands.add_parser(
        "sample-scans",
        help="fetch two public chest CTs (from the pyradiomics 3.1.0 source archive)",
        description="Fetch the pyradiomics 3.1.0 source archive from the package index "
        "(checked against its pinned sha256) and extract its two chest CTs, lung1_image.nrrd "
        "(neck to mid-thorax) and lung2_image.nrrd (the whole chest), into DEST; kept there "
        "for later calls. Prints their paths.",
    )
    samples.add_argument(
        "--dest",
        type=Path,
        default=REPOSITORY_ROOT / ".cache" / "sample-scans",
        help="folder for the scans (default: .cache/sample-scans in the repository)",
    )
    samples.add_argument(
        "--index-url",
        default=None,
        help="package index (default: the one pip uses: $PIP_INDEX_URL, else pip's "
        "configuration, else pip's default)",
    )
    samples.set_defaults(handler=run_sample_scans)


def _register_random_weights(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    random = commands.add_parser(
        "random-weights",
        help="write random model files in the published layouts",
        description="Write the four model files, randomly initialised, in the published "
        "layouts, with a RANDOM_WEIGHTS marker. For tests, benchmarks and setup checks "
        "where the real files cannot be downloaded; their probabilities mean nothing.",
    )
    random.add_argument("--dest", type=Path, required=True, help="folder to write to")
    random.add_argument(
        "--heads",
        type=Path,
        default=None,
        help="a real balaitous.npz to copy instead of random heads",
    )
    random.add_argument("--seed", type=int, default=0)
    random.set_defaults(handler=run_random_weights)


def run_fetch_weights(args: argparse.Namespace) -> int:
    """The `fetch-weights` command."""
    from stoic_ct.inference.pipeline import Balaitous, check_model_file
    from stoic_ct.inference.precision import ModelSettings
    from stoic_ct.weights.fetch import Sources
    from stoic_ct.weights.fetch import fetch_weights as fetch

    dest = args.dest or REPOSITORY_MODEL_DIR
    index = args.index_url or configured_index()
    fetch(dest, Sources(args.zenodo_url, args.lungmask_url, index), check_model_file)
    # The files fit together: the encoders' features are what the heads take.
    Balaitous.from_model_dir(dest, ModelSettings(encoder="vit"), lung_masks="given")
    return 0


def run_check_model(args: argparse.Namespace) -> int:
    """The `check-model` command: prints what the folder holds."""
    from stoic_ct.weights.system_record import check_model_folder

    model_dir = args.model_dir or default_model_dir()
    choice = check_model_folder(model_dir)
    print(f"{model_dir}: {choice.describe(model_dir)}; every file checked against MANIFEST")
    return 0


def run_sample_scans(args: argparse.Namespace) -> int:
    """The `sample-scans` command: one path per line on stdout."""
    from stoic_ct.weights.sample_scans import sample_scans as fetch_sample_scans

    for path in fetch_sample_scans(args.dest, args.index_url or configured_index()).values():
        print(path)
    return 0


def run_random_weights(args: argparse.Namespace) -> int:
    """The `random-weights` command."""
    from stoic_ct.weights.random_weights import write_random_model_dir

    logger.info("writing random ViT-L, R231 and heads files to %s (about 2.5 GB)", args.dest)
    write_random_model_dir(args.dest, seed=args.seed, heads=args.heads)
    logger.warning("%s holds RANDOM weights: use it to check a setup, never for results", args.dest)
    return 0
