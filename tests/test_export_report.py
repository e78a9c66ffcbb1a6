"""``toolkit validate`` / export's validation table (export/report.py) shows every row validation judges."""

from __future__ import annotations

import pytest
from rich.console import Console

from toolkit.artifact.manifest import load_manifest
from toolkit.export.report import print_validation
from toolkit.export.validate import validate_engine_dir
from toolkit.recipes import get_recipe


@pytest.fixture(scope="module")
def result(tiny_engine):
    """``toolkit validate``'s result for a tiny gqa engine (with its batched row)."""
    engine_dir = tiny_engine(get_recipe("qwen2-7b-instruct"), "fp32", "gqa")
    return validate_engine_dir(engine_dir, load_manifest(engine_dir))


def _printed(validation: dict) -> list[str]:
    console = Console(record=True, width=240, color_system=None)
    print_validation(console, validation)
    return console.export_text().splitlines()


def _row(lines: list[str], label: str) -> list[str]:
    [line] = [line for line in lines if line.strip("│ ").startswith(label)]
    return [cell.strip() for cell in line.strip().strip("│").split("│")]


def test_the_batched_row_is_printed_with_its_metrics_and_its_failure(result):
    batched = result["batched"]
    label, greedy, top1, cosine, max_abs = _row(_printed(result), f"batched ({batched['rows']} rows)")
    assert greedy == "–"  # not measured in the batch (teacher-forced only), so not shown as a pass
    assert top1 == f"{batched['top1_agreement']:.3f} (worst row {batched['worst_top1_agreement']:.3f})"
    assert (cosine, max_abs) == (f"{batched['min_cosine']:.6f}", f"{batched['max_abs_diff']:.4g}")
    # the same numbers as the batch-1 "all" row's columns, formatted alike
    assert _row(_printed(result), "all")[3].split(" ")[0] == f"{result['min_cosine']:.6f}"

    failing = {**result, "batched": {**batched, "min_cosine": 0.5}, "passed": False,
               "failures": [f"batched ({batched['rows']} rows): logits cosine 0.500000 < {result['thresholds']['min_cosine']}"]}
    lines = _printed(failing)
    assert _row(lines, "batched")[3] == "0.500000"
    assert any(line.startswith("FAILED") and "batched" in line for line in lines)


def test_a_validation_without_a_batched_row_prints_none(result):
    lines = _printed({**result, "batched": None})  # TensorRT-LLM engines, manifests from before the row
    assert not [line for line in lines if "batched" in line]
    assert _row(lines, "all")  # the rest of the table is unchanged
