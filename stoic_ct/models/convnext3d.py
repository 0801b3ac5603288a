"""The 3D ConvNeXt of Kienzle et al. (ECCV 2022 workshops): one input channel, volumes in.

docs/explanation/pipeline.md, section 3: a stem (Conv3d k4 s4 + channels-first LayerNorm), three
downsamplers (LayerNorm + Conv3d k2 s2), and stages of blocks: depthwise Conv3d k7 ->
LayerNorm -> Linear(d, 4d) -> GELU -> Linear(4d, d) -> layer scale -> drop path, residual.
Module names follow the official 2D ConvNeXt (`downsample_layers`, `stages.i.j.dwconv`,
...), so that inflated official checkpoints load without renaming.

The input is a CT windowed to [0, 1] (stoic_ct.preprocessing.convnext_preprocessing); the model
standardises it first with ImageNet's grey-level statistics (the mean of the RGB means
and standard deviations), as the inflated 2D stem was trained on standardised images.
Without it a randomly initialised stem cannot see intensity at all: a channel LayerNorm
after a bias-free convolution is blind to the scale of a positive, uniform patch.

The model splits into `stages` (four feature maps, for a segmentation head), `pool`
(global average and LayerNorm: the frozen-encoder feature) and `head` (a Linear layer,
absent when `num_classes` is 0): the frozen encoder is the same class without its head.
Its files are read and written by stoic_ct.weights.network_files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INPUT_MEAN, INPUT_STD = 0.449, 0.226  # means of ImageNet's (0.485, 0.456, 0.406), (0.229, ...)


@dataclass(frozen=True)
class ConvNeXtSize:
    """Blocks per stage and channels per stage."""

    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]


SIZES = {
    # Not in the ConvNeXt paper: ours, for CPU experiments and tests (ConvNeXt-atto's
    # depths with narrower stages). No 2D ImageNet weights exist for it.
    "micro": ConvNeXtSize((2, 2, 6, 2), (32, 64, 128, 256)),
    # Liu et al., "A ConvNet for the 2020s" (CVPR 2022); tiny is the one Kienzle et al. use.
    "tiny": ConvNeXtSize((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ConvNeXtSize((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ConvNeXtSize((3, 3, 27, 3), (128, 256, 512, 1024)),
}


class LayerNormChannelsFirst(nn.Module):
    """LayerNorm over the channels of (N, C, D, H, W), with the 2D ConvNeXt's parameters."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.movedim(1, -1), self.weight.shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability `rate`."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    """One ConvNeXt block on (N, C, D, H, W)."""

    def __init__(self, dim: int, drop_path_rate: float = 0.0, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale > 0 else None
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).movedim(1, -1)  # (N, D, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + drop_path(y.movedim(-1, 1), self.drop_path_rate, self.training)


class ConvNeXt3D(nn.Module):
    """ConvNeXt on single-channel volumes.

    Args:
        size: "micro", "tiny", "small" or "base" (see SIZES).
        num_classes: outputs of the head; 0 for none (a frozen encoder).
        drop_path_rate: stochastic depth, rising linearly from 0 to this over the blocks.
        layer_scale: initial value of the per-channel layer scale (0 disables it).
        metadata_dim: values appended to the pooled feature before the head (2: age and
            sex, as the STOIC2021 winner's `use_metadata`); 0 for none.
    """

    def __init__(
        self,
        size: str = "tiny",
        num_classes: int = 0,
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
        layer_scale: float = 1e-6,
        metadata_dim: int = 0,
    ) -> None:
        super().__init__()
        self.metadata_dim = metadata_dim
        if size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
        self.size, self.size_name = SIZES[size], size
        depths, dims = self.size.depths, self.size.dims
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv3d(in_chans, dims[0], 4, stride=4), LayerNormChannelsFirst(dims[0])
                )
            ]
            + [
                nn.Sequential(
                    LayerNormChannelsFirst(dims[i]), nn.Conv3d(dims[i], dims[i + 1], 2, stride=2)
                )
                for i in range(3)
            ]
        )
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(
                nn.Sequential(
                    *(Block(dims[i], rates[first + j], layer_scale) for j in range(depth))
                )
            )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head: nn.Module = (
            nn.Linear(dims[-1] + metadata_dim, num_classes) if num_classes else nn.Identity()
        )
        self.apply(_init_weights)

    def blocks(self) -> list[Block]:
        """Every block, stage by stage."""
        return [block for block in self.stages.modules() if isinstance(block, Block)]

    @property
    def feature_dim(self) -> int:
        """Length of the pooled feature."""
        return self.size.dims[-1]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 1, D, H, W) in [0, 1] -> the four stages' maps, at 1/4, 1/8, 1/16, 1/32 scale."""
        x = (x - INPUT_MEAN) / INPUT_STD
        outputs = []
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
            outputs.append(x)
        return outputs

    def pool(self, last: torch.Tensor) -> torch.Tensor:
        """(N, C, d, h, w) last stage map -> (N, C) feature: global average, then LayerNorm."""
        pooled: torch.Tensor = self.norm(last.mean(dim=(-3, -2, -1)))
        return pooled

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> (N, C) pooled feature (what the frozen encoder gives)."""
        return self.pool(self.forward_stages(x)[-1])

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 1, D, H, W) and (N, metadata_dim) -> (N, num_classes) logits, or the (N, C)
        feature without a head (and without metadata)."""
        feature = self.forward_features(x)
        if self.metadata_dim:
            if metadata is None or tuple(metadata.shape) != (len(x), self.metadata_dim):
                got = None if metadata is None else tuple(metadata.shape)
                raise ValueError(
                    f"this network takes ({len(x)}, {self.metadata_dim}) metadata, not {got}"
                )
            feature = torch.cat((feature, metadata.to(feature.dtype)), dim=1)
        out: torch.Tensor = self.head(feature)
        return out


def _init_weights(module: nn.Module) -> None:
    """As the official ConvNeXt: truncated normal (std 0.02) weights, zero biases."""
    if isinstance(module, nn.Conv3d | nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _conv_unit(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """Conv3d -> GroupNorm -> ReLU (GroupNorm: 3D batches are too small for BatchNorm)."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


class UperNetHead3D(nn.Module):
    """UperNet-style segmentation head over the four stages (Xiao et al., ECCV 2018), in 3D.

    A pyramid pooling module on the last stage, a top-down feature pyramid with lateral
    1x1 convolutions, all levels fused at 1/4 resolution, then a 1x1 classifier. Returns
    logits upsampled (trilinear) to the input's size.
    """

    def __init__(
        self,
        dims: tuple[int, int, int, int],
        channels: int = 128,
        num_classes: int = 1,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList(_conv_unit(dims[-1], channels, 1) for _ in pool_scales)
        self.bottleneck = _conv_unit(dims[-1] + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(_conv_unit(d, channels, 1) for d in dims[:-1])
        self.smooth = nn.ModuleList(_conv_unit(channels, channels, 3) for _ in dims[:-1])
        self.fuse = _conv_unit(len(dims) * channels, channels, 3)
        self.classifier = nn.Conv3d(channels, num_classes, 1)

    def forward(self, stages: list[torch.Tensor], size: tuple[int, int, int]) -> torch.Tensor:
        """Four stage maps -> (N, num_classes, *size) logits."""
        last = stages[-1]
        pooled = [
            F.interpolate(unit(F.adaptive_avg_pool3d(last, s)), last.shape[2:], mode="trilinear")
            for s, unit in zip(self.pool_scales, self.ppm, strict=True)
        ]
        top = self.bottleneck(torch.cat([last, *pooled], dim=1))
        levels = [top]
        for lateral, smooth, stage in zip(
            reversed(self.laterals), reversed(self.smooth), reversed(stages[:-1]), strict=True
        ):
            top = lateral(stage) + F.interpolate(top, stage.shape[2:], mode="trilinear")
            levels.insert(0, smooth(top))
        finest = levels[0].shape[2:]
        fused = self.fuse(
            torch.cat(
                [
                    F.interpolate(x, finest, mode="trilinear") if x.shape[2:] != finest else x
                    for x in levels
                ],
                1,
            )
        )
        return F.interpolate(self.classifier(fused), size, mode="trilinear")


class ConvNeXt3DSegmenter(nn.Module):
    """The 3D ConvNeXt with an UperNet head: (N, 1, D, H, W) -> (N, classes, D, H, W) logits.

    Its `backbone` is a plain ConvNeXt3D, whose weights a classifier can start from.
    """

    def __init__(self, backbone: ConvNeXt3D, num_classes: int = 1, channels: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = UperNetHead3D(backbone.size.dims, channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.backbone.forward_stages(x), tuple(x.shape[2:]))
        return logits
