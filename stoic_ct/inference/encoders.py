"""The frozen encoders: a stack of axial slices to one feature vector (docs/explanation/pipeline.md,
Balaïtous steps 8-11), and the one place that loads them for an --encoder choice.

`SliceEncoder` (the published ViTs): each slice is windowed to [-1024, 600] HU, scaled to
[0, 1], replicated to three channels and normalised with the ImageNet mean and std; the
feature is the CLS token after the last block, averaged over the slices, then averaged
with the same for the vertically flipped slices. `VolumeEncoder` (the frozen 3D ConvNeXt, `--encoder
convnext3d-frozen`) sees the same stack whole, as one volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from stoic_ct.inference.precision import (
    ModelSettings,
    check_precision,
    int8_linear,
    numerics,
    uses_int8,
)
from stoic_ct.models.convnext3d import ConvNeXt3D
from stoic_ct.models.vit import VisionTransformer
from stoic_ct.preprocessing.convnext_preprocessing import to_cube
from stoic_ct.preprocessing.cropping import HU_WINDOW
from stoic_ct.weights.checkpoints import release_file_pages
from stoic_ct.weights.model_files import (
    CONVNEXT3D,
    VIT_CT,
    VIT_IMAGENET,
    EncoderKind,
    ModelFiles,
    ModelFileSpec,
)
from stoic_ct.weights.network_files import load_convnext3d, load_vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The blocks of each published ViT that Balaitous runs: all 24 of the CT one, the first
# 16 of the ImageNet one.
VIT_BLOCKS = {VIT_CT: 24, VIT_IMAGENET: 16}
# Slices per ViT batch (each with its flip) by device type: a CPU's throughput is flat
# beyond 16; on a GPU, 32 keep the activations near 0.6 GB (float32, the memory model).
VIT_BATCH = {"cuda": 32, "cpu": 16}


class Encoder(Protocol):
    """A frozen encoder: (H, W, Z) HU slices -> (D,) float64 feature."""

    dim: int

    def __call__(self, slices: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class LoadedEncoders:
    """The "full" and "lung" encoders of one --encoder choice, with the files they came from.

    `full` sees the cropped slices, `lung` the same slices with everything outside the
    lungs set to -1024 HU; one network may serve as both.
    """

    full: Encoder
    lung: Encoder
    sources: dict[str, Path]


def load_encoders(kind: EncoderKind, files: ModelFiles, settings: ModelSettings) -> LoadedEncoders:
    """Load the encoders of `kind` from the model folder onto `settings.device`.

    Raises:
        ModelFileError: when a file is missing or malformed.
    """
    full, lung = files.path(kind.full), files.path(kind.lung)
    if kind.full == CONVNEXT3D:
        convnext, input_size = load_convnext3d(full)
        shared = VolumeEncoder(convnext, settings.device, input_size, settings.precision)
        return LoadedEncoders(shared, shared, {"full": full, "lung": lung})
    encoders = [
        SliceEncoder(
            load_vit(path, spec, VIT_BLOCKS[spec]),
            settings.device,
            settings.batch_size,
            settings.precision,
            weights=path,
        )
        for spec, path in ((kind.full, full), (kind.lung, lung))
    ]
    return LoadedEncoders(encoders[0], encoders[1], {"full": full, "lung": lung})


def feature_dim(spec: ModelFileSpec, path: Path) -> int:
    """The length of the features the encoder file `path` (a `spec` file) gives.

    Raises:
        ModelFileError: when the file cannot be read as `spec`.
    """
    if spec == CONVNEXT3D:
        return load_convnext3d(path)[0].feature_dim
    return load_vit(path, spec, depth=1).config.embed_dim


def to_model_input(
    slices: np.ndarray | torch.Tensor,
    device: torch.device,
    window: tuple[float, float] = HU_WINDOW,
) -> torch.Tensor:
    """(H, W, Z) HU -> (Z, 3, H, W) float32 on `device`, windowed and ImageNet-normalised."""
    low, high = window
    if isinstance(slices, np.ndarray):
        slices = torch.from_numpy(np.ascontiguousarray(slices))
    hu = slices.permute(2, 0, 1).contiguous().to(device)
    scaled = (hu.to(torch.float32).clamp(low, high) - low) / (high - low)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return (scaled.unsqueeze(1) - mean) / std


def flip_summed_features(
    model: nn.Module, slices: np.ndarray | torch.Tensor, device: torch.device
) -> torch.Tensor:
    """(H, W, B) HU -> (2, D) float64: the CLS features of the B slices, summed, and the
    same for their vertical flips (rows reversed), which run in the same batch."""
    batch = to_model_input(slices, device)
    both = torch.cat((batch, batch.flip(2)))
    cls: torch.Tensor = model(both)
    return cls.to(torch.float64).view(2, len(batch), -1).sum(dim=1)


class SliceEncoder:
    """A frozen ViT on a device, turning a slice stack into one flip-averaged feature.

    On a CPU the weights stay memory-mapped from `weights`, and their pages are released
    after every call: the two ViT-L encoders then never hold memory at the same time.
    """

    def __init__(
        self,
        model: VisionTransformer,
        device: torch.device,
        batch_size: int | None = None,
        precision: str = "exact",
        weights: Path | None = None,
    ) -> None:
        self.dim = model.config.embed_dim
        self.device, self.precision = device, check_precision(precision)
        self.batch_size = batch_size or VIT_BATCH[device.type]
        self.weights = weights if device.type == "cpu" else None
        self._mapped = list(model.state_dict().values()) if self.weights else []
        if uses_int8(device, precision):
            self.model: nn.Module = int8_linear(model)
            self._release()
        else:
            self.model = model.to(device)

    @torch.inference_mode()
    def __call__(self, slices: np.ndarray) -> np.ndarray:
        """(H, W, Z) HU, Z >= 1 -> (D,) float64 feature.

        Slices go through the model in batches of `batch_size`, each with its vertical
        flip (rows reversed) in the same batch.
        """
        if slices.ndim != 3 or slices.shape[2] == 0:
            raise ValueError(f"expected (H, W, Z) slices with Z >= 1, not shape {slices.shape}")
        total = torch.zeros(2, self.dim, dtype=torch.float64, device=self.device)
        with numerics(self.device, self.precision):
            for start in range(0, slices.shape[2], self.batch_size):
                chunk = slices[..., start : start + self.batch_size]
                total += flip_summed_features(self.model, chunk, self.device)
        self._release()
        per_flip = total / slices.shape[2]
        feature: np.ndarray = per_flip.mean(dim=0).cpu().numpy()
        return feature

    def _release(self) -> None:
        if self.weights is not None:
            release_file_pages(self._mapped, self.weights)


class VolumeEncoder:
    """A frozen 3D ConvNeXt on a device: a slice stack, as a volume, to one feature.

    It takes what the ViT encoders take, the (224, 224, Z) stack cropped around the lungs
    (masked or not), and sees it whole: windowed, resized with a cubic spline to
    `input_size` cubed, pooled to one (D,) feature.
    """

    def __init__(
        self,
        model: ConvNeXt3D,
        device: torch.device,
        input_size: int,
        precision: str = "exact",
    ) -> None:
        self.dim = model.feature_dim
        self.device, self.precision = device, check_precision(precision)
        self.input_size = input_size
        if uses_int8(device, precision):
            self.model: nn.Module = int8_linear(model)
        else:
            self.model = model.to(device)

    @torch.inference_mode()
    def __call__(self, slices: np.ndarray) -> np.ndarray:
        """(H, W, Z) HU, Z >= 1 -> (D,) float64 feature."""
        if slices.ndim != 3 or slices.shape[2] == 0:
            raise ValueError(f"expected (H, W, Z) slices with Z >= 1, not shape {slices.shape}")
        hu = torch.from_numpy(np.ascontiguousarray(slices.transpose(2, 0, 1))).to(self.device)
        with numerics(self.device, self.precision):
            feature = volume_feature(self.model, hu, self.input_size)
        out: np.ndarray = feature.cpu().numpy()
        return out


def volume_feature(model: nn.Module, hu: torch.Tensor, input_size: int) -> torch.Tensor:
    """(Z, H, W) HU on the model's device -> (D,) float64: the frozen ConvNeXt's feature of
    the stack resized to `input_size` cubed (the cube itself in float32, outside autocast)."""
    with torch.autocast(hu.device.type, enabled=False):
        cube = to_cube(hu, input_size, HU_WINDOW)
    feature: torch.Tensor = model(cube[None, None])
    return feature[0].to(torch.float64)
