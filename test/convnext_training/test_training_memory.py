"""The GPU memory of a fine-tuning step, modelled."""

from __future__ import annotations

from dataclasses import replace

from stoic_ct.convnext_training.recipes import PRESETS, FinetuneSettings
from stoic_ct.convnext_training.training_memory import finetune_step_peak
from stoic_ct.device_memory import GB
from timings import Timings


def test_the_winner_recipe_fits_the_final_phase_gpus(timings: Timings) -> None:
    settings = FinetuneSettings(**PRESETS["stoic2021-winner"])  # tiny, 256^3, batch 4, AMP
    assert (settings.size, settings.input_size, settings.batch_size) == ("tiny", 256, 4)
    modelled = finetune_step_peak(settings)
    timings.text(
        "GPU memory, finetune --preset stoic2021-winner step (modelled)", modelled.summary()
    )
    assert modelled.total <= 30 * GB
    step = modelled.peak_stage.by_kind
    # The network and its EMA copy (float32), and AdamW's two moments from the first step.
    weights = 4 * 31.4e6
    assert 1.9 * weights < step["parameters"] < 2.1 * weights
    assert 1.9 * weights < step["optimiser"] < 2.1 * weights
    assert modelled.stages[0].by_kind.get("optimiser", 0) < step["optimiser"]


def test_the_step_grows_with_the_batch_and_the_cube() -> None:
    def activations(settings: FinetuneSettings) -> int:
        return finetune_step_peak(settings).peak_stage.by_kind["activations"]

    base = FinetuneSettings(input_size=64, batch_size=1)
    small = activations(base)
    assert 1.8 * small < activations(replace(base, batch_size=2)) < 2.2 * small
    assert 2.7 * small < activations(replace(base, input_size=96)) < 3.7 * small  # 3.4 x voxels
