"""lungmask's R231 U-Net, built as the published R231 checkpoint expects it."""

from __future__ import annotations

from typing import Any


def r231_network() -> Any:
    """An untrained R231 U-Net: a `lungmask.resunet.UNet` (an nn.Module; lungmask has no
    type hints) with R231's arguments. Built under `torch.device("meta")`, it takes loaded
    weights without allocating any first."""
    from lungmask.resunet import UNet

    return UNet(
        n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False
    )
