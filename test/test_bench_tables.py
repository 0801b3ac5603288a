"""The benchmark's generated tables: the memory model's, and the choice of a CPU's fast mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import memory_model
from bench.__main__ import cpu_fast_choice
from bench.docs_block import replace_block


def test_the_modelled_table_covers_prediction_and_fine_tuning(tmp_path: Path) -> None:
    rows = memory_model.figures()
    cases = [row["case"] for row in rows]
    assert sum(case.startswith("predict, Balaitous") for case in cases) == 2
    assert sum(case.startswith("finetune step") for case in cases) == 2
    table = memory_model.markdown(rows)
    assert "not measured on a GPU" in table and table.count("\n| ") == len(rows) + 1
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- gpu-memory-model:start -->\nold\n<!-- gpu-memory-model:end -->\nb\n")
    replace_block("gpu-memory-model", table, readme)
    assert table in readme.read_text() and "old" not in readme.read_text()


def _phantoms(int8: tuple[float, float], bfloat16: tuple[float, float]) -> dict[str, Any]:
    """One phantom's summary: each mode's whole-run seconds and difference from exact."""
    return {
        "small": {
            "ours-int8": {"wall": int8[0]},
            "int8_difference": int8[1],
            "ours-bfloat16": {"wall": bfloat16[0]},
            "bfloat16_difference": bfloat16[1],
        }
    }


def test_the_faster_cpu_mode_within_the_tolerance_is_chosen() -> None:
    faster_bf16 = cpu_fast_choice(_phantoms((40, 0.01), (30, 0.005)), ("AVX512-BF16",), "bfloat16")
    assert faster_bf16["faster"] == "bfloat16" and "differs" not in faster_bf16["line"]
    assert "fast picks bfloat16 on this CPU (AVX512-BF16)" in faster_bf16["line"]
    too_far = cpu_fast_choice(_phantoms((40, 0.01), (30, 0.05)), ("AMX",), "bfloat16")
    assert too_far["faster"] == "int8" and "the default differs" in too_far["line"]
    neither = cpu_fast_choice(_phantoms((40, 0.03), (30, 0.05)), (), "int8")
    assert neither["faster"] is None and "no bfloat16 units" in neither["line"]
