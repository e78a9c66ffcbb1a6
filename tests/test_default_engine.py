"""End to end on the real embedded default model (Gemma 3 270M): export, reference vectors, validation, engine."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.export.golden import Reference
from toolkit.artifact.manifest import load_manifest
from toolkit.export.pipeline import ExportRequest, ensure_default_engine, run_export
from toolkit.export.progress import StageReporter
from toolkit.export.sources import default_engine_dir
from toolkit.recipes import get_recipe
from toolkit.recipes.chat_format import render_chat
from toolkit.runtime import load_engine
from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.types import GenerateRequest

pytestmark = pytest.mark.slow
# The default model's reference vectors (PyTorch fp32, transformers 5.23), kept in tests/data.
VECTORS = json.loads((Path(__file__).resolve().parent / "data" / "default-model-vectors.json").read_text())


@pytest.fixture(scope="module")
def int8_dir() -> Path:
    return ensure_default_engine(StageReporter(quiet=True), "int8")


@pytest.fixture(scope="module")
def fp32_dir() -> Path:
    recipe = get_recipe("default")
    out = default_engine_dir(recipe, "onnx", "fp32")
    run_export(ExportRequest(recipe, "onnx", "fp32", out), StageReporter(quiet=True))
    return out


def _vectors():
    return VECTORS


def test_chat_template_gives_reference_prompt_ids(int8_dir):
    from toolkit.runtime.prompting import load_tokenizer

    vectors = _vectors()
    text = render_chat("gemma", vectors["messages"])
    assert text == vectors["prompt_text"]
    assert load_tokenizer(int8_dir)(text, add_special_tokens=False)["input_ids"] == vectors["prompt_ids"]


def test_fp32_onnx_reproduces_reference_continuation(fp32_dir):
    from toolkit.export.ort_runner import OrtCausalLM

    vectors = _vectors()
    tokens, _ = OrtCausalLM(fp32_dir / "model.onnx").greedy(vectors["prompt_ids"], len(vectors["greedy_new_ids_fp32"]))
    assert tokens == vectors["greedy_new_ids_fp32"]


def test_fp32_and_int8_validate(fp32_dir, int8_dir):
    for engine_dir in (fp32_dir, int8_dir):
        result = CliRunner().invoke(main, ["validate", str(engine_dir)])
        assert result.exit_code == 0, result.output
        assert "PASSED" in result.output
    validation = load_manifest(int8_dir).validation
    assert validation["passed"] and validation["pytorch_check"]["passed"]
    assert load_manifest(fp32_dir).validation["greedy_identical"] == 8
    for engine_dir in (fp32_dir, int8_dir):  # the long golden prompt: > 2k tokens, past the 512-token window
        [long_row] = load_manifest(engine_dir).validation["long_cases"]
        assert long_row["prompt_tokens"] > 2048 > 512 == Reference.load(engine_dir).sliding_window, long_row
    assert load_manifest(fp32_dir).validation["long"]["greedy_identical"] == 1


async def _run(engine, request):
    deltas, reasons = [], []
    async for out in await engine.generate(request):
        for choice in out.choices:
            deltas.append(choice.text)
            reasons.append(choice.finish_reason)
    return deltas, reasons


async def _batched_greedy(engine_dir, cases, extra=None):
    """Greedy 32-token continuations of ``cases`` submitted at staggered times to one engine.

    ``extra(engine)``: one more request, built with the started engine's prompts, run after them.
    """
    engine = load_engine(engine_dir)
    await engine.start()

    async def one(case, delay):
        await asyncio.sleep(delay)
        ids = []
        request = GenerateRequest(prompt_ids=case.prompt_ids, params=SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        async for out in await engine.generate(request):
            ids += [t for c in out.choices for t in c.token_ids]
        return ids

    batched = await asyncio.gather(*[one(c, 0.05 * i) for i, c in enumerate(cases)])
    extra_out = await _run(engine, extra(engine)) if extra is not None else None
    await engine.stop()
    return batched, extra_out


def _prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n / len(a)


def test_fp32_engine_batched_equals_reference(fp32_dir):
    """fp32: staggered batched greedy == the stored one-at-a-time onnxruntime reference, token for token."""
    reference = Reference.load(fp32_dir)
    batched, _ = asyncio.run(_batched_greedy(fp32_dir, reference.cases))
    assert batched == [c.greedy_ids for c in reference.cases]


def test_int8_engine_batched_close_to_alone_and_utf8_safe(int8_dir):
    """int8: MatMulNBits (accuracy_level 4) quantizes activations to int8 and takes other kernels at M > 1,
    so batched decoding is not bit-exact with batch 1 (measured: 2-7 of 8 prompts identical, the others
    diverging after 14-23 tokens at a near-tie). Require the same closeness as int8 validation's bar."""
    from toolkit.export.ort_runner import OrtCausalLM

    reference = Reference.load(int8_dir)
    japanese = lambda engine: GenerateRequest(  # noqa: E731
        engine.prompts.encode(messages=[{"role": "user", "content": "Write 'good morning' in Japanese, Chinese and as an emoji."}]),
        SamplingParams(max_tokens=48, temperature=0),
    )
    batched, (deltas, _) = asyncio.run(_batched_greedy(int8_dir, reference.cases, japanese))
    runner = OrtCausalLM(int8_dir / "model.onnx")
    alone = [runner.greedy(c.prompt_ids, 32)[0] for c in reference.cases]
    agreement = [_prefix(a, b) for a, b in zip(alone, batched)]
    assert sum(agreement) / len(agreement) >= 0.4 and min(agreement) >= 0.25, agreement
    assert load_manifest(int8_dir).precision == "int8"
    assert all("\ufffd" not in d for d in deltas)
    assert any(ord(ch) > 0x2E80 for ch in "".join(deltas)), "expected CJK or emoji in the output"


def test_int8_engine_json_mode_parses(int8_dir):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}

    async def main_():
        engine = load_engine(int8_dir)
        await engine.start()
        out = await _run(
            engine,
            GenerateRequest(
                engine.prompts.encode(messages=[{"role": "user", "content": "Give me a JSON object describing a person."}]),
                SamplingParams(max_tokens=64, temperature=0.7, seed=3, json_schema=schema),
            ),
        )
        await engine.stop()
        return out

    deltas, reasons = asyncio.run(main_())
    value = json.loads("".join(deltas))
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    # sampled: the object closes by itself ("stop") or the grammar's budget closes it at max_tokens ("length");
    # either way it parses (which of the two a seed gives moved with float32 rounding in the attention)
    assert reasons[-1] in ("stop", "length") and reasons.count(None) == len(reasons) - 1
