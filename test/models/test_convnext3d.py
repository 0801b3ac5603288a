"""The 3D ConvNeXt: shapes for every size, layer scale, drop path, the segmentation head."""

from __future__ import annotations

import pytest
import torch

from stoic_ct.models.convnext3d import SIZES, ConvNeXt3D, ConvNeXt3DSegmenter


@pytest.mark.parametrize("size", list(SIZES))
def test_shapes_of_every_size(size: str) -> None:
    model = ConvNeXt3D(size, num_classes=3).eval()
    x = torch.randn(2, 1, 32, 64, 32)
    with torch.inference_mode():
        stages = model.forward_stages(x)
        logits = model(x)
    dims = SIZES[size].dims
    assert [tuple(s.shape) for s in stages] == [
        (2, dims[0], 8, 16, 8),
        (2, dims[1], 4, 8, 4),
        (2, dims[2], 2, 4, 2),
        (2, dims[3], 1, 2, 1),
    ]
    assert logits.shape == (2, 3)
    assert model.feature_dim == dims[-1]
    assert len(model.blocks()) == sum(SIZES[size].depths)


def test_the_encoder_is_the_same_class_without_its_head() -> None:
    torch.manual_seed(0)
    classifier = ConvNeXt3D("micro", num_classes=2).eval()
    encoder = ConvNeXt3D("micro").eval()
    state = {k: v for k, v in classifier.state_dict().items() if not k.startswith("head.")}
    encoder.load_state_dict(state, strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.inference_mode():
        feature = encoder(x)
        assert feature.shape == (1, 256)
        torch.testing.assert_close(classifier.head(feature), classifier(x))


def test_layer_scale_starts_small_and_drop_path_acts_in_training_only() -> None:
    model = ConvNeXt3D("micro", drop_path_rate=0.5)
    gammas = [block.gamma for block in model.blocks()]
    assert all(g is not None and torch.all(g == 1e-6) for g in gammas)
    rates = [block.drop_path_rate for block in model.blocks()]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    for g in gammas:  # let the residual branches matter
        assert g is not None
        g.data.fill_(1.0)
    x = torch.randn(4, 1, 32, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        model.train()
        torch.manual_seed(1)
        first = model(x)
        torch.manual_seed(2)
        assert not torch.allclose(first, model(x))


def test_segmenter_gives_full_resolution_logits_and_trains() -> None:
    model = ConvNeXt3DSegmenter(ConvNeXt3D("micro"), num_classes=2, channels=16)
    x = torch.randn(1, 1, 32, 48, 32)
    logits = model(x)
    assert logits.shape == (1, 2, 32, 48, 32)
    logits.mean().backward()
    backbone = model.backbone
    used = [*backbone.downsample_layers.parameters(), *backbone.stages.parameters()]
    assert all(p.grad is not None for p in used)  # all but the pooling norm, unused here
