"""Test helpers: a deterministic lung segmenter, tiny models, the published package's harness."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from stoic_ct.phantom import PhantomSpec, make_phantom, write_phantom
from stoic_ct.vit import ViTConfig
from stoic_ct.volume import Volume

# 24 blocks so that both encoders can be built from it; 64 channels keep it fast on a CPU.
TINY_VIT = ViTConfig(embed_dim=64, depth=24, num_heads=1, mlp_hidden=128)

# Small phantoms that still span the 224 crop on one axis and pad the other.
SMALL_PHANTOM = PhantomSpec(size=(96, 80, 16), spacing=(3.6, 3.0, 6.0), origin=(-170, -120, -48))


def threshold_segmenter(volume: Volume) -> np.ndarray:
    """Lung labels by thresholding: air (< -500 HU) enclosed by the body in each axial slice.

    Label 1 in the half of the columns with smaller x index, 2 in the other half. The
    trachea is labelled too, so the published mask cleaning has something to remove.
    Deterministic and fast: the stand-in for the U-Net in differential tests.
    """
    voxels = volume.voxels
    labels = np.zeros(voxels.shape, dtype=np.uint8)
    for k in range(voxels.shape[0]):
        body = ndimage.binary_fill_holes(voxels[k] > -500)
        labels[k][body & (voxels[k] < -500)] = 1
    half = voxels.shape[2] // 2
    labels[..., half:][labels[..., half:] == 1] = 2
    return labels


def write_case(root: Path, spec: PhantomSpec = SMALL_PHANTOM, name: str = "1234.mha") -> Path:
    """A STOIC input folder at `root` with one phantom under images/ct/; returns the image path."""
    image_dir = root / "images" / "ct"
    image_dir.mkdir(parents=True, exist_ok=True)
    path = image_dir / name
    write_phantom(make_phantom(spec), str(path), spec)
    return path


def write_image(
    path: Path, voxels: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0), **metadata: str
) -> Path:
    """Write an array (SimpleITK axis order reversed) as an image, with header keys."""
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(spacing)
    for key, value in metadata.items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(path))
    return path


def published_heads_path() -> Path:
    """balaitous.npz as installed by the balaitous 1.2 wheel (site-packages/assets/)."""
    spec = importlib.util.find_spec("balaitous")
    assert spec is not None and spec.origin is not None, "balaitous==1.2 is not installed"
    path = Path(spec.origin).resolve().parents[1] / "assets" / "balaitous.npz"
    assert path.is_file(), f"{path} is missing from the balaitous wheel"
    return path


def install_compose_for_balaitous() -> None:
    """Let `balaitous` import without torchvision.

    balaitous imports only `torchvision.transforms.Compose`, a left-to-right composition of
    callables. torchvision's PyPI wheels link CUDA libraries and cannot import beside the
    CPU-only torch of this project, so the harness supplies that one class.
    """
    if "torchvision.transforms" in sys.modules:
        return

    class Compose:
        def __init__(self, transforms: list[Callable[[Any], Any]]) -> None:
            self.transforms = transforms

        def __call__(self, sample: Any) -> Any:
            for transform in self.transforms:
                sample = transform(sample)
            return sample

    torchvision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = Compose  # type: ignore[attr-defined]
    torchvision.transforms = transforms  # type: ignore[attr-defined]
    sys.modules["torchvision"] = torchvision
    sys.modules["torchvision.transforms"] = transforms


def unprivileged(command: list[str]) -> list[str]:
    """`command` run as `nobody` when we are root, as the container's non-root user would."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command]


def contained(command: list[str]) -> list[str]:
    """`command` as the container runs it: a non-root user and no network.

    The command gets a network namespace of its own (only a loopback that is down); as
    root it then drops to `nobody`, else it keeps the current, unprivileged user.
    """
    if os.geteuid() == 0:
        return ["unshare", "--net", *unprivileged(command)]
    return ["unshare", "--net", "--map-current-user", *command]
