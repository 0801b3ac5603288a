"""2D ConvNeXt weights inflated into `ConvNeXt3D` (Kienzle et al.;
docs/explanation/pipeline.md, section 3).

A k x k kernel becomes k x k x k, the new axis first (depth, the axial direction of
(N, C, D, H, W) volumes):

- `full`: the 2D kernel copied along the new axis;
- `1g`: copied, weighted by a Gaussian over the new axis;
- `2g`: the sum of the 2D kernel laid in two orthogonal planes, (H, W) weighted by a
  Gaussian over D, and (D, W) (its rows along depth) weighted by a Gaussian over H.

The Gaussian sits on voxel centres, g(d) = exp(-(d + 1/2 - k/2)^2 / (2 (k/8)^2)) for
d = 0 .. k-1: mu = k/2 is the kernel's centre, so the profile is symmetric.

Each inflated kernel is then rescaled by one factor. `sum` (the default, as the published
code) keeps the kernel's sum: a volume that is constant along the new axis then gives
exactly the 2D network's activations, so the pretrained LayerNorms and layer scales see
the inputs they were trained on; the factor is the same for every kernel of a layer.
`l2` (as the paper's text says) keeps each kernel's L2 norm instead; with `full`, the
response to such a volume is then sqrt(k) times the 2D one.

RGB stem weights are summed over their input channels, for one-channel CT volumes.
Checkpoints in the official layout (`model` key; `downsample_layers`,
`stages.i.j.{dwconv,norm,pwconv1,pwconv2,gamma}`) and in timm's (`stem`,
`stages.i.downsample`, `stages.i.blocks.j.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}`,
`head.norm`, `head.fc`) are both read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from stoic_ct.errors import ModelFileError
from stoic_ct.models.convnext3d import ConvNeXt3D

INFLATIONS = ("full", "1g", "2g")
NORMALISATIONS = ("sum", "l2")

_TIMM_RULES = (
    (r"^stem\.0\.", "downsample_layers.0.0."),
    (r"^stem\.1\.", "downsample_layers.0.1."),
    (r"^stages\.(\d)\.downsample\.0\.", r"downsample_layers.\1.0."),
    (r"^stages\.(\d)\.downsample\.1\.", r"downsample_layers.\1.1."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.norm\.", r"stages.\1.\2.norm."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.gamma$", r"stages.\1.\2.gamma"),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
)


def gaussian_profile(k: int) -> torch.Tensor:
    """(k,) Gaussian weights on voxel centres, mu = k/2, sigma = k/8 (float64)."""
    centres = torch.arange(k, dtype=torch.float64) + 0.5
    return torch.exp(-((centres - k / 2) ** 2) / (2 * (k / 8) ** 2))


def inflate_kernel(
    weight: torch.Tensor, mode: str = "full", normalisation: str = "sum"
) -> torch.Tensor:
    """(O, I, k, k) -> (O, I, k, k, k), the new axis first; see the module docstring."""
    if mode not in INFLATIONS or normalisation not in NORMALISATIONS:
        raise ValueError(f"mode must be in {INFLATIONS} and normalisation in {NORMALISATIONS}")
    w = weight.to(torch.float64)
    inflated = lay_kernel(w, mode)
    if normalisation == "sum":
        ones = torch.ones(w.shape[-2:], dtype=torch.float64)
        inflated = inflated * (ones.sum() / lay_kernel(ones, mode).sum())
    else:
        norm_2d = w.flatten(-2).norm(dim=-1)
        norm_3d = inflated.flatten(-3).norm(dim=-1)
        factor = torch.where(
            norm_3d > 0, norm_2d / norm_3d.clamp_min(1e-30), torch.ones_like(norm_3d)
        )
        inflated = inflated * factor[..., None, None, None]
    return inflated.to(weight.dtype)


def lay_kernel(w: torch.Tensor, mode: str) -> torch.Tensor:
    """(..., k, k) -> (..., k, k, k), the kernel laid out as `mode` says, not yet rescaled."""
    k = w.shape[-1]
    if mode == "full":
        return w.unsqueeze(-3).expand(*w.shape[:-2], k, k, k).clone()
    g = gaussian_profile(k)
    in_plane = g[:, None, None] * w.unsqueeze(-3)  # (H, W) plane, Gaussian over D
    if mode == "1g":
        return in_plane
    along_depth = g[None, :, None] * w.unsqueeze(-2)  # rows along D, Gaussian over H
    return in_plane + along_depth


def official_names(state_2d: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """2D key -> its name in the official layout (unchanged when already official)."""
    if not any(key.startswith("stem.") for key in state_2d):
        return {key: key for key in state_2d}
    renamed = {}
    for key in state_2d:
        for pattern, replacement in _TIMM_RULES:
            if re.match(pattern, key):
                renamed[key] = re.sub(pattern, replacement, key)
                break
        else:
            renamed[key] = key  # reported as unknown below
    return renamed


def inflate_convnext(
    state_2d: Mapping[str, torch.Tensor],
    model: ConvNeXt3D,
    mode: str = "full",
    normalisation: str = "sum",
) -> dict[str, torch.Tensor]:
    """A state dict for `model` from a 2D ConvNeXt's (official or timm layout).

    Every 2D parameter lands in exactly one 3D parameter; the 2D head is dropped when the
    model has none (a frozen encoder) and copied when its shape matches.

    Raises:
        ModelFileError: listing the 2D keys that fit nowhere, the 3D parameters left
            without a value, and shapes that do not match.
    """
    names = official_names(state_2d)
    target = model.state_dict()
    has_head = "head.weight" in target
    out: dict[str, torch.Tensor] = {}
    unknown, mismatched = [], []
    for key, value in state_2d.items():
        name = names[key]
        if name.startswith("head.") and not has_head:
            continue
        if name not in target:
            unknown.append(key)
            continue
        if value.ndim == 4:  # a convolution kernel
            if name == "downsample_layers.0.0.weight":
                value = value.sum(dim=1, keepdim=True)  # RGB -> one channel
            value = inflate_kernel(value, mode, normalisation)
        if tuple(value.shape) != tuple(target[name].shape):
            mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(target[name].shape)}")
            continue
        out[name] = value.to(target[name].dtype)
    missing = [name for name in target if name not in out]
    if unknown or missing or mismatched:
        problems = []
        if unknown:
            problems.append(f"unknown 2D keys: {', '.join(unknown[:20])}")
        if missing:
            problems.append(f"3D parameters without a 2D value: {', '.join(missing[:20])}")
        if mismatched:
            problems.append(f"shapes that do not fit: {'; '.join(mismatched[:10])}")
        raise ModelFileError("the 2D ConvNeXt does not fit the 3D model: " + " | ".join(problems))
    return out
