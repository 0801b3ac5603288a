"""Storage order: every scan reoriented to the one STOIC uses before the published steps.

STOIC stores its scans in LPS with an identity direction: voxel index x runs to the
patient's left, y to the back, z to the head. The published pipeline feeds the voxel array
as stored, so a scan stored flipped in-plane (common in NIfTI) or with another slice axis
would reach the encoders mirrored, rotated or sliced the wrong way, and a sagittal scan
would be resampled with 5 mm along the wrong axis. Reorienting is exact: a permutation and
flips of the voxel axes (SimpleITK's DICOMOrient), no interpolation; the physical position
of every voxel is kept. A scan already in LPS is returned as it is, so STOIC's scans reach
the published steps unchanged. An oblique scan is brought to the nearest LPS order; its
direction stays oblique, as the published resampling keeps it.
"""

from __future__ import annotations

from typing import Literal

import SimpleITK as sitk

from stoic_ct.io.volume import Volume

Orientation = Literal["canonical", "as-stored"]
ORIENTATIONS: tuple[Orientation, ...] = ("canonical", "as-stored")
CANONICAL = "LPS"


def orientation_code(volume: Volume) -> str:
    """The three letters naming where each voxel axis (x, y, z) points, e.g. "LPS", "RAS"."""
    code: str = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(volume.direction)
    return code


def to_canonical(volume: Volume) -> Volume:
    """`volume` with its voxel axes permuted and flipped into LPS order (no interpolation)."""
    if orientation_code(volume) == CANONICAL:
        return volume
    return Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), CANONICAL))
