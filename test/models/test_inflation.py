"""2D -> 3D ConvNeXt inflation: the kernel layouts and norms, the two checkpoint layouts."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from helpers import official_2d_state
from stoic_ct.errors import ModelFileError
from stoic_ct.models.convnext3d import ConvNeXt3D
from stoic_ct.models.inflation import (
    INFLATIONS,
    gaussian_profile,
    inflate_convnext,
    inflate_kernel,
    lay_kernel,
)


def timm_names(official: str) -> str:
    """The same parameter as timm's convnext names it."""
    rules = [
        (r"^downsample_layers\.0\.0\.", "stem.0."),
        (r"^downsample_layers\.0\.1\.", "stem.1."),
        (r"^downsample_layers\.(\d)\.(\d)\.", r"stages.\1.downsample.\2."),
        (r"^stages\.(\d)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
        (r"^stages\.(\d)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
        (r"^stages\.(\d)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
        (r"^stages\.(\d)\.(\d+)\.", r"stages.\1.blocks.\2."),
        (r"^norm\.", "head.norm."),
        (r"^head\.", "head.fc."),
    ]
    for pattern, replacement in rules:
        if re.match(pattern, official):
            return re.sub(pattern, replacement, official)
    raise AssertionError(official)


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_a_2d_convnext_tiny_loads_with_no_missing_or_unexpected_keys(layout: str) -> None:
    official = official_2d_state()
    state = official if layout == "official" else {timm_names(k): v for k, v in official.items()}
    encoder = ConvNeXt3D("tiny")
    result = encoder.load_state_dict(inflate_convnext(state, encoder), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # Every 2D parameter in exactly one 3D parameter: all but the head (none in an encoder).
    assert len(encoder.state_dict()) == len(state) - 2
    for name, value in encoder.state_dict().items():
        source = official[name]
        if source.ndim == 1 or source.ndim == 2:  # norms, layer scales, Linear: as they are
            torch.testing.assert_close(value, source, rtol=0, atol=0)
    with_head = ConvNeXt3D("tiny", num_classes=10)
    with_head.load_state_dict(inflate_convnext(state, with_head), strict=True)
    torch.testing.assert_close(with_head.head.weight, official["head.weight"])


def test_rgb_stem_weights_are_summed_to_one_channel() -> None:
    official = official_2d_state(size="micro")
    inflated = inflate_convnext(official, ConvNeXt3D("micro"))["downsample_layers.0.0.weight"]
    assert inflated.shape == (32, 1, 4, 4, 4)
    torch.testing.assert_close(
        inflated.sum(dim=2), official["downsample_layers.0.0.weight"].sum(dim=1, keepdim=True)
    )


def test_unknown_and_missing_keys_are_listed() -> None:
    state = official_2d_state(size="micro")
    state["stages.0.0.extra.weight"] = torch.zeros(3)
    del state["stages.3.1.gamma"]
    with pytest.raises(ModelFileError) as raised:
        inflate_convnext(state, ConvNeXt3D("micro"))
    assert "unknown 2D keys: stages.0.0.extra.weight" in str(raised.value)
    assert "3D parameters without a 2D value: stages.3.1.gamma" in str(raised.value)
    with pytest.raises(ModelFileError, match="shapes that do not fit"):
        inflate_convnext(official_2d_state(size="tiny"), ConvNeXt3D("micro"))


def test_full_inflation_reproduces_the_2d_convolution_on_volumes_constant_in_depth() -> None:
    torch.manual_seed(0)
    conv2d = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=False)
    x2 = torch.randn(1, 8, 20, 20)
    x3 = x2[:, :, None].expand(1, 8, 16, 20, 20)
    y2 = conv2d(x2)
    for normalisation, scale in (("sum", 1.0), ("l2", math.sqrt(7))):
        w3 = inflate_kernel(conv2d.weight.detach(), "full", normalisation)
        y3 = F.conv3d(x3, w3, padding=3, groups=8)
        for depth in range(3, 13):  # away from the zero padding in depth
            torch.testing.assert_close(y3[:, :, depth], scale * y2, rtol=1e-4, atol=1e-4)


def test_the_stem_of_one_channel_matches_the_2d_stem_on_grey_images() -> None:
    official = official_2d_state(size="micro")
    w2, b2 = official["downsample_layers.0.0.weight"], official["downsample_layers.0.0.bias"]
    inflated = inflate_convnext(official, ConvNeXt3D("micro"))
    grey = torch.rand(1, 1, 16, 16)
    y2 = F.conv2d(grey.expand(1, 3, 16, 16), w2, b2, stride=4)
    y3 = F.conv3d(
        grey[:, :, None].expand(1, 1, 8, 16, 16),
        inflated["downsample_layers.0.0.weight"],
        inflated["downsample_layers.0.0.bias"],
        stride=4,
    )
    for depth in range(2):
        torch.testing.assert_close(y3[:, :, depth], y2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", INFLATIONS)
@pytest.mark.parametrize("normalisation", ["sum", "l2"])
def test_every_inflated_kernel_keeps_the_documented_norm(mode: str, normalisation: str) -> None:
    w = torch.randn(6, 2, 7, 7, dtype=torch.float64)
    w3 = inflate_kernel(w, mode, normalisation)
    assert w3.shape == (6, 2, 7, 7, 7)
    if normalisation == "sum":
        torch.testing.assert_close(w3.sum(dim=(-3, -2, -1)), w.sum(dim=(-2, -1)))
    else:
        torch.testing.assert_close(w3.flatten(-3).norm(dim=-1), w.flatten(-2).norm(dim=-1))


def test_gaussian_inflations_are_symmetric_about_the_centre() -> None:
    for k in (2, 4, 7):
        g = gaussian_profile(k)
        torch.testing.assert_close(g, g.flip(0))
        assert g.argmax() in ((k - 1) // 2, k // 2)
    w = torch.randn(3, 1, 7, 7, dtype=torch.float64)
    one = inflate_kernel(w, "1g", "sum")
    torch.testing.assert_close(one, one.flip(-3))  # Gaussian over depth
    # 2g: the (H, W) plane with a Gaussian over depth, plus the rows laid along depth with
    # a Gaussian over H: each part symmetric along its own Gaussian axis.
    in_plane = lay_kernel(w, "1g")
    along_depth = lay_kernel(w, "2g") - in_plane
    torch.testing.assert_close(in_plane, in_plane.flip(-3))
    torch.testing.assert_close(along_depth, along_depth.flip(-2))
    torch.testing.assert_close(along_depth[..., :, 3, :], gaussian_profile(7)[3] * w)
