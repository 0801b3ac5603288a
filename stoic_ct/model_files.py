"""The one place that knows the model files: their names, sources, licences and checks.

A model directory holds the four files under their published names. Every loader goes
through `ModelFiles`, so a missing or malformed file always stops the run with a message
that names the file, what was expected and where it is published.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from stoic_ct.errors import ModelFileError

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
CONTAINER_MODEL_DIR = Path("/opt/ml/model")
REPOSITORY_MODEL_DIR = REPOSITORY_ROOT / "model"
# Written beside randomly initialised weights, so that no one mistakes them for the real ones.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"


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
    "https://pypi.org/project/balaitous/1.2/ (in the wheel: assets/balaitous.npz)",
    "MIT (Balaitous)",
)
ALL_FILES = (VIT_CT, VIT_IMAGENET, R231, HEADS)


def default_model_dir(container_dir: Path = CONTAINER_MODEL_DIR) -> Path:
    """Where the model files are when no folder is given.

    `/opt/ml/model` (grand-challenge extracts the model tarball there) when it holds any
    of the model files, else the repository's `model/` (the files baked into the image).
    """
    try:
        uploaded = any((container_dir / spec.name).exists() for spec in ALL_FILES)
    except OSError:
        uploaded = False
    return container_dir if uploaded else REPOSITORY_MODEL_DIR


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
    def vit_ct(self) -> Path:
        return self.path(VIT_CT)

    @property
    def vit_imagenet(self) -> Path:
        return self.path(VIT_IMAGENET)

    @property
    def r231(self) -> Path:
        return self.path(R231)

    @property
    def heads(self) -> Path:
        return self.path(HEADS)

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


def load_state_dict(
    path: Path, spec: ModelFileSpec, *, key: str | None = None
) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, memory-mapped (read from disk only when used).

    Args:
        key: the entry holding the state dict when the file wraps it, e.g. "state_dict";
            a file without that entry is taken as the state dict itself.

    Raises:
        ModelFileError: when the file is not a PyTorch checkpoint of tensors.
    """
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # A checkpoint in PyTorch's legacy (pre-1.6) format cannot be memory-mapped.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        ValueError,
    ) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(problem(spec, f"cannot be loaded ({reason[:200]})"), path) from None
    if key is not None and isinstance(loaded, Mapping) and key in loaded:
        loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ModelFileError(problem(spec, "does not hold a state dict of tensors"), path)
    return dict(loaded)


def check_shapes(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    path: Path,
    spec: ModelFileSpec,
    *,
    allow_unexpected: bool = True,
) -> None:
    """Raise ModelFileError listing missing, wrongly shaped and (optionally) unexpected tensors."""
    details = []
    missing = [k for k in expected if k not in state_dict]
    if missing:
        details.append(f"{len(missing)} missing tensors ({_some(missing)})")
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} instead of {shape}"
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != shape
    ]
    if wrong:
        details.append(f"wrong shapes ({_some(wrong)})")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected and not allow_unexpected:
        details.append(f"{len(unexpected)} unexpected tensors ({_some(unexpected)})")
    if details:
        message = "does not match the architecture: " + ", ".join(details)
        raise ModelFileError(problem(spec, message), path)


def _some(items: list[str], shown: int = 4) -> str:
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")


def check_r231_weights(path: Path) -> None:
    """Check that `path` holds lungmask's R231 U-Net weights (keys and shapes).

    lungmask loads the file strictly, so unexpected tensors are an error too; batch-norm
    counters, which old checkpoints lack and PyTorch fills in, are not required.
    """
    from lungmask.resunet import UNet

    with torch.device("meta"):
        reference = UNet(
            n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False
        )
    expected = {
        k: tuple(v.shape)
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    state_dict = {
        k: v
        for k, v in load_state_dict(path, R231).items()
        if not k.endswith("num_batches_tracked")
    }
    check_shapes(state_dict, expected, path, R231, allow_unexpected=False)
