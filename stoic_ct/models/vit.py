"""The iBOT Vision Transformer, named so that the published checkpoints load as they are.

The module reads top-down: blocks, then the model; the checkpoint loader is
stoic_ct.weights.network_files.load_vit. Only the blocks that are used exist: a model built
with `depth=16` from a 24-block checkpoint never reads the last eight blocks from disk (the
file is memory-mapped and the tensors assigned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6
HEAD_DIM = 64  # iBOT and timm ViTs: ViT-S 384/6, ViT-B 768/12, ViT-L 1024/16


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); with `first_only`, the first token's output only, (B, 1, D).

        Keys and values come from every token either way; only the queries are cut.
        """
        b, n, d = x.shape
        qkv = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        q = qkv[0][:, :, :1] if first_only else qkv[0]
        x = F.scaled_dot_product_attention(q, qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, q.shape[2], d))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (no layer scale, as in the published ViT-L checkpoints)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D): the block's output for the first (CLS) token only.

        The same numbers as `forward(x)[:, 0]` for about a quarter of the work: every
        token is still attended to, but only the CLS token goes through the projection
        and the MLP.
        """
        cls = x[:, :1] + self.attn(self.norm1(x), first_only=True)
        return (cls + self.mlp(self.norm2(cls)))[:, 0]


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens by a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, D)."""
        return self.proj(x).flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of an iBOT ViT. `depth` is the number of blocks built, not stored."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_hidden: int = 4096
    patch_size: int = 16
    img_size: int = 224
    in_chans: int = 3

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


VIT_LARGE = ViTConfig()


class VisionTransformer(nn.Module):
    """iBOT ViT without final norm and head: the feature is the CLS token after the last block."""

    def __init__(self, config: ViTConfig = VIT_LARGE) -> None:
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, d))
        self.blocks = nn.ModuleList(
            Block(d, config.num_heads, config.mlp_hidden) for _ in range(config.depth)
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, img, img) images -> (B, 1 + patches, D) tokens with positions (no block yet)."""
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(len(tokens), -1, -1), tokens), dim=1)
        return tokens + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, img, img) images -> (B, 1 + patches, D) tokens after the last block."""
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, img, img) images -> (B, D) CLS features.

        As `forward_features(x)[:, 0]`, but the last block computes the CLS token only
        (1/24 of the full encoder's work, 1/16 of the lung encoder's, saved).
        """
        tokens = self.embed(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        last = self.blocks[-1]
        assert isinstance(last, Block)
        return last.forward_cls(tokens)
