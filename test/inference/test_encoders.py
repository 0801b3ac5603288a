"""Slice encoding against the published iBOTExtractor, on a small ViT with the same weights."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.published import install_compose_for_balaitous
from helpers import resident_bytes
from stoic_ct.inference.encoders import SliceEncoder, to_model_input
from stoic_ct.inference.precision import numerics_of
from stoic_ct.models.vit import VisionTransformer, ViTConfig
from stoic_ct.weights.model_files import VIT_CT
from stoic_ct.weights.network_files import load_vit
from stoic_ct.weights.random_weights import random_vit_state_dict

CONFIG = ViTConfig(embed_dim=128, depth=2, num_heads=2, mlp_hidden=256)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return random_vit_state_dict(CONFIG, seed=7)


@pytest.fixture(scope="module")
def ours(weights: dict[str, torch.Tensor]) -> VisionTransformer:
    model = VisionTransformer(CONFIG)
    model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("norm.")})
    return model.eval()


def slices(seed: int, depth: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1100, 900, size=(224, 224, depth)).astype(np.int16)


def test_model_input_matches_published_preprocessing(published: types.ModuleType) -> None:
    image = slices(0, depth=3)
    expected = published.imagenet_preprocessing(image.copy(), vmin=-1024, vmax=600)
    got = to_model_input(image, CPU)
    assert got.shape == (3, 3, 224, 224)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-6)


def test_features_match_the_published_extractor(
    published: types.ModuleType, weights: dict[str, torch.Tensor], ours: VisionTransformer
) -> None:
    install_compose_for_balaitous()
    import balaitous.vit

    theirs = balaitous.vit.VisionTransformer(
        embed_dim=128, depth=2, num_heads=2, mlp_ratio=2, qkv_bias=True
    )
    theirs.load_state_dict(weights)
    extractor = published.iBOTExtractor.__new__(published.iBOTExtractor)
    extractor.key, extractor.vmin, extractor.vmax, extractor.device = "full", -1024, 600, "cpu"
    extractor.model = theirs.eval()

    image = slices(1, depth=7)
    expected = extractor({"image": image})["features"]["full"]
    got = SliceEncoder(ours, CPU, batch_size=3)(image)
    assert got.shape == (128,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # Another stack gives features far outside the tolerance.
    assert (
        np.abs(extractor({"image": slices(2, depth=7)})["features"]["full"] - expected).max() > 1e-4
    )


def test_flip_averaging(ours: VisionTransformer) -> None:
    image = slices(3, depth=4)
    encoder = SliceEncoder(ours, CPU)
    with torch.no_grad():
        x = to_model_input(image, CPU)
        manual = (ours(x).mean(0) + ours(x.flip(2)).mean(0)).double().numpy() / 2
    np.testing.assert_allclose(encoder(image), manual, rtol=0, atol=1e-6)
    # A stack and its vertical mirror give the same feature.
    np.testing.assert_allclose(encoder(image[::-1]), encoder(image), rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_batch_size_does_not_change_features(ours: VisionTransformer, batch_size: int) -> None:
    image = slices(4, depth=5)
    reference = SliceEncoder(ours, CPU, batch_size=5)(image)
    np.testing.assert_allclose(
        SliceEncoder(ours, CPU, batch_size)(image), reference, rtol=0, atol=1e-6
    )


def test_empty_stack_is_refused(ours: VisionTransformer) -> None:
    with pytest.raises(ValueError, match="Z >= 1"):
        SliceEncoder(ours, CPU)(np.zeros((224, 224, 0), dtype=np.int16))


def test_tf32_is_off_while_encoding_and_restored_after(ours: VisionTransformer) -> None:
    seen = []
    hook = ours.patch_embed.register_forward_hook(
        lambda *_: seen.append(
            (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
        )
    )
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        SliceEncoder(ours, CPU)(slices(5, depth=1))
        assert seen == [(False, "highest")]
        assert torch.backends.cudnn.allow_tf32 is True
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        hook.remove()
        torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("precision", ["fast", "int8", "bfloat16"])
def test_fast_precision_is_close_to_exact(tmp_path: Path, precision: str) -> None:
    config = ViTConfig(embed_dim=128, depth=4, num_heads=2, mlp_hidden=512)
    torch.save(random_vit_state_dict(config, seed=8), tmp_path / "vit.pth")
    image = slices(6, depth=6)
    exact = SliceEncoder(load_vit(tmp_path / "vit.pth", VIT_CT, 4), CPU)(image)
    encoder = SliceEncoder(load_vit(tmp_path / "vit.pth", VIT_CT, 4), CPU, precision=precision)
    fast = encoder(image)
    error = np.linalg.norm(fast - exact) / np.linalg.norm(exact)
    assert 0 < error < 0.05
    quantised = any(
        type(m) is not torch.nn.Linear and "Linear" in type(m).__name__
        for m in encoder.model.modules()
    )
    assert quantised == (numerics_of(CPU, precision) == "int8")


def test_weights_leave_memory_after_each_call(tmp_path: Path) -> None:
    """On a CPU the two ViT-L encoders never hold memory together: pages go after use."""
    config = ViTConfig(embed_dim=256, depth=8, num_heads=4, mlp_hidden=1024)
    path = tmp_path / "vit.pth"
    torch.save(random_vit_state_dict(config, seed=9), path)
    encoder = SliceEncoder(load_vit(path, VIT_CT, 8), CPU, weights=path)
    first = encoder(slices(7, depth=2))
    assert resident_bytes(path) < 0.1 * path.stat().st_size
    np.testing.assert_array_equal(encoder(slices(7, depth=2)), first)  # pages came back intact
