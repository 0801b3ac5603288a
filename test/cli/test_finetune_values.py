"""train.py --convnext KEY=VALUE: each value read by the `finetune` option of its field, so
that the two ways of giving fine-tuning settings parse them once."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import pytest

from stoic_ct.cli.convnext import finetune_settings_arguments, finetune_values, given_settings
from stoic_ct.convnext_training.recipes import PRESETS, FinetuneSettings
from stoic_ct.errors import StoicError


def test_convnext_values_take_their_fields_types() -> None:
    values = finetune_values(["epochs=3", "init=none", "metadata=false", "lr=1e-4"])
    assert values == {"epochs": 3, "init": None, "metadata": False, "lr": 1e-4}
    assert finetune_values(["schedule_end=20"]) == {"schedule_end": 20}
    with pytest.raises(StoicError, match="KEY one of"):
        finetune_values(["epoch=3"])
    with pytest.raises(StoicError, match="'three' is not a"):
        finetune_values(["epochs=three"])


def test_every_field_reads_back_what_settings_json_holds() -> None:
    """The winner's recipe written as KEY=VALUE pairs, as settings.json holds them, gives
    the same settings: every field has an option, and each option reads its field."""
    recipe = asdict(FinetuneSettings(**PRESETS["stoic2021-winner"], init="/models/a.pth"))
    pairs = [f"{key}={value}" for key, value in recipe.items()]
    assert FinetuneSettings(**finetune_values(pairs)) == FinetuneSettings(**recipe)


def test_the_options_check_what_the_pairs_give() -> None:
    """A value the `finetune` option refuses is refused as a pair too, with the option's
    reason; none clears only a field that may be empty."""
    with pytest.raises(StoicError, match=r"'cubic' is not a valid schedule .*invalid choice"):
        finetune_values(["schedule=cubic"])
    with pytest.raises(StoicError, match="'yes' is not a valid metadata"):
        finetune_values(["metadata=yes"])
    with pytest.raises(StoicError, match="'none' is not a valid epochs"):
        finetune_values(["epochs=none"])
    assert finetune_values(["metadata=TRUE", "ema_decay=0.9"]) == {
        "metadata": True,
        "ema_decay": 0.9,
    }


def test_finetune_and_train_py_give_the_same_values() -> None:
    """The same settings through `finetune`'s options and through KEY=VALUE pairs."""
    parser = argparse.ArgumentParser()
    finetune_settings_arguments(parser)
    options = ["--epochs", "7", "--ema", "0.95", "--no-metadata", "--init", "x.pth"]
    pairs = ["epochs=7", "ema_decay=0.95", "metadata=false", "init=x.pth"]
    names = list(asdict(FinetuneSettings()))
    assert given_settings(parser.parse_args(options), names) == finetune_values(pairs)
    assert finetune_values(["init=x.pth"]) == {"init": str(Path("x.pth").resolve())}
