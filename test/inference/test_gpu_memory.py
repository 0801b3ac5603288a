"""The GPU memory of a chest scan's prediction, modelled, and the batch sizes chosen by it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from stoic_ct.device_memory import GB
from stoic_ct.errors import StoicError
from stoic_ct.inference.encoders import VIT_BATCH, SliceEncoder
from stoic_ct.inference.gpu_memory import (
    ConvNeXtShape,
    Workload,
    check_fits,
    fit_batches,
    modelled_peak,
    workload_of,
)
from stoic_ct.inference.lung_masks import R231_BATCH, R231Segmenter
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.inference.precision import ModelSettings
from stoic_ct.inference.systems import fit_to_gpu
from timings import Timings

WINNER = ConvNeXtShape("tiny", 256, outputs=1, metadata=2)


@pytest.mark.parametrize(("precision", "limit_gb"), [("exact", 10.0), ("fast", 6.0)])
def test_a_chest_scan_fits_a_t4_at_the_default_batches(
    precision: str, limit_gb: float, timings: Timings
) -> None:
    workload = Workload(precision)  # 512 x 512 x 300 at 0.7 x 0.7 x 1.25 mm
    assert (workload.vit_batch, workload.r231_batch) == (VIT_BATCH["cuda"], R231_BATCH["cuda"])
    modelled = modelled_peak(workload)
    timings.text(f"GPU memory, balaitous {precision}, chest scan (modelled)", modelled.summary())
    assert modelled.total <= limit_gb * GB
    # Both ViT-L encoders (304 M and 203 M float32 weights) and the U-Net stay resident.
    weights = modelled.peak_stage.by_kind["parameters"]
    assert 2.0 * GB < weights < 2.2 * GB
    assert [s.name for s in modelled.stages] == ["lung mask", "encoder full", "encoder lung"]


def test_the_ensemble_adds_the_fine_tuned_folds(timings: Timings) -> None:
    alone = modelled_peak(Workload())
    ensemble = modelled_peak(Workload(classifiers=((WINNER, 5), (WINNER, 5))))
    timings.text("GPU memory, ensemble exact, chest scan (modelled)", ensemble.summary())
    # Ten ConvNeXt-tiny networks (31 M float32 weights each, inflated to 3D) join the ViTs.
    weights = 4 * sum(p.numel() for p in WINNER.build().parameters())
    added = ensemble.stages[0].by_kind["parameters"] - alone.stages[0].by_kind["parameters"]
    assert added == 10 * weights and 30e6 < weights / 4 < 32e6
    assert ensemble.total <= 10 * GB


def test_larger_batches_take_more_and_fast_takes_less() -> None:
    small, large = modelled_peak(Workload(vit_batch=8)), modelled_peak(Workload(vit_batch=32))
    activations = [m.stages[1].tensors - m.stages[1].by_kind["parameters"] for m in (small, large)]
    assert activations[1] > 3 * activations[0]
    assert modelled_peak(Workload("fast")).tensors < modelled_peak(Workload()).tensors


def test_batches_are_halved_until_the_model_fits() -> None:
    default = modelled_peak(Workload())
    budget = default.beyond_context - 1
    fitted = fit_batches(Workload(), budget)
    assert fitted != Workload()
    assert modelled_peak(fitted).beyond_context <= budget
    assert fitted.r231_batch is not None and fitted.r231_batch <= R231_BATCH["cuda"]
    assert fitted.vit_batch <= VIT_BATCH["cuda"]
    assert fit_batches(Workload(), default.beyond_context) == Workload()
    with pytest.raises(StoicError, match=r"the GPU has 1\.0 GB free .* smallest batches"):
        fit_batches(Workload(), 1 * GB)


def test_a_batch_the_model_says_does_not_fit_is_refused() -> None:
    with pytest.raises(StoicError, match=r"ViT batch 256.* lower --batch-size"):
        check_fits(Workload(vit_batch=256), 4 * GB)


def test_the_workload_of_a_loaded_model(tiny_model_dir: Path) -> None:
    model = Balaitous.from_model_dir(tiny_model_dir, ModelSettings(batch_size=5))
    workload = workload_of(model, [], "exact")
    assert [c.embed_dim for c in workload.vits] == [64, 64]
    assert [c.depth for c in workload.vits] == [24, 16]
    assert (workload.vit_batch, workload.r231_batch) == (5, R231_BATCH["cpu"])
    assert workload.classifiers == () and workload.frozen is None


def test_fit_to_gpu_sets_the_batches_that_fit(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = Balaitous.from_model_dir(tiny_model_dir)
    on_gpu = ModelSettings(device=torch.device("cuda"))
    workload = replace(workload_of(model, [], "exact"), vit_batch=32, r231_batch=8)
    budget = modelled_peak(replace(workload, vit_batch=8, r231_batch=2)).beyond_context
    caplog.set_level(logging.INFO)
    fit_to_gpu(model, on_gpu, budget)
    assert isinstance(model.full, SliceEncoder) and isinstance(model.segmenter, R231Segmenter)
    chosen = replace(
        workload, vit_batch=model.full.batch_size, r231_batch=model.segmenter.batch_size
    )
    assert modelled_peak(chosen).beyond_context <= budget
    assert model.segmenter.batch_size < 8
    assert "GPU memory: U-Net batch" in caplog.text
    fit_to_gpu(model, ModelSettings(), 1)  # on a CPU: nothing to fit
