"""Random model files in the published layouts, for tests, benchmarks and setup checks.

The real weights come from Zenodo and GitHub; where those cannot be reached, these files
have the same names, keys, shapes and wrapping, so that every loader (ours and the
published package's) reads them as it reads the real ones. A `RANDOM_WEIGHTS` marker file
beside them makes the pipeline warn that its probabilities mean nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from stoic_ct.io.cohort import STOIC_TASKS
from stoic_ct.models.heads import ENCODERS, EXTRA_SEVERE_FEATURES
from stoic_ct.models.r231 import r231_network
from stoic_ct.models.vit import VIT_LARGE, VisionTransformer, ViTConfig
from stoic_ct.weights.model_files import (
    HEADS,
    R231,
    RANDOM_WEIGHTS_MARKER,
    RECIPE_PREFIX,
    VIT_CT,
    VIT_IMAGENET,
    sha256_of,
)

# Input projections (qkv, fc1) larger than iBOT's training init (0.02), so that attention
# is sharp and the CLS token depends clearly on the image; output projections (attn.proj,
# mlp.fc2) small, so that the residual stream, and with it the feature, stays near the
# scale the published heads expect (features of rms ~0.4, logits of a few units).
RECIPE_VERSION = 1  # bump when the generator's output changes
INPUT_STD = 0.05
OUTPUT_STD = 0.001
TOKEN_STD = 0.02


def random_vit_state_dict(
    config: ViTConfig = VIT_LARGE, *, seed: int = 0, masked_embed: bool = False
) -> dict[str, torch.Tensor]:
    """A full iBOT ViT state dict (all blocks, final norm), float32, reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VisionTransformer(config).state_dict().items()}
    d = config.embed_dim
    shapes |= {"norm.weight": torch.Size([d]), "norm.bias": torch.Size([d])}
    if masked_embed:
        shapes["masked_embed"] = torch.Size([1, d])
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("bias"):
            tensor = 0.02 * torch.randn(shape, generator=generator)
        elif "norm" in name:
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name == "patch_embed.proj.weight":
            fan_in = shape[1] * shape[2] * shape[3]
            tensor = torch.randn(shape, generator=generator) / fan_in**0.5
        elif name in ("cls_token", "pos_embed", "masked_embed"):
            tensor = TOKEN_STD * torch.randn(shape, generator=generator)
        elif name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            tensor = OUTPUT_STD * torch.randn(shape, generator=generator)
        else:
            tensor = INPUT_STD * torch.randn(shape, generator=generator)
        state[name] = tensor.contiguous()
    return state


def random_r231_state_dict(*, seed: int = 0) -> dict[str, torch.Tensor]:
    """lungmask's R231 U-Net with PyTorch's default initialisation, reproducible from `seed`."""
    with torch.random.fork_rng():  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = r231_network()
    return {k: v.clone() for k, v in model.state_dict().items()}


def random_heads(dim: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """balaitous.npz arrays for `dim`-long features, coefficients on the published scale."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for enc in ENCODERS:
        for task in STOIC_TASKS:
            length = dim + (EXTRA_SEVERE_FEATURES if task == "severe" else 0)
            arrays[f"coef_{enc}_{task}"] = rng.normal(0.0, 3.0 / dim**0.5, length)
            arrays[f"intercept_{enc}_{task}"] = np.array(rng.normal(0.0, 0.5))
    arrays |= {
        "alpha_full_covid": np.array(0.35),
        "alpha_lung_covid": np.array(0.65),
        "alpha_full_severe": np.array(0.5),
        "alpha_lung_severe": np.array(0.5),
    }
    return arrays


def write_random_model_dir(
    dest: Path,
    config: ViTConfig = VIT_LARGE,
    *,
    seed: int = 0,
    heads: Path | None = None,
) -> Path:
    """Write the four model files with random weights to `dest`, plus the marker file.

    Args:
        config: encoder architecture (ViT-L by default; tests use tiny ones).
        heads: a real balaitous.npz to copy instead of random heads.
    """
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(random_vit_state_dict(config, seed=seed), dest / VIT_CT.name)
    torch.save(
        {"state_dict": random_vit_state_dict(config, seed=seed + 1, masked_embed=True)},
        dest / VIT_IMAGENET.name,
    )
    torch.save(random_r231_state_dict(seed=seed), dest / R231.name)
    if heads is not None:
        shutil.copyfile(heads, dest / HEADS.name)
        heads_origin = f"heads sha256 {sha256_of(dest / HEADS.name)}"
    else:
        np.savez(dest / HEADS.name, allow_pickle=False, **random_heads(config.embed_dim, seed=seed))
        heads_origin = f"random heads seed {seed}"
    # torch.save's bytes differ from run to run, so the files are identified by how they
    # were made: the recipe line keys the expected outputs of the shipped test case.
    (dest / RANDOM_WEIGHTS_MARKER).write_text(
        "The model files in this folder are randomly initialised, in the published layouts.\n"
        "They check a setup; their probabilities mean nothing.\n"
        f"{RECIPE_PREFIX}stoic_ct.random_weights v{RECIPE_VERSION}; seed {seed}; {config}; "
        f"{heads_origin}\n"
    )
    return dest
