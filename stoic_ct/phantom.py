"""Synthetic chest CT phantoms: body, two lungs, heart, spine, trachea and lesions, in HU.

The anatomy is laid out in physical (LPS) space, so a phantom with any spacing, size,
orientation and pixel type shows the same patient: the right lung at smaller x, the
spine posterior. Used for the shipped test case, the tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from stoic_ct.io.cohort import REFERENCE
from stoic_ct.io.volume import Vector3, Volume

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

AIR, LUNG, FAT, SOFT_TISSUE, BONE = -1000.0, -850.0, -100.0, 40.0, 500.0
GROUND_GLASS, CONSOLIDATION = -350.0, 20.0


@dataclass(frozen=True)
class PhantomSpec:
    """What to draw.

    Attributes:
        size: voxels along (x, y, z).
        spacing: mm along (x, y, z).
        direction: 3x3 row-major direction cosines.
        dtype: numpy pixel type of the voxels.
        lesion_burden: fraction of lung volume covered by lesions, in [0, 0.5].
        noise_hu: standard deviation of the Gaussian noise.
        age, sex: header values `PatientAge` (e.g. "065Y") and `PatientSex`, None to omit.
        seed: random seed for noise and lesion positions.
    """

    size: tuple[int, int, int] = (128, 128, 64)
    spacing: Vector3 = (2.8, 2.8, 5.0)
    direction: tuple[float, ...] = IDENTITY
    origin: Vector3 = (-179.2, -179.2, -160.0)
    dtype: type[np.generic] = np.int16
    lesion_burden: float = 0.05
    noise_hu: float = 15.0
    age: str | None = "065Y"
    sex: str | None = "M"
    seed: int = 0


def make_phantom(spec: PhantomSpec) -> Volume:
    """Draw the phantom: (z, y, x) voxels of `spec.dtype` in HU with `spec`'s geometry."""
    return make_phantom_with_lesions(spec)[0]


def make_phantom_with_lesions(spec: PhantomSpec) -> tuple[Volume, np.ndarray]:
    """The phantom and its (z, y, x) uint8 lesion mask (1 where a lesion was drawn)."""
    rng = np.random.default_rng(spec.seed)
    nx, ny, nz = spec.size
    direction = np.asarray(spec.direction, dtype=float).reshape(3, 3)
    origin = np.asarray(spec.origin, dtype=float)
    spacing = np.asarray(spec.spacing, dtype=float)
    corners = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)])
    physical_corners = origin + (corners * spacing) @ direction.T
    centre = physical_corners.mean(axis=0)
    half = np.maximum((physical_corners.max(axis=0) - physical_corners.min(axis=0)) / 2, 1.0)
    body = np.array([0.85 * half[0], 0.65 * half[1]])
    lesions = _lesions(rng, spec.lesion_burden, body, half)

    voxels = np.empty((nz, ny, nx), dtype=np.float32)
    lesion_mask = np.zeros((nz, ny, nx), dtype=np.uint8)
    jj, ii = np.mgrid[0:ny, 0:nx]
    for k in range(nz):
        index = np.stack([ii, jj, np.full_like(ii, k)], axis=-1) * spacing
        p = origin + index @ direction.T - centre  # (ny, nx, 3) mm from the centre, LPS
        # Noise slice by slice: the same stream as one volume-sized draw, in less memory.
        hu, lesion_mask[k] = _draw_slice(p, body, half, lesions)
        voxels[k] = hu + rng.normal(0.0, spec.noise_hu, (ny, nx))
    if np.issubdtype(spec.dtype, np.integer):
        voxels = np.round(voxels)
    volume = Volume(voxels.astype(spec.dtype), spec.spacing, spec.origin, spec.direction)
    return volume, lesion_mask


def _lesions(
    rng: np.random.Generator, burden: float, body: np.ndarray, half: np.ndarray
) -> list[tuple[np.ndarray, float, float]]:
    """Spheres (centre mm, radius mm, HU) inside the lungs covering about `burden` of them."""
    if not 0 <= burden <= 0.5:
        raise ValueError(f"lesion_burden must be in [0, 0.5], not {burden}")
    semi = np.array([0.36 * body[0], 0.75 * body[1], 0.8 * half[2]])
    lung_volume = 2 * 4 / 3 * np.pi * semi.prod()
    lesions: list[tuple[np.ndarray, float, float]] = []
    covered = 0.0
    while covered < burden * lung_volume:
        side = rng.choice([-1.0, 1.0])
        offset = rng.uniform(-0.6, 0.6, 3) * semi
        centre = np.array([side * 0.5 * body[0], 0.05 * body[1], 0.0]) + offset
        radius = float(rng.uniform(0.1, 0.25) * semi[0])
        hu = GROUND_GLASS if rng.random() < 0.7 else CONSOLIDATION
        lesions.append((centre, radius, hu))
        covered += 4 / 3 * np.pi * radius**3
    return lesions


def _draw_slice(
    p: np.ndarray,
    body: np.ndarray,
    half: np.ndarray,
    lesions: list[tuple[np.ndarray, float, float]],
) -> tuple[np.ndarray, np.ndarray]:
    """HU and lesion mask of one slice from (ny, nx, 3) LPS positions relative to the centre."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    out = np.full(x.shape, AIR, dtype=np.float32)
    inside = (x / body[0]) ** 2 + (y / body[1]) ** 2
    out[inside <= 1.0] = FAT
    out[inside <= 0.85] = SOFT_TISSUE
    lung_semi = np.array([0.36 * body[0], 0.75 * body[1], 0.8 * half[2]])
    lung_any = np.zeros(x.shape, dtype=bool)
    for side in (-1.0, 1.0):  # -1: patient's right (smaller LPS x)
        centre = np.array([side * 0.5 * body[0], 0.05 * body[1], 0.0])
        r = (((p - centre) / lung_semi) ** 2).sum(axis=-1)
        lung_any |= r <= 1.0
    lung_any &= inside <= 0.7  # ribs and muscle all round
    out[lung_any] = LUNG
    z_low, z_high = float(z.min()), float(z.max())
    lesion = np.zeros(x.shape, dtype=bool)
    for centre, radius, hu in lesions:
        if centre[2] + radius < z_low or centre[2] - radius > z_high:
            continue  # the sphere does not reach this slice
        inside_lesion = lung_any & (((p - centre) ** 2).sum(axis=-1) <= radius**2)
        out[inside_lesion] = hu
        lesion |= inside_lesion
    heart = np.array([0.12 * body[0], -0.35 * body[1], -0.25 * half[2]])
    heart_semi = np.array([0.3 * body[0], 0.35 * body[1], 0.3 * half[2]])
    out[(((p - heart) / heart_semi) ** 2).sum(axis=-1) <= 1.0] = SOFT_TISSUE
    spine = (x / (0.12 * body[1])) ** 2 + ((y - 0.75 * body[1]) / (0.12 * body[1])) ** 2
    out[spine <= 1.0] = BONE
    trachea = (x**2 + (y + 0.1 * body[1]) ** 2 <= 9.0**2) & (z > 0.2 * half[2])
    out[trachea & (inside <= 0.85)] = AIR
    lesion &= (out == GROUND_GLASS) | (out == CONSOLIDATION)  # heart, spine drawn over
    return out, lesion.view(np.uint8)


def write_phantom(volume: Volume, path: str, spec: PhantomSpec, compress: bool = True) -> None:
    """Write a phantom with its `PatientAge` / `PatientSex` header keys."""
    image = volume.to_sitk()
    if spec.age is not None:
        image.SetMetaData("PatientAge", spec.age)
    if spec.sex is not None:
        image.SetMetaData("PatientSex", spec.sex)
    sitk.WriteImage(image, path, useCompression=compress)


# The ages STOIC writes: the midpoints of its age bins.
STOIC_AGES = (35, 45, 55, 65, 75, 85)


def write_phantom_cohort(
    data_dir: Path,
    patients: int,
    *,
    size: tuple[int, int, int] = (64, 64, 12),
    spacing: Vector3 = (5.6, 5.6, 10.0),
    seed: int = 0,
    shuffle_labels: bool = False,
) -> Path:
    """A synthetic cohort in the STOIC training layout, with labels that the scans explain.

    Each patient gets a lesion burden drawn from [0, 0.35], an age from STOIC's bins and
    a sex. COVID-19 is positive when the burden exceeds 0.12; a COVID-positive patient is
    severe when age + 100 x burden exceeds 85 (older and more affected patients). A
    COVID-positive patient also gets a COV19-CT-DB-style grade 1-4 (mild to critical) by
    burden (thresholds 0.17, 0.23, 0.29). With `shuffle_labels` the label rows are
    permuted across patients: nothing to learn.

    Writes DATA_DIR/data/mha/<PatientID>.mha, the lesion masks DATA_DIR/data/lesions/
    <PatientID>.mha (uint8, 1 = lesion) and DATA_DIR/metadata/reference.csv (columns
    PatientID, probCOVID, probSevere, severity; severity empty when COVID-negative).
    """
    rng = np.random.default_rng(seed)
    scans = data_dir / "data" / "mha"
    lesion_dir = data_dir / "data" / "lesions"
    scans.mkdir(parents=True, exist_ok=True)
    lesion_dir.mkdir(parents=True, exist_ok=True)
    origin = tuple(-n * s / 2 for n, s in zip(size, spacing, strict=True))
    rows = []
    for index in range(patients):
        burden = float(rng.uniform(0.0, 0.35))
        age = int(rng.choice(STOIC_AGES))
        sex = str(rng.choice(["M", "F"]))
        spec = PhantomSpec(
            size=size,
            spacing=spacing,
            origin=origin,  # type: ignore[arg-type]
            lesion_burden=burden,
            age=f"{age:03d}Y",
            sex=sex,
            seed=seed * 100_003 + index,
        )
        patient = f"{1000 + index}"
        volume, lesions = make_phantom_with_lesions(spec)
        write_phantom(volume, str(scans / f"{patient}.mha"), spec)
        mask = Volume(lesions, volume.spacing, volume.origin, volume.direction)
        sitk.WriteImage(mask.to_sitk(), str(lesion_dir / f"{patient}.mha"), useCompression=True)
        covid = int(burden > 0.12)
        severe = int(covid == 1 and age + 100 * burden > 85)
        grade = str(1 + int(np.searchsorted([0.17, 0.23, 0.29], burden))) if covid else ""
        rows.append((patient, covid, severe, grade))
    labels = [(c, s, g) for _, c, s, g in rows]
    if shuffle_labels:
        labels = [labels[i] for i in rng.permutation(len(labels))]
    (data_dir / REFERENCE).parent.mkdir(parents=True, exist_ok=True)
    lines = ["PatientID,probCOVID,probSevere,severity"]
    lines += [f"{row[0]},{c},{s},{g}" for row, (c, s, g) in zip(rows, labels, strict=True)]
    (data_dir / REFERENCE).write_text("\n".join(lines) + "\n")
    return data_dir
