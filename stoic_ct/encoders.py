"""Slice encoders: a stack of axial slices to one feature vector (DESIGN.md section 3, 8-11).

Each slice is windowed to [-1024, 600] HU, scaled to [0, 1], replicated to three
channels and normalised with the ImageNet mean and std; the feature is the CLS token
after the last block, averaged over the slices, then averaged with the same for the
vertically flipped slices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from stoic_ct.vit import VisionTransformer

HU_WINDOW = (-1024.0, 600.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_model_input(
    slices: np.ndarray, device: torch.device, window: tuple[float, float] = HU_WINDOW
) -> torch.Tensor:
    """(H, W, Z) HU -> (Z, 3, H, W) float32 on `device`, windowed and ImageNet-normalised."""
    low, high = window
    hu = torch.from_numpy(np.ascontiguousarray(slices.transpose(2, 0, 1))).to(device)
    scaled = (hu.to(torch.float32).clamp(low, high) - low) / (high - low)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return (scaled.unsqueeze(1) - mean) / std


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Full float32 precision on a GPU: no TF32 in convolutions or matrix products.

    PyTorch lets cuDNN convolutions use TF32 by default on Ampere and later GPUs, which
    moves features by ~1e-3; the exact mode must give the CPU's numbers.
    """
    previous = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous[0]
        torch.set_float32_matmul_precision(previous[1])


class SliceEncoder:
    """A frozen ViT on a device, turning a slice stack into one flip-averaged feature."""

    def __init__(
        self, model: VisionTransformer, device: torch.device, batch_size: int | None = None
    ) -> None:
        self.model = model.to(device)
        self.device = device
        self.batch_size = batch_size or (64 if device.type == "cuda" else 16)

    @property
    def dim(self) -> int:
        """Length of the feature vector."""
        return self.model.config.embed_dim

    @torch.inference_mode()
    @exact_float32()
    def __call__(self, slices: np.ndarray) -> np.ndarray:
        """(H, W, Z) HU, Z >= 1 -> (D,) float64 feature.

        Slices go through the model in batches of `batch_size`, each with its vertical
        flip (rows reversed) in the same batch.
        """
        if slices.ndim != 3 or slices.shape[2] == 0:
            raise ValueError(f"expected (H, W, Z) slices with Z >= 1, not shape {slices.shape}")
        total = torch.zeros(2, self.dim, dtype=torch.float64, device=self.device)
        for start in range(0, slices.shape[2], self.batch_size):
            batch = to_model_input(slices[..., start : start + self.batch_size], self.device)
            both = torch.cat((batch, batch.flip(2)))
            cls = self.model(both).to(torch.float64).view(2, len(batch), self.dim)
            total += cls.sum(dim=1)
        per_flip = total / slices.shape[2]
        feature: np.ndarray = per_flip.mean(dim=0).cpu().numpy()
        return feature
