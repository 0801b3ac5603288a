"""A CT volume as the 3D ConvNeXt takes it: HU windowed to [0, 1], resized to a cube.

The resize is scipy's cubic-spline zoom (`scipy.ndimage.zoom(order=3, mode="nearest")`,
the corners of input and output grids aligned). Spline interpolation is linear and
separable, so it is one (out, in) matrix per axis, which this module takes from scipy
once per size (the zoom of each unit vector) and applies as three matrix products on the
volume's device: on a GPU the resize of a 512 x 512 x 300 scan is a few milliseconds, and
its values are scipy's up to float32 rounding.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from stoic_ct.io.volume import Volume
from stoic_ct.preprocessing.cropping import HU_WINDOW

DEFAULT_WINDOW = HU_WINDOW  # ours: the ViT encoders' window (not published for the ConvNeXt)
DEFAULT_SIZE = 224


@lru_cache(maxsize=32)
def spline_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64: column j is the cubic-spline zoom of the j-th unit vector."""
    if n_in == 1:
        return np.ones((n_out, 1))
    return ndimage.zoom(np.eye(n_in), (n_out / n_in, 1.0), order=3, mode="nearest")


def resize_cubic(voxels: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """(D, H, W) -> `size`, cubic spline, on the tensor's device and in its float dtype."""
    out = voxels
    for axis, n_out in enumerate(size):
        matrix = torch.as_tensor(
            spline_matrix(out.shape[axis], n_out), dtype=out.dtype, device=out.device
        )
        out = torch.tensordot(matrix, out.movedim(axis, 0), dims=1).movedim(0, axis)
    return out


def to_cube(
    hu: torch.Tensor, size: int = DEFAULT_SIZE, window: tuple[float, float] = DEFAULT_WINDOW
) -> torch.Tensor:
    """(D, H, W) HU -> (size, size, size) float32 in [0, 1]: windowed, then resized."""
    low, high = window
    scaled = (hu.to(torch.float32).clamp(low, high) - low) / (high - low)
    return resize_cubic(scaled, (size, size, size)).clamp(0.0, 1.0)


def prepare_volume(
    volume: Volume,
    device: torch.device,
    size: int = DEFAULT_SIZE,
    window: tuple[float, float] = DEFAULT_WINDOW,
    mask: np.ndarray | None = None,
) -> torch.Tensor:
    """(1, 1, size, size, size) float32 in [0, 1] on `device`, from a CT in HU.

    Args:
        volume: (z, y, x) HU; resampled as it is (its voxel grid becomes the cube).
        mask: optional (z, y, x) bool lung mask on the same grid; voxels outside are set to
            air (the window's low end) before the resize.
    """
    hu = torch.tensor(np.asarray(volume.voxels), dtype=torch.float32, device=device)
    if mask is not None:
        air = torch.tensor(window[0], device=device)
        hu = torch.where(torch.as_tensor(mask, device=device), hu, air)
    return to_cube(hu, size, window)[None, None]


def canonical(volume: Volume) -> Volume:
    """The volume turned (axis permutations and flips only, no interpolation) to LPS.

    The fine-tuned classifier sees every scan in one orientation, whatever its header says.
    """
    return Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), "LPS"))


def classifier_input(
    volume: Volume,
    size: int,
    window: tuple[float, float] = DEFAULT_WINDOW,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(1, size, size, size) float32 in [0, 1]: the whole scan, canonical, windowed, resized.

    What the fine-tuned ConvNeXt takes, in training (cached) and at inference alike.
    """
    return prepare_volume(canonical(volume), device or torch.device("cpu"), size, window)[0]


def label_cube(labels: Volume, size: int) -> torch.Tensor:
    """(1, size, size, size) uint8 from a 0/1 mask on the scan grid, moved as the scan is."""
    mask = torch.as_tensor(np.asarray(canonical(labels).voxels) > 0).to(torch.float32)
    return (resize_cubic(mask, (size, size, size)) > 0.5).to(torch.uint8)[None]
