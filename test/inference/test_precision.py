"""The precision modes: names, what fast means on each CPU, the numerics context, and int8
layers close to float ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stoic_ct.errors import StoicError
from stoic_ct.inference import precision as precision_module
from stoic_ct.inference.precision import (
    CalibratedInt8,
    ModelSettings,
    bfloat16_units,
    check_precision,
    cpu_fast,
    int8_linear,
    numerics,
    numerics_of,
    uses_int8,
)

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_names() -> None:
    assert check_precision("fast") == "fast"
    with pytest.raises(
        ValueError, match="precision must be one of exact, fast, int8, bfloat16, not 'half'"
    ):
        check_precision("half")


@pytest.mark.parametrize("precision", ["exact", "fast", "int8"])
def test_cpu_runs_in_float32(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module, "bfloat16_units", lambda: ())  # a CPU without them
    with numerics(CPU, precision):
        assert torch.get_float32_matmul_precision() == "highest"
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert uses_int8(CPU, precision) == (precision != "exact")


@pytest.mark.parametrize(
    ("units", "fast"),
    [((), "int8"), (("AVX512-BF16",), "int8"), (("AMX", "AVX512-BF16"), "bfloat16")],
)
def test_fast_on_a_cpu_follows_its_bfloat16_units(
    units: tuple[str, ...], fast: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cpu_fast(units) == fast and cpu_fast(("AMX",)) == "bfloat16"
    monkeypatch.setattr(precision_module, "bfloat16_units", lambda: units)
    assert numerics_of(CPU, "fast") == fast
    with numerics(CPU, "fast"):
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (torch.bfloat16 if fast == "bfloat16" else torch.float32)
    # Asked for by name, each mode runs whatever the CPU has.
    with numerics(CPU, "bfloat16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert uses_int8(CPU, "int8") and not uses_int8(CPU, "bfloat16")


def test_this_cpu_s_units_are_those_torch_reports() -> None:
    units = bfloat16_units()
    assert set(units) <= {"AMX", "AVX512-BF16"}
    assert ("AMX" in units) == torch.cpu._is_amx_tile_supported()


def test_a_gpu_is_fast_in_float16_and_refuses_the_cpu_modes() -> None:
    assert numerics_of(GPU, "fast") == "float16" and numerics_of(GPU, "exact") == "exact"
    for mode in ("int8", "bfloat16"):
        with pytest.raises(StoicError, match=f"--precision {mode} is one of the CPU's fast modes"):
            ModelSettings(device=GPU, precision=mode)


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
