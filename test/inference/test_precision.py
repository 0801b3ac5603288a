"""The precision modes: names, the numerics context, and int8 layers close to float ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stoic_ct.inference.precision import CalibratedInt8, check_precision, int8_linear, numerics


def test_names() -> None:
    assert check_precision("fast") == "fast"
    with pytest.raises(ValueError, match="precision must be one of exact, fast, not 'half'"):
        check_precision("half")


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_cpu_runs_in_float32(precision: str) -> None:
    with numerics(torch.device("cpu"), precision):
        assert torch.get_float32_matmul_precision() == "highest"
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_int8_linear_replaces_linear_layers_and_stays_close() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    x = torch.randn(32, 64)
    with torch.inference_mode():
        expected = model(x)
        quantised = int8_linear(model)
        got = quantised(x)
    assert not any(type(m) is nn.Linear for m in quantised.modules())
    error = (got - expected).norm() / expected.norm()
    assert 0 < error < 0.05


def test_calibrated_int8_convolutions_stay_close() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    samples = torch.rand(4, 1, 32, 32)
    with torch.inference_mode():
        expected = model(samples)
        got = CalibratedInt8(model, samples)(samples)
    error = (got - expected).norm() / expected.norm()
    assert 0 < error < 0.05
