"""The options shared by the commands that run a model: --system, and the old names kept
for one release with a deprecation notice."""

from __future__ import annotations

import argparse

import pytest

import train
from stoic_ct.options import add_model_arguments
from stoic_ct.weights.model_files import SYSTEMS


def model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="process.py")
    add_model_arguments(parser, system=True)
    return parser


def test_system_takes_each_system_and_nothing_else(capsys: pytest.CaptureFixture[str]) -> None:
    parser = model_parser()
    assert parser.parse_args([]).system is None
    for system in SYSTEMS:
        assert parser.parse_args(["--system", system]).system == system
    with pytest.raises(SystemExit):
        parser.parse_args(["--system", "both"])
    assert "invalid choice: 'both'" in capsys.readouterr().err


def test_the_old_model_option_still_works_says_so_and_is_not_listed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parser = model_parser()
    assert parser.parse_args(["--model", "convnext3d"]).system == "convnext3d"
    assert "--model is deprecated" in caplog.text and "now called --system" in caplog.text
    assert "--system {balaitous,convnext3d,ensemble}" in parser.format_help()
    assert "--model " not in parser.format_help()
    caplog.clear()
    assert parser.parse_args(["--system", "ensemble"]).system == "ensemble"
    assert "deprecated" not in caplog.text


def test_train_py_trains_the_ensemble_by_default_and_reads_both_as_its_old_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert train.parse_args([]).system == "ensemble"
    assert "deprecated" not in caplog.text
    assert train.parse_args(["--system", "both"]).system == "ensemble"
    assert "--system both is deprecated" in caplog.text
    assert train.parse_args(["--system", "balaitous"]).system == "balaitous"
