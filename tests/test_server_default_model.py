"""End to end: ``toolkit serve``'s app over the real embedded default model (Gemma 3 270M, int8 ONNX).

The engine directory comes from ``ensure_default_engine`` (exported on first use, a few
minutes; reused afterwards). The server runs on 127.0.0.1 in a thread; the official ``openai``
client and the ``cloudflare`` SDK talk to it. Gemma 3 270M is a small base model, so the
tests check the API's guarantees (non-empty text, usage and cost, UTF-8-safe streaming, JSON
mode), never the quality of the answers.
"""

from __future__ import annotations

import json

import cloudflare
import jsonschema
import openai
import pytest
from fake_engine import LiveServer
from toolkit.export.pipeline import ensure_default_engine
from toolkit.export.progress import StageReporter
from toolkit.recipes import get_recipe
from toolkit.server.serve import build_app

pytestmark = pytest.mark.slow

KEY = "default-model-key"
MODEL = "google/gemma-3-270m"
WORKERS_MODEL = "@hf/google/gemma-3-270m"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0,
                                                                           "maximum": 120}}}


@pytest.fixture(scope="module")
def served():
    engine_dir = ensure_default_engine(StageReporter(quiet=True))
    with LiveServer(build_app([engine_dir], [KEY], grace_s=1.0)) as live:
        yield live


@pytest.fixture(scope="module")
def oa(served):
    return openai.OpenAI(api_key=KEY, base_url=f"{served.base_url}/v1", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def cf(served):
    return cloudflare.Cloudflare(api_token=KEY, base_url=f"{served.base_url}/client/v4", max_retries=0, timeout=120)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_answers_with_usage_and_estimated_cost(oa):
    reply = oa.chat.completions.create(model=MODEL, messages=user("What is the capital of France?"), max_tokens=24)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length") and reply.model == MODEL
    u = reply.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    price = get_recipe("default").price_per_million_tokens
    cost = (u.prompt_tokens * price["input"] + u.completion_tokens * price["output"]) / 1e6
    assert u.model_extra["estimated_cost"] == pytest.approx(cost) and cost > 0


def test_streamed_japanese_never_contains_u_fffd(oa):
    chunks = list(oa.chat.completions.create(
        model=MODEL, messages=user("Translate 'good morning' into Japanese and add a sun emoji."),
        max_tokens=48, temperature=0, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert all("\ufffd" not in p for p in pieces), pieces
    text = "".join(pieces)
    assert any(ord(ch) > 0x3000 for ch in text), f"no Japanese or emoji in the answer, nothing was checked: {text!r}"
    assert chunks[-1].choices == [] and 1 <= chunks[-1].usage.completion_tokens <= 48


def test_workers_ai_messages_and_prompt_forms(cf):
    by_messages = cf.ai.run(WORKERS_MODEL, account_id="local", messages=user("Say hello"), max_tokens=16)
    assert by_messages["response"].strip() and by_messages["usage"]["completion_tokens"] >= 1
    by_prompt = cf.ai.run(WORKERS_MODEL, account_id="local", prompt="Write a haiku about the sea", max_tokens=16)
    assert by_prompt["response"].strip()
    usage = by_prompt["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_json_mode_parses_in_both_schemas(oa, cf):
    reply = oa.chat.completions.create(
        model=MODEL, messages=user("Describe a person as JSON with a name and an age."), max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    result = cf.ai.run(WORKERS_MODEL, account_id="local", messages=user("Describe a person as JSON."), max_tokens=40,
                       response_format={"type": "json_schema", "json_schema": PERSON})
    assert isinstance(result["response"], dict)
    jsonschema.validate(result["response"], PERSON)
