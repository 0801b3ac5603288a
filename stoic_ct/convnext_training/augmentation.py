"""3D augmentations for fine-tuning the ConvNeXt: seeded, composable, on the volume's device.

Every transform takes an image (C, D, H, W) float, an optional label map (K, D, H, W)
(lesion masks for segmentation; spatial transforms move it with the image, nearest
neighbour) and a `torch.Generator` on the image's device, and returns both. All random
draws come from that generator, so a sample's augmentation is fixed by its seed: a
resumed training run sees exactly what an uninterrupted one saw. Axes are (D, H, W) =
(axial slice, row, column) of the (z, y, x) volume; "axial plane" is (H, W).

`paper_augmentation` composes them with the settings of Kienzle et al.
(docs/explanation/pipeline.md, section 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

Pair = tuple[torch.Tensor, torch.Tensor | None]


class Transform(Protocol):
    """One augmentation: (image, labels or None, generator) -> both transformed."""

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None, g: torch.Generator
    ) -> Pair: ...


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def _chance(generator: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=generator, device=generator.device)) < p


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], not {p}")


def _check_range(name: str, values: tuple[float, float]) -> None:
    low, high = values
    if not 0.0 <= low <= high:
        raise ValueError(f"{name} must be a range (low, high) with 0 <= low <= high, not {values}")


def gaussian_kernel(sigma: float, radius: int, device: torch.device) -> torch.Tensor:
    """(2 radius + 1,) float32 Gaussian weights summing to 1; sigma and radius in voxels."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def separable_gaussian(x: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """Gaussian smoothing of (N, C, D, H, W) as three 1D convolutions (edges replicated).

    Three passes of k taps instead of one of k^3: what makes a sigma-35 elastic field cheap.
    """
    if sigma <= 0:
        return x
    n, c = x.shape[:2]
    out = x.reshape(n * c, 1, *x.shape[2:])
    for axis in range(3):
        radius = max(1, min(int(truncate * sigma + 0.5), out.shape[2 + axis] - 1))
        kernel = gaussian_kernel(sigma, radius, x.device).to(x.dtype)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        padding = [0, 0, 0, 0, 0, 0]
        padding[2 * (2 - axis)] = padding[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, padding, mode="replicate"), kernel.reshape(shape))
    return out.reshape(x.shape)


def _voxel_grid(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """(D, H, W, 3) float32 voxel coordinates (d, h, w) of every voxel."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _resample(image: torch.Tensor, coords: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample (C, D, H, W) at (D', H', W', 3) voxel coordinates (d, h, w); zeros outside."""
    sizes = torch.tensor(image.shape[1:], dtype=coords.dtype, device=coords.device)
    normalised = 2.0 * coords / (sizes - 1).clamp(min=1) - 1.0
    grid = normalised.flip(-1)[None]  # grid_sample wants (x, y, z) = (w, h, d)
    out = F.grid_sample(
        image[None].to(torch.float32), grid, mode=mode, padding_mode="zeros", align_corners=True
    )
    return out[0].to(image.dtype)


def _warp(image: torch.Tensor, mask: torch.Tensor | None, coords: torch.Tensor) -> Pair:
    warped = _resample(image, coords, "bilinear")  # trilinear on 5D input
    return warped, None if mask is None else _resample(mask, coords, "nearest")


@dataclass(frozen=True)
class RandomFlip:
    """Flip along each of `axes` (0 = D, 1 = H, 2 = W) independently with probability p."""

    axes: tuple[int, ...] = (0, 1, 2)
    p: float = 0.5

    def __post_init__(self) -> None:
        _check_probability(self.p)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, g: torch.Generator) -> Pair:
        dims = [1 + axis for axis in self.axes if _chance(g, self.p)]
        if not dims:
            return image, mask
        return image.flip(dims), None if mask is None else mask.flip(dims)


@dataclass(frozen=True)
class GaussianNoise:
    """Add N(0, s^2) noise, s drawn from `std` in units of the image's own standard deviation.

    The paper's std 0.6-0.8 is on its normalised input; relative to the volume's spread the
    setting means the same whatever the intensity scaling. Values leave their range: noise.
    """

    std: tuple[float, float] = (0.6, 0.8)
    p: float = 0.5

    def __post_init__(self) -> None:
        _check_probability(self.p)
        _check_range("std", self.std)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, g: torch.Generator) -> Pair:
        if self.std[1] == 0 or not _chance(g, self.p):
            return image, mask
        scale = _uniform(g, *self.std) * float(image.float().std())
        noise = torch.randn(image.shape, generator=g, device=image.device, dtype=image.dtype)
        return image + scale * noise, mask


@dataclass(frozen=True)
class GaussianBlur:
    """Smooth with a Gaussian of sigma (voxels) drawn from `sigma`."""

    sigma: tuple[float, float] = (0.5, 1.5)
    p: float = 0.2

    def __post_init__(self) -> None:
        _check_probability(self.p)
        _check_range("sigma", self.sigma)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, g: torch.Generator) -> Pair:
        if self.sigma[1] == 0 or not _chance(g, self.p):
            return image, mask
        return separable_gaussian(image[None], _uniform(g, *self.sigma))[0], mask


@dataclass(frozen=True)
class RotateAxial:
    """Rotate about the volume's centre in the axial (H, W) plane by up to `degrees`."""

    degrees: float = 30.0
    p: float = 0.5

    def __post_init__(self) -> None:
        _check_probability(self.p)
        if self.degrees < 0:
            raise ValueError(f"degrees must be >= 0, not {self.degrees}")

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, g: torch.Generator) -> Pair:
        if self.degrees == 0 or not _chance(g, self.p):
            return image, mask
        angle = math.radians(_uniform(g, -self.degrees, self.degrees))
        h, w = image.shape[2:]
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=image.device) - (h - 1) / 2,
            torch.arange(w, dtype=torch.float32, device=image.device) - (w - 1) / 2,
            indexing="ij",
        )
        cos, sin = math.cos(angle), math.sin(angle)
        # One (H, W) grid for every axial slice: slices are the batch of a 2D grid_sample.
        source_w = (sin * ys + cos * xs) / max((w - 1) / 2, 1)
        source_h = (cos * ys - sin * xs) / max((h - 1) / 2, 1)
        grid = torch.stack([source_w, source_h], dim=-1)[None]

        def turn(x: torch.Tensor, mode: str) -> torch.Tensor:
            slices = x.to(torch.float32).movedim(1, 0)  # (D, C, H, W)
            out = F.grid_sample(
                slices, grid.expand(len(slices), -1, -1, -1), mode=mode, align_corners=True
            )
            return out.movedim(0, 1).to(x.dtype)

        return turn(image, "bilinear"), None if mask is None else turn(mask, "nearest")


@dataclass(frozen=True)
class ElasticDeform:
    """Smooth random displacement: uniform noise per axis, Gaussian-smoothed (separable).

    The smoothed field is scaled so that its largest displacement is alpha voxels, alpha
    drawn from `alpha`; sigma is in voxels (the paper: alpha in (1, 7), sigma 35, p 0.5).
    The field is computed at 1/`coarse` resolution and upsampled: smooth either way.
    """

    alpha: tuple[float, float] = (1.0, 7.0)
    sigma: float = 35.0
    p: float = 0.5
    coarse: int = 4

    def __post_init__(self) -> None:
        _check_probability(self.p)
        _check_range("alpha", self.alpha)
        if self.sigma <= 0 or self.coarse < 1:
            raise ValueError(f"sigma must be > 0 and coarse >= 1, not {self.sigma}, {self.coarse}")

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, g: torch.Generator) -> Pair:
        if self.alpha[1] == 0 or not _chance(g, self.p):
            return image, mask
        alpha = _uniform(g, *self.alpha)
        shape = image.shape[1:]
        small = [max(2, -(-n // self.coarse)) for n in shape]
        noise = torch.rand((1, 3, *small), generator=g, device=image.device) * 2 - 1
        field = separable_gaussian(noise, self.sigma / self.coarse)
        field = F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)[0]
        field = field * (alpha / field.abs().amax().clamp(min=1e-12))
        coords = _voxel_grid(shape, image.device) + field.movedim(0, -1)
        return _warp(image, mask, coords)


@dataclass(frozen=True)
class RandomReorient90:
    """For each axis, with probability p, turn the volume 90, 180 or 270 deg about it.

    The plane turned must be square (the model's cubes are), so shapes are kept.
    """

    p: float = 0.25

    def __post_init__(self) -> None:
        _check_probability(self.p)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, g: torch.Generator) -> Pair:
        for axis in range(3):
            if not _chance(g, self.p):
                continue
            plane = [1 + a for a in range(3) if a != axis]
            if image.shape[plane[0]] != image.shape[plane[1]]:
                raise ValueError(
                    f"RandomReorient90 needs square planes; axis {axis} of {tuple(image.shape)}"
                )
            turns = 1 + int(torch.randint(0, 3, (), generator=g, device=g.device))
            image = image.rot90(turns, plane)
            mask = None if mask is None else mask.rot90(turns, plane)
        return image, mask


@dataclass(frozen=True)
class RandomCropOfResize:
    """With probability p, resize by `scale` (256/224: the paper's 256^3) and crop back randomly.

    The output has the input's shape; the crop's corner is uniform over the valid range.
    """

    scale: float = 256 / 224
    p: float = 0.5

    def __post_init__(self) -> None:
        _check_probability(self.p)
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, not {self.scale}")

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, g: torch.Generator) -> Pair:
        if self.scale == 1 or not _chance(g, self.p):
            return image, mask
        shape = image.shape[1:]
        big = tuple(round(n * self.scale) for n in shape)
        corner = [
            int(torch.randint(0, b - n + 1, (), generator=g, device=g.device))
            for b, n in zip(big, shape, strict=True)
        ]
        window = tuple(slice(c, c + n) for c, n in zip(corner, shape, strict=True))
        resized = F.interpolate(image[None].float(), size=big, mode="trilinear", align_corners=True)
        out = resized[0].to(image.dtype)[(slice(None), *window)]
        if mask is not None:
            labels = F.interpolate(mask[None].float(), size=big, mode="nearest")[0].to(mask.dtype)
            mask = labels[(slice(None), *window)]
        return out.contiguous(), None if mask is None else mask.contiguous()


@dataclass(frozen=True)
class Compose:
    """The transforms in order, all drawing from one generator seeded per sample."""

    transforms: Sequence[Transform]

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, seed: int) -> Pair:
        """(C, D, H, W) image and optional (K, D, H, W) labels -> both augmented."""
        generator = torch.Generator(device=image.device).manual_seed(seed)
        for transform in self.transforms:
            image, mask = transform(image, mask, generator)
        return image, mask


def paper_augmentation() -> Compose:
    """Kienzle et al.'s training augmentation (docs/explanation/pipeline.md, section 3), in our
    order."""
    return Compose(
        (
            RandomCropOfResize(256 / 224, p=0.5),
            RandomFlip((0, 1, 2), p=0.5),
            RandomReorient90(p=0.25),
            RotateAxial(30.0, p=0.5),
            ElasticDeform((1.0, 7.0), sigma=35.0, p=0.5),
            GaussianBlur((0.5, 1.5), p=0.2),
            GaussianNoise((0.6, 0.8), p=0.5),
        )
    )


def orientation_augmentation() -> Compose:
    """Flips on every axis and 90-degree turns only: exact, no interpolation, no noise.

    For small cohorts and quick checks, where the paper's heavy augmentation drowns what
    a few patients can teach.
    """
    return Compose((RandomFlip((0, 1, 2), p=0.5), RandomReorient90(p=0.25)))


AUGMENTATIONS = ("paper", "orientation", "none")


def augmentation(name: str) -> Compose | None:
    """The named preset: "paper", "orientation" or "none" (None: no augmentation)."""
    if name == "paper":
        return paper_augmentation()
    if name == "orientation":
        return orientation_augmentation()
    if name == "none":
        return None
    raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, not {name!r}")
