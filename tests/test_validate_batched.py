"""Validation's batched row: the golden chats teacher-forced as one decode batch (export/validate.py).

A batch-1 check cannot see an artifact whose rows influence each other (an LM head that quantizes
its activations with one scale per run); the batched row must pass for batch-invariant engines and
fail for a row-mixing one, whose batch-1 metrics are untouched.
"""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.artifact.layout import MODEL_FILE
from toolkit.artifact.manifest import load_manifest
from toolkit.export.ort_runner import OrtCausalLM
from toolkit.export.validate import load_reference, teacher_forced_batch, validate_engine_dir, validate_runner
from toolkit.recipes import get_recipe

RECIPE = "qwen2-7b-instruct"


class RowMixingSession:
    """An onnxruntime session whose logits leak between the rows of a run (none at batch 1)."""

    def __init__(self, session, share: float = 0.5):
        self.session, self.share = session, share

    def run(self, names, feeds):
        outputs = self.session.run(names, feeds)
        i = names.index("logits")
        logits = outputs[i]
        outputs[i] = logits + self.share * (logits.mean(axis=0, keepdims=True) - logits)
        return outputs


@pytest.mark.parametrize("graph", ["optimum", "gqa"])
def test_batched_rows_equal_batch_one_rows(graph, tiny_engine):
    engine_dir = tiny_engine(get_recipe(RECIPE), "fp32", graph)
    runner = OrtCausalLM(engine_dir / MODEL_FILE)
    cases = load_reference(engine_dir).cases
    together = teacher_forced_batch(runner, [c.prompt_ids for c in cases], [c.greedy_ids for c in cases])
    assert len({len(c.prompt_ids) for c in cases}) > 1  # rows at different positions (padding exercised)
    for case, got in zip(cases, together):
        alone = runner.teacher_forced(case.prompt_ids, case.greedy_ids)
        assert got.shape == alone.shape
        np.testing.assert_allclose(got, alone, atol=1e-4)


@pytest.mark.parametrize("graph", ["optimum", "gqa"])
def test_validate_reports_and_passes_the_batched_row(graph, tiny_engine):
    engine_dir = tiny_engine(get_recipe(RECIPE), "fp32", graph)
    result = validate_engine_dir(engine_dir, load_manifest(engine_dir))
    batched = result["batched"]
    assert batched["rows"] == len(load_reference(engine_dir).cases)
    assert batched["top1_agreement"] == 1.0 and batched["min_cosine"] > 0.99999
    assert batched["max_abs_diff"] <= result["thresholds"]["max_abs_diff"]
    assert result["passed"], result["failures"]


def test_a_row_mixing_engine_fails_only_the_batched_row(tiny_engine):
    engine_dir = tiny_engine(get_recipe(RECIPE), "fp32", "optimum")
    runner = OrtCausalLM(engine_dir / MODEL_FILE)
    runner.session = RowMixingSession(runner.session)
    reference = load_reference(engine_dir)
    alone = validate_runner(runner, reference, "fp32")  # batch 1 only: the mixing is invisible
    assert alone.passed and alone.batched is None
    result = validate_runner(runner, reference, "fp32", batched=True)
    assert not result.passed
    assert result.failures and all(f.startswith("batched (") for f in result.failures), result.failures
    assert result.batched["max_abs_diff"] > 1e-2
