"""Checking outputs against the expected values of the model files that made them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.check_outputs import OUTPUT_NAMES, check, main, model_key, read_outputs, record
from stoic_ct.weights.model_files import ALL_FILES, RANDOM_WEIGHTS_MARKER

REPOSITORY = Path(__file__).resolve().parents[1]


def write_outputs(folder: Path, covid: object, severe: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in zip(OUTPUT_NAMES, (covid, severe), strict=True):
        (folder / name).write_text(json.dumps(value))
    return folder


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """Four stand-in files: model_key only hashes them."""
    folder = tmp_path / "model"
    folder.mkdir()
    for spec in ALL_FILES:
        (folder / spec.name).write_bytes(spec.name.encode())
    return folder


@pytest.fixture
def expected(tmp_path: Path) -> Path:
    path = tmp_path / "expected.json"
    path.write_text(json.dumps({"cases": []}))
    return path


def test_shipped_expected_values_hold_the_random_weights_case() -> None:
    cases = json.loads((REPOSITORY / "test" / "expected_output.json").read_text())["cases"]
    recipes = [c["model"]["random_weights"] for c in cases if "random_weights" in c["model"]]
    assert any(r.startswith("stoic_ct.random_weights v1; seed 0;") for r in recipes)


@pytest.mark.parametrize(
    ("covid", "severe", "problem"),
    [
        (0.5, 1.5, "1.5 is not a probability"),
        (True, 0.5, "True is not a probability"),
        (float("nan"), 0.5, "is not a probability"),
        ("0.5", 0.5, "'0.5' is not a probability"),
    ],
)
def test_bad_outputs(tmp_path: Path, covid: object, severe: object, problem: str) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    for name, value in zip(OUTPUT_NAMES, (covid, severe), strict=True):
        (folder / name).write_text(json.dumps(value))
    _, problems = read_outputs(folder)
    assert any(problem in p for p in problems), problems


def test_missing_output(tmp_path: Path, model_dir: Path, expected: Path) -> None:
    (tmp_path / "out").mkdir()
    verdict = check(tmp_path / "out", model_dir, expected)
    assert not verdict.ok
    assert "probability-covid-19.json: not a readable JSON file" in verdict.message


def test_unknown_model_files_are_checked_for_range_only(
    tmp_path: Path, model_dir: Path, expected: Path
) -> None:
    verdict = check(write_outputs(tmp_path / "out", 0.25, 0.5), model_dir, expected)
    assert verdict.ok
    assert "no expected values for these model files, so the values were not compared" in (
        verdict.message
    )


def test_recorded_case_is_compared(tmp_path: Path, model_dir: Path, expected: Path) -> None:
    record(write_outputs(tmp_path / "trusted", 0.25, 0.5), model_dir, "trusted run", expected)
    close = check(write_outputs(tmp_path / "close", 0.25 + 5e-5, 0.5), model_dir, expected)
    assert close.ok and "largest difference 5.0e-05" in close.message
    far = check(write_outputs(tmp_path / "far", 0.2502, 0.5), model_dir, expected)
    assert not far.ok
    assert "probability-covid-19.json 0.250200 instead of 0.250000" in far.message
    # Other model files: no longer compared.
    (model_dir / "balaitous.npz").write_bytes(b"other heads")
    assert "not compared" in check(tmp_path / "far", model_dir, expected).message


def test_random_weights_are_keyed_by_recipe(model_dir: Path) -> None:
    (model_dir / RANDOM_WEIGHTS_MARKER).write_text("random\nrecipe: made this way\n")
    assert model_key(model_dir) == {"random_weights": "made this way"}


def test_command_exit_codes(tmp_path: Path, model_dir: Path, expected: Path) -> None:
    good = write_outputs(tmp_path / "good", 0.25, 0.5)
    args = ["--model-dir", str(model_dir), "--expected", str(expected)]
    assert main([str(good), *args]) == 0
    assert main([str(write_outputs(tmp_path / "bad", 2.0, 0.5)), *args]) == 1
    assert (
        main([str(good), "--model-dir", str(tmp_path / "nowhere"), "--expected", str(expected)])
        == 2
    )


def test_needs_only_the_standard_library() -> None:
    """test.sh runs it with a bare python3: no site-packages."""
    done = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {str(REPOSITORY)!r}); import scripts.check_outputs",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
