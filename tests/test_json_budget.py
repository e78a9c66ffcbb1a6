"""JSON that always parses: when max_tokens (or the context) runs short, the JSON constraint
steers decoding to the shortest valid completion, and such a reply ends with "length".

Unit tests drive SequenceSampler with random logits over a small byte-fallback tokenizer; the
engine tests run a tiny random ONNX engine, whose text inside strings rambles until cut.
"""

from __future__ import annotations

import asyncio
import json
import random

import jsonschema
import numpy as np
import pytest
from test_json_constraint import EOS, SCHEMA, factory, tokenizer  # noqa: F401 - fixtures shared with the constraint tests

from toolkit.recipes import get_recipe
from toolkit.runtime import load_engine
from toolkit.runtime.sampler import SequenceSampler
from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.types import GenerateRequest

NESTED = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "count": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "owner": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                  "required": ["name"], "additionalProperties": False},
        "rows": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    },
    "required": ["title"],
    "additionalProperties": False,
}


def _run(tokenizer, factory, params, seed, closers_bias=0.0):
    """Sample with random logits under ``params.max_tokens``; (text, sampler)."""
    sampler = SequenceSampler(params, constraint_factory=factory)
    rng = np.random.default_rng(seed)
    out: list[int] = []
    letters = [tokenizer.token_to_id(c) for c in "abcdefgh"]
    while len(out) < params.max_tokens:
        logits = rng.standard_normal(tokenizer.get_vocab_size()).astype(np.float32) * 2
        logits[letters] += closers_bias  # rambling inside strings, like a small base model
        token = sampler.sample(logits, out, budget=params.max_tokens - len(out)).token_id
        if token == EOS:
            break
        out.append(token)
        if sampler.constraint.is_finished():
            break
    return tokenizer.decode(out), sampler


def test_shortest_document_is_what_the_closing_path_gives(tokenizer, factory):
    constraint = factory(SamplingParams(json_schema=SCHEMA))
    path = constraint.closing_path()
    value = json.loads(tokenizer.decode(path))
    jsonschema.validate(value, SCHEMA)
    assert value == {"name": "", "age": 0, "ok": True}
    for token in tokenizer.encode('{"name": "abcdefg').ids:
        assert constraint.accept(token)
    rest = constraint.closing_path()
    assert json.loads('{"name": "abcdefg' + tokenizer.decode(rest))["name"] == "abcdefg"


@pytest.mark.parametrize("schema", [SCHEMA, NESTED, None], ids=["flat", "nested", "object"])
def test_every_budget_gives_valid_json(tokenizer, factory, schema):
    """From the shortest document's length upward, every budget ends in complete, schema-valid JSON."""
    probe = factory(SamplingParams(json_schema=schema, json_object=schema is None))
    shortest = len(probe.closing_path())
    steered = 0
    for seed in range(60):
        params = SamplingParams(seed=seed, max_tokens=shortest + seed % 25, json_schema=schema,
                                json_object=schema is None)
        text, sampler = _run(tokenizer, factory, params, seed, closers_bias=3.0)
        value = json.loads(text)
        jsonschema.validate(value, schema or {"type": "object"})
        steered += sampler.constraint.steered
    assert steered >= 20, "the budget should have cut most of these rambling replies"


def test_ample_budget_changes_nothing(tokenizer, factory):
    """With room to spare the steering never replaces a token: same text as without a budget."""
    for seed in range(10):
        params = SamplingParams(seed=seed, max_tokens=400, json_schema=SCHEMA)
        with_budget, sampler = _run(tokenizer, factory, params, seed)
        plain = SequenceSampler(params, constraint_factory=factory)
        rng, out = np.random.default_rng(seed), []
        while len(out) < 400:
            logits = rng.standard_normal(tokenizer.get_vocab_size()).astype(np.float32) * 2
            token = plain.sample(logits, out).token_id
            if token == EOS:
                break
            out.append(token)
            if plain.constraint.is_finished():
                break
        assert not sampler.constraint.steered
        assert with_budget == tokenizer.decode(out)


def test_budget_below_the_shortest_document_closes_as_fast_as_it_can(tokenizer, factory):
    params = SamplingParams(seed=1, max_tokens=400, json_schema=SCHEMA)
    constraint = factory(params)
    shortest = len(constraint.closing_path())
    text, sampler = _run(tokenizer, factory, params.replace(max_tokens=shortest), seed=1, closers_bias=3.0)
    assert json.loads(text) == {"name": "", "age": 0, "ok": True}


# -- a tiny random ONNX engine ---------------------------------------------------------------------

async def _collect(engine, request):
    text, reasons = "", []
    async for out in await engine.generate(request):
        for c in out.choices:
            text += c.text
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return text, reasons


@pytest.fixture(scope="module")
def qwen_dir(tiny_engine):
    return tiny_engine(get_recipe("qwen2-7b-instruct"))


def test_tiny_engine_small_max_tokens_always_parse(qwen_dir):
    """max_tokens 8-20 on a random model (which rambles inside strings): every reply parses,
    validates, and a reply the budget closed ends with "length"."""
    rng = random.Random(11)
    optional = {**NESTED, "required": []}  # its shortest document, {}, fits any budget
    cases = [(rng.randint(8, 20), seed, optional if seed % 2 else None) for seed in range(24)]

    async def main():
        engine = load_engine(qwen_dir)
        await engine.start()
        try:
            async def one(max_tokens, seed, schema):
                ids = engine.prompts.encode(messages=[{"role": "user", "content": f"JSON please {seed}"}])
                params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed,
                                        json_schema=schema, json_object=schema is None)
                return await _collect(engine, GenerateRequest(ids, params))

            return await asyncio.gather(*[one(*c) for c in cases])
        finally:
            await engine.stop()

    results = asyncio.run(main())
    for (max_tokens, seed, schema), (text, reasons) in zip(cases, results):
        value = json.loads(text)
        jsonschema.validate(value, schema or {"type": "object"})
        assert len(reasons) == 1 and reasons[0] in ("stop", "length")
    assert sum(r == ["length"] for _, r in results) >= len(cases) // 2, results


def test_tiny_engine_reply_that_ends_itself_is_stop(qwen_dir):
    """A budget the reply never comes near leaves the model's own ending: "stop"."""
    async def main():
        engine = load_engine(qwen_dir)
        await engine.start()
        try:
            ids = engine.prompts.encode(messages=[{"role": "user", "content": "JSON"}])
            schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                      "additionalProperties": False}
            return await _collect(engine, GenerateRequest(ids, SamplingParams(max_tokens=40, temperature=0, json_schema=schema)))
        finally:
            await engine.stop()

    text, reasons = asyncio.run(main())
    assert json.loads(text) in ({"ok": True}, {"ok": False})
    assert reasons == ["stop"]


# -- the real default model (Gemma 3 270M int8) ----------------------------------------------------

DEFAULT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "author": {"type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
                   "required": ["name"], "additionalProperties": False},
        "chapters": {"type": "array", "items": {
            "type": "object", "properties": {"title": {"type": "string"}, "pages": {"type": "integer"}},
            "required": ["title", "pages"], "additionalProperties": False}},
    },
    "required": ["title", "tags"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_default_model_200_budgets_all_parse_and_validate():
    """200 requests, max_tokens drawn from 12-64 (seeded), 16 at a time through one engine:
    every reply parses and validates against a schema with nested objects, arrays, strings
    and integers."""
    import time

    from toolkit.export.pipeline import ensure_default_engine
    from toolkit.export.progress import StageReporter

    engine_dir = ensure_default_engine(StageReporter(quiet=True))
    rng = random.Random(2024)
    budgets = [rng.randint(12, 64) for _ in range(200)]

    async def main():
        engine = load_engine(engine_dir)
        await engine.start()
        try:
            prompt = ("Describe a book as a JSON object with its title, year, tags, author (name, born) "
                      "and chapters (title, pages).")
            ids = engine.prompts.encode(messages=[{"role": "user", "content": prompt}])
            gate = asyncio.Semaphore(16)

            async def one(i, max_tokens):
                params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, json_schema=DEFAULT_SCHEMA)
                async with gate:
                    return await _collect(engine, GenerateRequest(ids, params))

            started = time.monotonic()
            results = await asyncio.gather(*[one(i, m) for i, m in enumerate(budgets)])
            return results, time.monotonic() - started
        finally:
            await engine.stop()

    results, seconds = asyncio.run(main())
    print(f"200 JSON requests, max_tokens 12-64, 16 concurrent: {seconds:.1f} s")
    bad = []
    for max_tokens, (text, reasons) in zip(budgets, results):
        try:
            jsonschema.validate(json.loads(text), DEFAULT_SCHEMA)
        except (ValueError, jsonschema.ValidationError) as exc:
            bad.append((max_tokens, text, reasons, str(exc)[:80]))
    assert not bad, f"{len(bad)} of 200 did not parse/validate: {bad[:5]}"
    assert sum(r == ["length"] for _, r in results) >= 100, "most of these budgets should have cut the reply"


# -- Workers AI: response_format answers an object, never a string ---------------------------------

def test_workers_ai_json_reply_is_an_object_even_when_cut(cf, served):
    """An engine without budget steering (the fake) cut the JSON at max_tokens: the result still
    carries the value, completed with the shortest closing text, not the cut text as a string."""
    served.gemma.script("cut json", pieces=['{"name": "Al', 'ice", "tags": ["a', '", "b"]}'])
    result = cf.ai.run("@hf/google/gemma-7b-it", account_id="a", prompt="cut json", max_tokens=2,
                       response_format={"type": "json_object"})
    assert result["response"] == {"name": "Alice", "tags": ["a"]}


def test_workers_ai_json_value_fallbacks():
    from toolkit.server.workers_ai.responses import json_value

    assert json_value('{"a": [1, 2') == {"a": [1, 2]}
    assert json_value('{"a": 1,') == {} and json_value("not json") == {}
    assert json_value(' {"a": "x"} ') == {"a": "x"}
