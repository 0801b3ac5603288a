"""The fake-tensor accounting against the same accounting of real tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

from stoic_ct.device_memory import (
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION,
    INFERENCE_WORKSPACES,
    Program,
    estimate,
)


def _network() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))


def _forward(network: nn.Module, batch: int) -> object:
    with torch.inference_mode():
        return network(torch.zeros(batch, 256))


def test_fake_tensors_count_what_real_ones_hold() -> None:
    torch.manual_seed(0)
    real = _network()
    tracker = MemTracker()
    tracker.track_external(real)
    with tracker:
        _forward(real, 512)
    held = sum(
        int(v)
        for kinds in tracker.get_tracker_snapshot("peak").values()
        for k, v in kinds.items()
        if getattr(k, "value", k) != "Total"
    )
    with torch.device("meta"):
        network = _network()
    modelled = estimate(Program([network], [("forward", lambda: _forward(network, 512))]), 0)
    weights = 4 * (256 * 1024 + 1024 + 1024 * 256 + 256)
    assert modelled.peak_stage.by_kind["parameters"] == weights
    assert modelled.tensors == held
    # The activations (512 x 1024 floats at least) are there, beside the weights.
    assert modelled.peak_stage.by_kind["activations"] >= 512 * 1024 * 4


def test_the_margins_are_added_and_the_highest_stage_counts() -> None:
    with torch.device("meta"):
        network = _network()
    modelled = estimate(
        Program(
            [network],
            [("small", lambda: _forward(network, 8)), ("large", lambda: _forward(network, 4096))],
        ),
        INFERENCE_WORKSPACES,
    )
    small, large = modelled.stages
    assert large.tensors > small.tensors and modelled.peak_stage is large
    assert modelled.total == pytest.approx(
        (1 + FRAGMENTATION) * large.tensors + INFERENCE_WORKSPACES + CUDA_CONTEXT_BYTES, abs=1
    )
    assert modelled.summary().startswith(f"{modelled.total / 1e9:.2f} GB modelled")
    assert "at the large stage" in modelled.summary()


def test_a_program_needs_a_stage() -> None:
    with pytest.raises(ValueError, match="at least one stage"):
        estimate(Program([], []), 0)
