"""The one value that carries a volume between stages, and its only SimpleITK crossing.

SimpleITK indexes images (x, y, z); numpy arrays taken from them are (z, y, x). The
conversion happens here and nowhere else: every other module sees a `Volume` whose
`voxels` are (z, y, x) and whose geometry is in SimpleITK's (x, y, z) order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

Vector3 = tuple[float, float, float]


@dataclass(frozen=True)
class Volume:
    """A 3D scalar image with its physical geometry.

    Attributes:
        voxels: (z, y, x) array: HU for a CT, integer labels for a mask.
        spacing: voxel size in mm, (x, y, z).
        origin: physical position of voxel (0, 0, 0) in mm, (x, y, z).
        direction: 3x3 direction cosines, row-major, as SimpleITK stores them.
    """

    voxels: np.ndarray
    spacing: Vector3
    origin: Vector3
    direction: tuple[float, ...]
    # The SimpleITK image the voxels are a read-only view of, when there is one: it is
    # handed back by to_sitk, so that no stage copies a volume in and out of SimpleITK.
    image: sitk.Image | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.voxels.ndim != 3:
            raise ValueError(f"Volume voxels must be 3D (z, y, x), not shape {self.voxels.shape}")
        if len(self.direction) != 9:
            raise ValueError(f"Volume direction must have 9 cosines, not {len(self.direction)}")

    @property
    def size(self) -> tuple[int, int, int]:
        """Number of voxels along (x, y, z), as SimpleITK reports it."""
        z, y, x = self.voxels.shape
        return (x, y, z)

    def with_voxels(self, voxels: np.ndarray) -> Volume:
        """The same geometry holding other (z, y, x) voxels of the same shape."""
        if voxels.shape != self.voxels.shape:
            raise ValueError(f"voxels of shape {voxels.shape} do not fit {self.voxels.shape}")
        return Volume(voxels, self.spacing, self.origin, self.direction)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        """A Volume over a 3D scalar SimpleITK image: its voxels a read-only view, no copy,
        that keeps the image alive (SimpleITK's own view does not: a view taken from a
        Volume that is then dropped would read freed memory)."""
        return cls(
            voxels=np.asarray(_Pinned(sitk.GetArrayViewFromImage(image), image)),
            spacing=_vector3(image.GetSpacing()),
            origin=_vector3(image.GetOrigin()),
            direction=tuple(float(c) for c in image.GetDirection()),
            image=image,
        )

    def __reduce__(self) -> tuple[type[Volume], tuple[object, ...]]:
        # Sent to another process (a cohort's worker), the voxels go alone, as an array.
        voxels = np.array(self.voxels)
        return type(self), (voxels, self.spacing, self.origin, self.direction)

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with these voxels (same pixel type) and geometry."""
        if self.image is not None:
            return self.image
        image = sitk.GetImageFromArray(self.voxels)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


class _Pinned:
    """An array interface that holds the image its memory belongs to: numpy keeps it as the
    base of the array made from it, so the image lives as long as any view of it."""

    def __init__(self, view: np.ndarray, image: sitk.Image) -> None:
        self.__array_interface__ = view.__array_interface__
        self.view, self.image = view, image


def _vector3(values: tuple[float, ...]) -> Vector3:
    x, y, z = (float(v) for v in values)
    return (x, y, z)
