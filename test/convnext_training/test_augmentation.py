"""The 3D augmentations: what each must keep, identity at zero strength, seeded replay."""

from __future__ import annotations

import pytest
import torch

from stoic_ct.convnext_training.augmentation import (
    Compose,
    ElasticDeform,
    GaussianBlur,
    GaussianNoise,
    RandomCropOfResize,
    RandomFlip,
    RandomReorient90,
    RotateAxial,
    Transform,
    augmentation,
    paper_augmentation,
    separable_gaussian,
)

SHAPE = (1, 16, 16, 16)


def _image_and_mask(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(SHAPE, generator=g)
    mask = (torch.rand(SHAPE, generator=g) > 0.8).to(torch.uint8)
    return image, mask


def _run(transform: Transform, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = _image_and_mask()
    out, out_mask = transform(image, mask, torch.Generator().manual_seed(seed))
    assert out_mask is not None
    return out, out_mask


ALWAYS = [
    RandomFlip(p=1.0),
    GaussianNoise(p=1.0),
    GaussianBlur(p=1.0),
    RotateAxial(30.0, p=1.0),
    ElasticDeform(p=1.0, sigma=4.0),
    RandomReorient90(p=1.0),
    RandomCropOfResize(p=1.0),
]


@pytest.mark.parametrize("transform", ALWAYS, ids=lambda t: type(t).__name__)
def test_every_transform_keeps_shape_and_dtype_and_changes_the_image(transform: Transform) -> None:
    image, _ = _image_and_mask()
    out, mask = _run(transform)
    assert out.shape == SHAPE and mask.shape == SHAPE
    assert out.dtype == torch.float32 and mask.dtype == torch.uint8
    assert not torch.equal(out, image)


@pytest.mark.parametrize(
    "transform",
    [t for t in ALWAYS if not isinstance(t, GaussianNoise)],
    ids=lambda t: type(t).__name__,
)
def test_all_but_noise_keep_the_value_range(transform: Transform) -> None:
    image, _ = _image_and_mask()
    out, mask = _run(transform)
    assert float(out.min()) >= 0.0 and float(out.max()) <= float(image.max()) + 1e-6
    assert set(torch.unique(mask).tolist()) <= {0, 1}  # labels stay labels (nearest neighbour)


@pytest.mark.parametrize(
    "transform", [RandomFlip(p=1.0), RandomReorient90(p=1.0)], ids=lambda t: type(t).__name__
)
def test_flips_and_turns_keep_the_label_volume_and_move_labels_with_the_image(
    transform: Transform,
) -> None:
    image, mask = _image_and_mask()
    out, out_mask = _run(transform)
    assert int(out_mask.sum()) == int(mask.sum())
    # Each voxel keeps its label: the image values under the labels are the same multiset.
    assert torch.equal(out[out_mask.bool()].sort().values, image[mask.bool()].sort().values)


def test_a_flip_is_exact_and_twice_is_identity() -> None:
    image, _ = _image_and_mask()
    flip = RandomFlip((2,), p=1.0)
    once, _ = flip(image, None, torch.Generator())
    assert torch.equal(once, image.flip(3))
    twice, _ = flip(once, None, torch.Generator())
    assert torch.equal(twice, image)


@pytest.mark.parametrize(
    "transform",
    [
        GaussianNoise((0.0, 0.0), p=1.0),
        GaussianBlur((0.0, 0.0), p=1.0),
        RotateAxial(0.0, p=1.0),
        ElasticDeform((0.0, 0.0), p=1.0),
        RandomCropOfResize(1.0, p=1.0),
        RandomFlip(p=0.0),
        RandomReorient90(p=0.0),
    ],
    ids=lambda t: type(t).__name__,
)
def test_zero_strength_is_the_identity(transform: Transform) -> None:
    image, mask = _image_and_mask()
    out, out_mask = transform(image, mask, torch.Generator().manual_seed(0))
    assert torch.equal(out, image) and out_mask is not None and torch.equal(out_mask, mask)


def test_rotation_turns_about_the_axial_centre_and_keeps_slices_apart() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand((1, 3, 15, 15), generator=g)
    out, _ = RotateAxial(30.0, p=1.0)(image, None, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out[..., 7, 7], image[..., 7, 7])  # the centre column stays
    single, _ = RotateAxial(30.0, p=1.0)(image[:, :1], None, torch.Generator().manual_seed(1))
    torch.testing.assert_close(single, out[:, :1])  # each slice turns on its own
    tiny, _ = RotateAxial(0.01, p=1.0)(image, None, torch.Generator().manual_seed(1))
    torch.testing.assert_close(tiny[..., 5:10, 5:10], image[..., 5:10, 5:10], atol=1e-3, rtol=0)


def test_the_noise_scale_follows_the_image_spread() -> None:
    image, _ = _image_and_mask()
    out, _ = GaussianNoise((0.5, 0.5), p=1.0)(image, None, torch.Generator().manual_seed(0))
    measured = float((out - image).std())
    assert measured == pytest.approx(0.5 * float(image.std()), rel=0.05)


def test_separable_gaussian_equals_the_full_3d_kernel() -> None:
    image, _ = _image_and_mask()
    sigma, radius = 1.2, 4
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = k1 / k1.sum()
    k3 = k1[:, None, None] * k1[None, :, None] * k1[None, None, :]
    padded = torch.nn.functional.pad(image[None], [radius] * 6, mode="replicate")
    full = torch.nn.functional.conv3d(padded, k3[None, None])
    torch.testing.assert_close(
        separable_gaussian(image[None], sigma, truncate=radius / sigma), full
    )


def test_elastic_field_respects_alpha() -> None:
    """Coordinates move by at most alpha voxels: a ramp image changes by at most alpha steps."""
    ramp = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1, 1).expand(1, 16, 16, 16)
    out, _ = ElasticDeform((2.0, 2.0), sigma=3.0, p=1.0)(
        ramp.contiguous(), None, torch.Generator().manual_seed(3)
    )
    inner = (slice(None), slice(3, 13), slice(3, 13), slice(3, 13))
    assert float((out - ramp)[inner].abs().max()) <= 2.0 + 1e-4
    assert float((out - ramp)[inner].abs().max()) > 0.2


def test_compose_replays_exactly_from_a_seed_and_differs_across_seeds() -> None:
    image, mask = _image_and_mask()
    augment = paper_augmentation()
    a, ma = augment(image, mask, 7)
    b, mb = augment(image, mask, 7)
    c, _ = augment(image, mask, 8)
    assert torch.equal(a, b) and ma is not None and mb is not None and torch.equal(ma, mb)
    assert not torch.equal(a, c)


def test_presets_and_bad_settings() -> None:
    assert augmentation("none") is None
    assert isinstance(augmentation("orientation"), Compose)
    with pytest.raises(ValueError, match="augmentation must be one of"):
        augmentation("heavy")
    with pytest.raises(ValueError, match="p must be in"):
        RandomFlip(p=1.5)
    with pytest.raises(ValueError, match="std must be a range"):
        GaussianNoise((0.8, 0.6))
    with pytest.raises(ValueError, match="square planes"):
        RandomReorient90(p=1.0)(torch.zeros(1, 4, 4, 6), None, torch.Generator())
