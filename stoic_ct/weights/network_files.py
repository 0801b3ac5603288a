"""Each network's file format: checkpoints read into the networks of stoic_ct.models (the
published ViTs and heads, 2D ConvNeXt checkpoints), and the files this package writes (the
ConvNeXt encoder, fitted heads). The networks themselves know nothing of files.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from stoic_ct.atomic import atomic_write
from stoic_ct.errors import InputError, ModelFileError
from stoic_ct.io.cohort import STOIC_TASKS
from stoic_ct.models.convnext3d import SIZES, ConvNeXt3D
from stoic_ct.models.heads import ENCODERS, EXTRA_SEVERE_FEATURES, LogisticHeads
from stoic_ct.models.vit import HEAD_DIM, VisionTransformer, ViTConfig
from stoic_ct.weights.checkpoints import check_shapes, load_checkpoint, load_state_dict
from stoic_ct.weights.model_files import CONVNEXT3D, HEADS, ModelFileSpec, problem


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], depth: int) -> ViTConfig:
    """The architecture a checkpoint holds, built to `depth` blocks (heads of 64 channels).

    Raises:
        KeyError: when a tensor that fixes the architecture is missing.
    """
    patch = state_dict["patch_embed.proj.weight"]
    dim, in_chans, patch_size, _ = patch.shape
    num_patches = state_dict["pos_embed"].shape[1] - 1
    return ViTConfig(
        embed_dim=dim,
        depth=depth,
        num_heads=max(1, dim // HEAD_DIM),
        mlp_hidden=state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=patch_size,
        img_size=round(num_patches**0.5) * patch_size,
        in_chans=in_chans,
    )


def stored_depth(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Number of blocks a checkpoint stores."""
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def load_vit(path: Path, spec: ModelFileSpec, depth: int) -> VisionTransformer:
    """A ViT with the first `depth` blocks of the checkpoint at `path`, on the CPU, in eval mode.

    The checkpoint may be a plain state dict or wrap it under "state_dict"; its final norm,
    head and `masked_embed` are ignored, and so are blocks from `depth` on, which are never
    read from disk. Weights are float32.

    Raises:
        ModelFileError: when the file is not such a checkpoint or has fewer than `depth` blocks.
    """
    state_dict = load_state_dict(path, spec, key="state_dict")
    try:
        config = config_from_state_dict(state_dict, depth)
    except KeyError as error:
        raise ModelFileError(problem(spec, f"is not a ViT checkpoint (no {error})"), path) from None
    available = stored_depth(state_dict)
    if available < depth:
        raise ModelFileError(
            problem(spec, f"has {available} transformer blocks, {depth} are needed"), path
        )
    with torch.device("meta"):
        model = VisionTransformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(state_dict, expected, path, spec)
    used = {k: state_dict[k].float() for k in expected}
    model.load_state_dict(used, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def save_convnext3d(
    path: Path,
    model: ConvNeXt3D,
    size: str,
    input_size: int,
    about: dict[str, str] | None = None,
    segmentation_head: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the encoder's file: its size, input size, how it was made, and its weights.

    A segmentation-pretrained encoder keeps its head's weights too (`segmentation_head`),
    so that it can make pseudo-labels; loaders of the encoder ignore them.
    """
    checkpoint: dict[str, object] = {
        "size": size,
        "input_size": input_size,
        **(about or {}),
        **({"segmentation_head": segmentation_head} if segmentation_head is not None else {}),
        "state_dict": {k: v for k, v in model.state_dict().items() if not k.startswith("head.")},
    }
    return atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_convnext3d(path: Path) -> tuple[ConvNeXt3D, int]:
    """The frozen encoder (no head) and its input size, from a file of `save_convnext3d`.

    Raises:
        ModelFileError: when the file is not such a checkpoint or its weights do not fit.
    """
    return convnext3d_of(load_checkpoint(path, CONVNEXT3D), path)


def convnext3d_of(checkpoint: object, path: Path) -> tuple[ConvNeXt3D, int]:
    """`load_convnext3d` on a checkpoint already loaded from `path` (named in errors)."""
    if not isinstance(checkpoint, dict) or not {"size", "input_size", "state_dict"} <= set(
        checkpoint
    ):
        raise ModelFileError(problem(CONVNEXT3D, "lacks size, input_size or state_dict"), path)
    size, input_size = checkpoint["size"], checkpoint["input_size"]
    if size not in SIZES or not isinstance(input_size, int) or input_size < 32:
        raise ModelFileError(
            problem(CONVNEXT3D, f"has size {size!r} and input_size {input_size!r}"), path
        )
    with torch.device("meta"):
        model = ConvNeXt3D(size)
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True, assign=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[:3]
        raise ModelFileError(problem(CONVNEXT3D, " ".join(first)[:300]), path) from None
    return model.eval().requires_grad_(False), input_size


def load_encoder_of_size(path: Path, size: str) -> ConvNeXt3D:
    """The encoder of `path` (as `load_convnext3d`), which must be a ConvNeXt-`size`.

    Raises:
        ModelFileError: when the file cannot be loaded; InputError when its size differs.
    """
    encoder, _ = load_convnext3d(path)
    if encoder.size_name != size:
        raise InputError(
            f"holds a ConvNeXt-{encoder.size_name}, not the --size {size} asked for", path
        )
    return encoder


def load_2d_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A 2D ConvNeXt state dict from an official (`model` key), timm or plain checkpoint.

    Raises:
        ModelFileError: when the file cannot be read as a PyTorch checkpoint of tensors.
    """
    checkpoint = load_checkpoint(path)
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, dict) or not all(
        isinstance(v, torch.Tensor) for v in checkpoint.values()
    ):
        raise ModelFileError("is not a state dict of tensors", path)
    return checkpoint


def load_heads(path: Path) -> LogisticHeads:
    """Read balaitous.npz; raises ModelFileError when keys or shapes are wrong."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k], dtype=np.float64) for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ModelFileError(problem(HEADS, f"cannot be read as .npz ({error})"), path) from None
    names = [
        f"{kind}_{enc}_{task}"
        for kind in ("coef", "intercept", "alpha")
        for enc in ENCODERS
        for task in STOIC_TASKS
    ]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ModelFileError(problem(HEADS, f"lacks {', '.join(missing)}"), path)
    dim = arrays["coef_full_covid"].shape[0] if arrays["coef_full_covid"].ndim == 1 else -1
    for enc in ENCODERS:
        for task, length in (("covid", dim), ("severe", dim + EXTRA_SEVERE_FEATURES)):
            key = f"{enc}_{task}"
            if arrays[f"coef_{key}"].shape != (length,) or dim < 1:
                raise ModelFileError(
                    problem(
                        HEADS,
                        f"coef_{key} has shape {arrays[f'coef_{key}'].shape}; the covid "
                        "coefficients must be (D,) and the severe ones (D + 2,)",
                    ),
                    path,
                )
            for kind in ("intercept", "alpha"):
                if arrays[f"{kind}_{key}"].shape not in ((), (1,)):
                    raise ModelFileError(problem(HEADS, f"{kind}_{key} is not a scalar"), path)
    if not all(np.all(np.isfinite(v)) for v in arrays.values()):
        raise ModelFileError(problem(HEADS, "holds NaN or infinite weights"), path)
    for task in STOIC_TASKS:
        alphas = [float(arrays[f"alpha_{enc}_{task}"].reshape(())) for enc in ENCODERS]
        if min(alphas) < 0 or sum(alphas) > 1 + 1e-9:
            raise ModelFileError(
                problem(
                    HEADS,
                    f"alpha_*_{task} are {alphas}; they must be >= 0 and sum to at most 1",
                ),
                path,
            )
    keys = [f"{enc}_{task}" for enc in ENCODERS for task in STOIC_TASKS]
    return LogisticHeads(
        coef={k: arrays[f"coef_{k}"] for k in keys},
        intercept={k: float(arrays[f"intercept_{k}"].reshape(())) for k in keys},
        alpha={k: float(arrays[f"alpha_{k}"].reshape(())) for k in keys},
    )


def save_heads(heads: LogisticHeads, path: Path) -> Path:
    """Write balaitous.npz atomically (a temporary file beside it, then a rename)."""
    return atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **heads.arrays()))
