"""Check a run's outputs on the shipped test case (test/input) against the expected values
for the model files that made them: the last step of `make demo` and `./test.sh`.

`test/expected_output.json`, beside the case, lists cases, each keyed by its model files:
the sha256 of the four real files, or, for random weights, the recipe line of their
RANDOM_WEIGHTS marker (torch.save's bytes differ between runs). Outputs made with model
files that have a case must match it within the tolerance; others are checked for format
and range only, and the verdict says so.

    python3 -m scripts.check_outputs OUTPUT_DIR [--model-dir DIR] [--expected FILE]
        [--record NOTE]

Run from the repository's root. Standard library only (beside the package's standard-library
modules): test.sh runs it on a host without the project's packages.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoic_ct.errors import StoicError
from stoic_ct.io.output_names import COVID_OUTPUT, SEVERE_OUTPUT
from stoic_ct.weights.model_files import (
    ALL_FILES,
    REPOSITORY_MODEL_DIR,
    ModelFiles,
    sha256_of,
)

OUTPUT_NAMES = (COVID_OUTPUT, SEVERE_OUTPUT)
# Beside the test case of the checkout this script is in (absolute, not resolved: a checkout
# made of links reads its own).
EXPECTED_FILE = Path(__file__).absolute().parent.parent / "test" / "expected_output.json"
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Verdict:
    """`ok` False means the outputs are wrong; `message` says what was checked."""

    ok: bool
    message: str


def model_key(model_dir: Path) -> dict[str, Any]:
    """What identifies the model files: their sha256 sums, or the random weights' recipe."""
    files = ModelFiles(model_dir)
    if files.are_random:
        return {"random_weights": files.random_recipe}
    return {"sha256": {spec.name: sha256_of(files.path(spec)) for spec in ALL_FILES}}


def read_outputs(output_dir: Path) -> tuple[dict[str, float], list[str]]:
    """The two outputs as floats, and the problems found (missing, not JSON, not in [0, 1])."""
    values, problems = {}, []
    for name in OUTPUT_NAMES:
        path = output_dir / name
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            problems.append(f"{path}: not a readable JSON file ({error})")
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, float | int)
            or not (math.isfinite(value) and 0.0 <= value <= 1.0)
        ):
            problems.append(f"{path}: {value!r} is not a probability")
            continue
        values[name] = float(value)
    return values, problems


def check(output_dir: Path, model_dir: Path, expected_file: Path = EXPECTED_FILE) -> Verdict:
    """Compare the outputs with the case of `expected_file` that has these model files."""
    values, problems = read_outputs(output_dir)
    if problems:
        return Verdict(False, "FAIL: " + "; ".join(problems))
    key = model_key(model_dir)
    cases = json.loads(expected_file.read_text(encoding="utf-8"))["cases"]
    case = next((c for c in cases if c["model"] == key), None)
    shown = ", ".join(f"{name} = {values[name]:.6f}" for name in OUTPUT_NAMES)
    if case is None:
        return Verdict(
            True,
            f"format and range ok ({shown}); {expected_file} has no expected "
            "values for these model files, so the values were not compared",
        )
    differences = {name: abs(values[name] - case["outputs"][name]) for name in OUTPUT_NAMES}
    worst = max(differences.values())
    if worst > TOLERANCE:
        wrong = ", ".join(
            f"{name} {values[name]:.6f} instead of {case['outputs'][name]:.6f}"
            for name, d in differences.items()
            if d > TOLERANCE
        )
        return Verdict(False, f"FAIL: {wrong} (tolerance {TOLERANCE:g}; case: {case['note']})")
    return Verdict(
        True,
        f"ok: {shown} match the expected values for these model files within "
        f"{TOLERANCE:g} (largest difference {worst:.1e}; case: {case['note']})",
    )


def record(
    output_dir: Path, model_dir: Path, note: str, expected_file: Path = EXPECTED_FILE
) -> None:
    """Add (or replace) the case for these model files with the outputs of a trusted run."""
    values, problems = read_outputs(output_dir)
    if problems:
        raise ValueError("; ".join(problems))
    data = json.loads(expected_file.read_text(encoding="utf-8"))
    key = model_key(model_dir)
    data["cases"] = [c for c in data["cases"] if c["model"] != key]
    data["cases"].append({"note": note, "model": key, "outputs": values})
    expected_file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the verdict; 0 unless the outputs are wrong."""
    parser = argparse.ArgumentParser(
        prog="python3 -m scripts.check_outputs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output_dir", type=Path, help="folder with the two output files")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=REPOSITORY_MODEL_DIR,
        help="the model files that made the outputs (default: model/)",
    )
    parser.add_argument(
        "--expected",
        type=Path,
        default=EXPECTED_FILE,
        help="expected values (default: test/expected_output.json)",
    )
    parser.add_argument(
        "--record",
        metavar="NOTE",
        default=None,
        help="record these outputs as the expected values for these model files",
    )
    args = parser.parse_args(argv)
    try:
        if args.record is not None:
            record(args.output_dir, args.model_dir, args.record, args.expected)
            print(f"recorded the outputs of {args.output_dir} in {args.expected}")
            return 0
        verdict = check(args.output_dir, args.model_dir, args.expected)
    except (StoicError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(verdict.message)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
