"""Test helpers: a deterministic lung segmenter, tiny models, the published package's harness."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from stoic_ct.inference.fold_ensemble import save_fold_ensemble
from stoic_ct.models.convnext3d import SIZES, ConvNeXt3D
from stoic_ct.models.vit import ViTConfig
from stoic_ct.phantom import PhantomSpec, make_phantom, write_phantom
from stoic_ct.preprocessing.convnext_preprocessing import DEFAULT_WINDOW

REPOSITORY = Path(__file__).resolve().parent.parent

# 24 blocks so that both encoders can be built from it; 64 channels keep it fast on a CPU.
TINY_VIT = ViTConfig(embed_dim=64, depth=24, num_heads=1, mlp_hidden=128)

# Three axial slices at 5 mm keep the random R231 U-Net to a few seconds on a CPU.
THIN_PHANTOM = PhantomSpec(size=(64, 56, 3), spacing=(5.6, 5.6, 5.0), origin=(-180, -150, -5))

# Small phantoms that still span the 224 crop on one axis and pad the other.
SMALL_PHANTOM = PhantomSpec(size=(96, 80, 16), spacing=(3.6, 3.0, 6.0), origin=(-170, -120, -48))


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


def _smaps_of(path: Path) -> tuple[list[tuple[int, int]], int]:
    """Address ranges of this process's mappings of `path`, and their resident bytes."""
    ranges, resident, current = [], 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            current = len(fields) >= 6 and fields[5] == str(path)
            if current:
                start, end = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((start, end))
        elif current and fields[0] == "Rss:":
            resident += int(fields[1]) * 1024
    return ranges, resident


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `path`."""
    return _smaps_of(path)[0]


def resident_bytes(path: Path) -> int:
    """Bytes of this process's mappings of `path` that are in memory."""
    return _smaps_of(path)[1]


def assert_process_py_uses(
    model_dir: Path, work: Path, encoder: str | None = None, model: str | None = None
) -> str:
    """process.py (with --system MODEL and --encoder ENCODER where given; without them it
    runs what the folder holds), in a subprocess on a thin phantom, gives what the system
    loaded in this process from `model_dir` gives (within 1e-6): it loaded those files.

    Returns:
        process.py's stdout and stderr.
    """
    import json

    from stoic_ct.inference.precision import ModelSettings
    from stoic_ct.inference.systems import load_model_folder
    from stoic_ct.io.contract import demographics_for, read_job_inputs
    from stoic_ct.io.imageio import read_scan

    image = write_case(work / "input", THIN_PHANTOM)
    flags = [*(("--encoder", encoder) if encoder else ()), *(("--system", model) if model else ())]
    done = subprocess.run(
        [
            sys.executable,
            str(REPOSITORY / "process.py"),
            *("--input", str(work / "input"), "--output", str(work / "output")),
            *("--model-dir", str(model_dir), "--device", "cpu", *flags),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    scan = read_scan(image)
    system, _ = load_model_folder(model_dir, ModelSettings(encoder=encoder), system=model)
    expected = system.predict(scan.volume, demographics_for(scan, read_job_inputs(work / "input")))
    for name, value in (
        ("probability-covid-19.json", expected.probabilities.covid),
        ("probability-severe-covid-19.json", expected.probabilities.severe),
    ):
        got = json.loads((work / "output" / name).read_text())
        assert abs(got - value) <= 1e-6, name
    return done.stdout + done.stderr


def write_dicom_series(
    image: sitk.Image, folder: Path, slices: Sequence[int] | None = None, series: int = 2
) -> Path:
    """`image` as a DICOM series, one file per axial slice, as a scanner stores it; only
    the slice indices `slices` when given (to make a series with a slice missing). Series
    written with different `series` numbers into one folder are distinct series."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = image.GetDirection()
    orientation = "\\".join(f"{c:g}" for c in (*direction[0:7:3], *direction[1:8:3]))
    for k in range(image.GetDepth()) if slices is None else slices:
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        section = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT",
            "0010|1010": "060Y",
            "0010|0040": "F",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": f"1.2.826.0.1.3680043.2.1125.1.{series}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{c:.6f}" for c in position),
            "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:g}",
        }.items():
            section.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{series}-{k:04d}.dcm"))
        writer.Execute(section)
    return folder


def run_process(
    *args: str | Path, as_user: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPOSITORY / "process.py"), *map(str, args), "--device", "cpu"]
    return subprocess.run(
        contained(command) if as_user else command,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HOME": "/nonexistent", **(env or {})},
    )


def run_as_container(
    input_dir: Path, output: Path, model_dir: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """process.py as the container runs it: no network, a non-root user, the folders given."""
    return run_process(
        "--input", input_dir, "--output", output, "--model-dir", model_dir, as_user=True, env=env
    )


def official_2d_state(
    size: str = "tiny", classes: int = 10, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random 2D ConvNeXt state dict in the official layout, built from its description."""
    generator = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    depths, dims = SIZES[size].depths, SIZES[size].dims
    state = {
        "downsample_layers.0.0.weight": r(dims[0], 3, 4, 4),
        "downsample_layers.0.0.bias": r(dims[0]),
        "downsample_layers.0.1.weight": r(dims[0]),
        "downsample_layers.0.1.bias": r(dims[0]),
    }
    for i in range(1, 4):
        state |= {
            f"downsample_layers.{i}.0.weight": r(dims[i - 1]),
            f"downsample_layers.{i}.0.bias": r(dims[i - 1]),
            f"downsample_layers.{i}.1.weight": r(dims[i], dims[i - 1], 2, 2),
            f"downsample_layers.{i}.1.bias": r(dims[i]),
        }
    for i, (depth, d) in enumerate(zip(depths, dims, strict=True)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            state |= {
                p + "dwconv.weight": r(d, 1, 7, 7),
                p + "dwconv.bias": r(d),
                p + "norm.weight": r(d),
                p + "norm.bias": r(d),
                p + "pwconv1.weight": r(4 * d, d),
                p + "pwconv1.bias": r(4 * d),
                p + "pwconv2.weight": r(d, 4 * d),
                p + "pwconv2.bias": r(d),
                p + "gamma": r(d),
            }
    state |= {
        "norm.weight": r(dims[-1]),
        "norm.bias": r(dims[-1]),
        "head.weight": r(classes, dims[-1]),
        "head.bias": r(classes),
    }
    return state


def write_fold_ensemble(directory: Path, task: str, seeds: tuple[int, ...]) -> None:
    """convnext3d_<task>.pth: a micro ConvNeXt per seed at 32^3, two classes, as folds."""
    folds = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = ConvNeXt3D("micro", num_classes=2)
        with torch.no_grad():
            model.head.bias.copy_(torch.tensor([0.0, seed / 4]))  # type: ignore[operator]
        folds.append(model.state_dict())
    save_fold_ensemble(
        directory / f"convnext3d_{task}.pth",
        folds=folds,
        size="micro",
        input_size=32,
        window=DEFAULT_WINDOW,
        task=task,
        classes=("a", "b"),
    )
