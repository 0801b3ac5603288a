"""The one place that knows the model files: their names, sources, licences and digests.

A model directory holds the four files under their published names, and a `MANIFEST` of
their sha256 sums once `fetch-weights` has checked them; a folder that training wrote also
holds `system.json`, which says which system it holds (`system_files` lists what each
needs). Every loader goes through
`ModelFiles`, so a missing file always stops the run with a message that names the file,
what was expected and where it is published. This module needs only the standard library,
so that scripts on a host without the project's packages can use it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from stoic_ct.atomic import atomic_write_text
from stoic_ct.errors import ModelFileError

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
CONTAINER_MODEL_DIR = Path("/opt/ml/model")
REPOSITORY_MODEL_DIR = REPOSITORY_ROOT / "model"
# Written beside randomly initialised weights, so that no one mistakes them for the real ones;
# its line starting with RECIPE_PREFIX says how they were made.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"
RECIPE_PREFIX = "recipe: "


@dataclass(frozen=True)
class ModelFileSpec:
    """A published model file: its name, what it is, where it comes from, its licence."""

    name: str
    description: str
    url: str
    licence: str


VIT_CT = ModelFileSpec(
    "vitl_16_ct.pth",
    "iBOT ViT-L/16 fine-tuned on lung CT, a plain state dict (encoder 'full', 24 blocks)",
    "https://zenodo.org/record/6547999/files/vitl_16_ct.pth",
    "as stated on Zenodo record 6547999 (Balaitous, MIT)",
)
VIT_IMAGENET = ModelFileSpec(
    "vitl_16_pt22k.pth",
    "iBOT ViT-L/16 pretrained on ImageNet-22k, {'state_dict': ...} "
    "(encoder 'lung', first 16 blocks)",
    "https://zenodo.org/record/6547999/files/vitl_16_pt22k.pth",
    "as stated on Zenodo record 6547999 (iBOT weights, Apache-2.0)",
)
R231 = ModelFileSpec(
    "unet_r231-d5d2fc3d.pth",
    "lungmask R231 U-Net state dict (3 classes)",
    "https://github.com/JoHof/lungmask/releases/download/v0.0/unet_r231-d5d2fc3d.pth",
    "Apache-2.0 (lungmask)",
)
HEADS = ModelFileSpec(
    "balaitous.npz",
    "the four logistic regressions of Balaitous (coef_*, intercept_*, alpha_*)",
    "the balaitous 1.2 wheel on the Python package index (its assets/balaitous.npz)",
    "MIT (Balaitous)",
)
ALL_FILES = (VIT_CT, VIT_IMAGENET, R231, HEADS)

# The frozen 3D ConvNeXt encoder (Kienzle et al.), made locally from published 2D weights,
# and heads fitted on its features. Not part of the published Balaitous model.
CONVNEXT3D = ModelFileSpec(
    "convnext3d.pth",
    "a 3D ConvNeXt written by `python -m stoic_ct inflate-convnext` ({'size', 'input_size', "
    "'inflation', 'normalisation', 'state_dict'})",
    "made locally with inflate-convnext from the official 2D ConvNeXt weights, e.g. "
    "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth",
    "MIT (ConvNeXt weights)",
)
CONVNEXT_HEADS = ModelFileSpec(
    "convnext3d_heads.npz",
    "logistic regressions on 3D ConvNeXt features (the keys of balaitous.npz)",
    "made locally with `python -m stoic_ct fit-heads` on features of --encoder convnext3d-frozen",
    "yours",
)


@dataclass(frozen=True)
class EncoderKind:
    """A choice of frozen encoders under the logistic heads, and the files that go with it.

    Attributes:
        name: the value of --encoder.
        full, lung: the files of the "full" and "lung" encoders (the same file when one
            network sees both inputs).
        heads: the heads fitted on these encoders' features.
        report: the fit report written beside the heads.
    """

    name: str
    full: ModelFileSpec
    lung: ModelFileSpec
    heads: ModelFileSpec
    report: str

    @property
    def files(self) -> tuple[ModelFileSpec, ...]:
        """The encoder files, each once."""
        return (self.full,) if self.full == self.lung else (self.full, self.lung)


VIT_ENCODERS = EncoderKind("vit", VIT_CT, VIT_IMAGENET, HEADS, "heads.json")
FROZEN_CONVNEXT3D = EncoderKind(
    "convnext3d-frozen", CONVNEXT3D, CONVNEXT3D, CONVNEXT_HEADS, "convnext3d_heads.json"
)
ENCODER_CHOICES = {kind.name: kind for kind in (VIT_ENCODERS, FROZEN_CONVNEXT3D)}
ENCODER_KINDS = tuple(ENCODER_CHOICES)
# Old names, still read (in flags and in the provenance of feature tables and reports).
ENCODER_ALIASES = {"convnext3d": FROZEN_CONVNEXT3D.name}


def encoder_kind(name: str) -> EncoderKind:
    """The EncoderKind called `name` (or an old alias of it); ValueError otherwise."""
    kind = ENCODER_CHOICES.get(ENCODER_ALIASES.get(name, name))
    if kind is None:
        raise ValueError(f"encoder must be one of {', '.join(ENCODER_KINDS)}, not {name!r}")
    return kind


# The fine-tuned 3D ConvNeXt classifiers (`finetune`), the system `--system convnext3d`: each
# holds every fold's EMA weights, and `process.py --system convnext3d` averages the folds'
# softmax outputs.
FINE_TUNED_NAME = "convnext3d_{task}.pth"  # `finetune --task TASK` writes OUT/<this>
CONVNEXT_COVID = ModelFileSpec(
    FINE_TUNED_NAME.format(task="covid"),
    "the fold ensemble of a 3D ConvNeXt fine-tuned for COVID-19 (written by `finetune --task "
    "covid`)",
    "made locally with `python -m stoic_ct finetune DATA_DIR --task covid`",
    "yours (the ConvNeXt weights it started from: MIT)",
)
CONVNEXT_SEVERE = ModelFileSpec(
    FINE_TUNED_NAME.format(task="severe"),
    "the fold ensemble of a 3D ConvNeXt fine-tuned for severe COVID-19 (`finetune --task severe`)",
    "made locally with `python -m stoic_ct finetune DATA_DIR --task severe`",
    "yours (the ConvNeXt weights it started from: MIT)",
)
ENSEMBLE_WEIGHTS = ModelFileSpec(
    "ensemble.json",
    'the weights of `--system ensemble`: {"covid": {"balaitous": w, "convnext3d": w}, '
    '"severe": {...}}',
    "made locally with `python -m stoic_ct fit-ensemble` (or train.py --system ensemble)",
    "yours",
)
# The systems a model folder can hold and `--system` chooses: the published Balaitous, the
# fine-tuned 3D ConvNeXt, and the ensemble of those two members (ensemble.json).
SYSTEMS = ("balaitous", "convnext3d", "ensemble")
ENSEMBLE_MEMBERS = ("balaitous", "convnext3d")
# What a model folder holds, and where it came from (stoic_ct.weights.system_record). A
# folder without it holds the published Balaitous files.
SYSTEM_RECORD = ModelFileSpec(
    "system.json",
    "the model folder's record: the system it holds (balaitous, convnext3d or ensemble), "
    "its encoder choice, the files that system needs and where they came from",
    "written by train.py, fit-heads and install-heads into a model folder, and by "
    "fit-ensemble --model-dir",
    "yours",
)


def system_files(system: str, encoder: str = "vit") -> tuple[ModelFileSpec, ...]:
    """The model files `system` (one of SYSTEMS) needs with the encoder choice `encoder`.

    Raises:
        ValueError: for an unknown system or encoder.
    """
    kind = encoder_kind(encoder)
    balaitous = (*kind.files, R231, kind.heads)
    convnext = (CONVNEXT_COVID, CONVNEXT_SEVERE)
    needs = {
        "balaitous": balaitous,
        "convnext3d": convnext,
        "ensemble": (*balaitous, *convnext, ENSEMBLE_WEIGHTS),
    }
    if system not in needs:
        raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, not {system!r}")
    return needs[system]


def default_model_dir(
    container_dir: Path = CONTAINER_MODEL_DIR, baked_dir: Path = REPOSITORY_MODEL_DIR
) -> Path:
    """Where the model files are when no folder is given.

    `/opt/ml/model` (grand-challenge extracts the model tarball there; test.sh mounts the
    model folder there) when it holds any of the model files, else the repository's
    `model/` (in the image: the files baked in by build.sh --bake-model).

    Raises:
        ModelFileError: in the image (`container_dir` exists) when neither folder holds
            any model file, with how to provide them.
    """
    if _holds_model_files(container_dir):
        return container_dir
    if container_dir.is_dir() and not _holds_model_files(baked_dir):
        raise ModelFileError(
            "holds no model files, and none are baked into the image: mount the model "
            "folder here, read-only (grand-challenge extracts the uploaded model tarball "
            "here), or build the image with ./build.sh --bake-model",
            container_dir,
        )
    return baked_dir


def _holds_model_files(directory: Path) -> bool:
    try:
        return any((directory / spec.name).exists() for spec in ALL_FILES)
    except OSError:
        return False


@dataclass(frozen=True)
class ModelFiles:
    """The model files of one model directory."""

    directory: Path

    def path(self, spec: ModelFileSpec) -> Path:
        """Where `spec` must be; raises ModelFileError when it is not there."""
        path = self.directory / spec.name
        try:
            is_file = path.is_file()
        except OSError as error:
            raise ModelFileError(
                problem(spec, f"cannot be reached ({error.strerror})"), path
            ) from None
        if not is_file:
            raise ModelFileError(problem(spec, "is missing"), path)
        if not os.access(path, os.R_OK):
            raise ModelFileError(problem(spec, "is not readable by this user"), path)
        return path

    @property
    def r231(self) -> Path:
        return self.path(R231)

    @property
    def random_recipe(self) -> str | None:
        """How the random weights here were made; None for real ones (or an old marker)."""
        try:
            text = (self.directory / RANDOM_WEIGHTS_MARKER).read_text(encoding="utf-8")
        except OSError:
            return None
        recipes = [
            line.removeprefix(RECIPE_PREFIX)
            for line in text.splitlines()
            if line.startswith(RECIPE_PREFIX)
        ]
        return recipes[0] if recipes else None

    @property
    def are_random(self) -> bool:
        """True when the directory holds randomly initialised weights (a setup check only)."""
        try:
            return (self.directory / RANDOM_WEIGHTS_MARKER).exists()
        except OSError:  # an unreadable folder: path() reports it, for the file it needs
            return False


def problem(spec: ModelFileSpec, what: str) -> str:
    """One line: what is wrong with a model file, what it should be, and where to get it."""
    return f"{what}; expected {spec.description}, published at {spec.url}"


MANIFEST = "MANIFEST"


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, str]:
    """File name -> sha256 from `directory/MANIFEST` (sha256sum format); {} when absent.

    Raises:
        ModelFileError: when a line is not "<64 hex digits>  <name>".
    """
    path = directory / MANIFEST
    if not path.exists():
        return {}
    digests = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise ModelFileError(f"line {number} is not '<sha256>  <file name>': {line!r}", path)
        digests[name.strip()] = digest
    return digests


def write_manifest(directory: Path, digests: dict[str, str]) -> Path:
    """Write `directory/MANIFEST` atomically, in the order of ALL_FILES, then any others."""
    order = [spec.name for spec in ALL_FILES if spec.name in digests]
    order += sorted(name for name in digests if name not in order)
    text = "".join(f"{digests[name]}  {name}\n" for name in order)
    return atomic_write_text(directory / MANIFEST, text)


def update_manifest(directory: Path, digests: dict[str, str], forget: Collection[str] = ()) -> Path:
    """Merge `digests` into `directory/MANIFEST`: the lines it had stay while their file is
    there, unless named in `forget` (files whose digests the caller decides alone)."""
    kept = {
        name: digest
        for name, digest in read_manifest(directory).items()
        if name not in forget and (directory / name).is_file()
    }
    return write_manifest(directory, kept | digests)
