"""Streamed tool calls: the call's id and name leave as soon as they are decoded, then argument
fragments as the tokens come, in OpenAI's delta shape; joined fragments always parse.

Fake-engine tests script a call piece by piece (``served``/``client`` from conftest); the
``required``/named tests run a tiny random ONNX engine behind the real app, where the arguments
come from schema-constrained decoding (cut short by max_tokens too).
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from fake_engine import LiveServer, Served, sse_data

from toolkit.recipes import get_recipe
from toolkit.server.json_close import complete_json
from toolkit.server.tool_stream import ArgumentsFragment, TextPiece, ToolCallStart, ToolCallStreamer
from toolkit.server.tools import ToolSpec, make_plan

MODEL = "google/gemma-7b-it"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
PIECES = ['{"name": "get_', 'weather", ', '"arguments": {"city', '": "Par', 'is", "unit', '": "c"}', "}"]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _deltas(events: list[str]) -> list[dict]:
    return [json.loads(e)["choices"][0] for e in events[:-1] if json.loads(e)["choices"]]


@pytest.mark.parametrize("choice", ["auto", "required", "named"])
def test_call_id_and_name_first_then_one_fragment_per_decoded_piece(served, choice):
    key = f"stream pieces {choice}"
    served.gemma.script(key, pieces=PIECES)
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else choice
    body = {"model": MODEL, "stream": True, "messages": user(key), "tools": [WEATHER_TOOL, CLOCK_TOOL],
            "tool_choice": tool_choice}
    deltas = _deltas(sse_data(served.post("/v1/chat/completions", json=body).content))
    # the name is complete after piece 2: the head; pieces 3-6 carry arguments; piece 7 closes the call
    assert len(deltas) == 1 + 4 + 1, deltas
    head = deltas[0]["delta"]
    assert head["role"] == "assistant" and head["content"] is None
    call = head["tool_calls"][0]
    assert call["index"] == 0 and call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [d["delta"] for d in deltas[1:5]]
    assert fragments == [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
                         for text in ['{"city', '": "Par', 'is", "unit', '": "c"}']]
    assert all(d["finish_reason"] is None for d in deltas[:-1])
    assert deltas[-1] == {"index": 0, "delta": {}, "finish_reason": "tool_calls"}


def test_fragments_leave_before_the_call_is_complete(served):
    """Timed: with 0.25 s between pieces, the head and first fragment arrive long before the end."""
    served.gemma.script("slow call", pieces=PIECES, delay_s=0.25)
    body = {"model": MODEL, "stream": True, "messages": user("slow call"), "tools": [WEATHER_TOOL]}
    arrivals = []
    start = time.monotonic()
    with httpx.stream("POST", served.base_url + "/v1/chat/completions", json=body, headers=served.headers,
                      timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append((time.monotonic() - start, json.loads(line[6:])["choices"][0]["delta"]))
    first_fragment = next(t for t, d in arrivals if d.get("tool_calls") and "id" not in d["tool_calls"][0])
    head = next(t for t, d in arrivals if d.get("tool_calls") and "id" in d["tool_calls"][0])
    end = arrivals[-1][0]
    assert head < first_fragment and end - first_fragment >= 0.75, arrivals


def test_openai_client_stream_accumulates_the_parsed_call(client, served):
    served.gemma.script("client accumulates", pieces=PIECES)
    strict = {"type": "function", "function": {**WEATHER_TOOL["function"], "strict": True}}
    with client.chat.completions.stream(model=MODEL, messages=user("client accumulates"), tools=[strict]) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert [e.arguments_delta for e in events if e.type == "tool_calls.function.arguments.delta"
            and e.arguments_delta] == ['{"city', '": "Par', 'is", "unit', '": "c"}']
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.parsed_arguments == {"city": "Paris", "unit": "c"}
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    assert final.choices[0].finish_reason == "tool_calls"


def test_two_calls_in_an_array_stream_with_their_own_indexes(client, served):
    text = '[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, {"name": "get_time", "arguments": {}}]'
    served.gemma.script("two calls", pieces=[text[i:i + 6] for i in range(0, len(text), 6)])
    chunks = list(client.chat.completions.create(model=MODEL, messages=user("two calls"),
                                                 tools=[WEATHER_TOOL, CLOCK_TOOL], stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    heads = [tc for tc in calls if tc.id]
    assert [(h.index, h.function.name) for h in heads] == [(0, "get_weather"), (1, "get_time")]
    joined = {i: "".join(tc.function.arguments or "" for tc in calls if tc.index == i) for i in (0, 1)}
    assert json.loads(joined[0]) == {"city": "Oslo", "unit": "c"} and json.loads(joined[1]) == {}
    first_time = next(k for k, tc in enumerate(calls) if tc.index == 1)
    assert all(tc.index == 0 for tc in calls[:first_time])  # call 0 complete before call 1 starts


@pytest.mark.parametrize("text", [
    "Sunny, no tool needed.",
    '{"answer": 42}',
    '{"name": "not_a_tool", "arguments": {}}',
    "```python\nprint(1)\n```",
])
def test_auto_text_that_is_not_a_call_stays_text(client, served, text):
    key = f"not a call {text[:12]}"
    served.gemma.script(key, pieces=[text[i:i + 3] for i in range(0, len(text), 3)])
    chunks = list(client.chat.completions.create(model=MODEL, messages=user(key), tools=[WEATHER_TOOL], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_auto_holds_back_only_until_it_knows():
    """Text leaves with its first non-space character; a call is known at its tool name."""
    plan = make_plan([ToolSpec("get_weather")], "auto")
    text = ToolCallStreamer(plan)
    assert text.feed("  ") == [] and text.feed("Hi") == [TextPiece("  Hi")]
    json_reply = ToolCallStreamer(plan)
    assert json_reply.feed('{"') == [] and json_reply.feed('answer"') == [TextPiece('{"answer"')]
    call = ToolCallStreamer(plan)
    assert call.feed('```json\n{"name": "get_wea') == []
    events = call.feed('ther", "arguments": {"a": 1, ')
    assert isinstance(events[0], ToolCallStart) and events[0].name == "get_weather"
    assert events[1:] == [ArgumentsFragment(0, '{"a": 1')]  # the trailing comma waits for what follows


@pytest.mark.parametrize("cut", [
    '{"name": "get_weather", "arguments": {"city": "Par',
    '{"name": "get_weather", "arguments": {"city": "x\\u00',
    '{"name": "get_weather", "arguments": {"a": [1, {"b": tr',
    '{"name": "get_weather", "arguments": {"a": -1.',
    '{"name": "get_weather", "arguments": {"a"',
    '{"name": "get_weather", "arguments": {"a": 1} trailing junk',
    '{"name": "get_weather"',
    '{"name": "get_weather", "arguments": {"n": [1,s:',
    '{"name": "get_weather", "arguments": {"a": 1,}',
])
def test_a_call_cut_or_broken_still_joins_into_json(cut):
    for step in (1, 4, len(cut)):
        streamer = ToolCallStreamer(make_plan([ToolSpec("get_weather")], "auto"))
        events = [e for i in range(0, len(cut), step) for e in streamer.feed(cut[i:i + step])]
        events += streamer.finish()
        joined = "".join(e.text for e in events if isinstance(e, ArgumentsFragment))
        assert isinstance(json.loads(joined), dict), joined
        assert streamer.calls[0].arguments == json.loads(joined)


def test_complete_json():
    assert complete_json('{"a": [1, "x') == '"]}'
    assert complete_json('{"a": 1') == "}" and complete_json("[tr") == "ue]" and complete_json("12") == ""
    assert complete_json('{"a": 1,') is None  # a dangling comma is never sent
    assert complete_json("{oops") is None


# -- required / named on a tiny real engine ------------------------------------------------------

SHORT_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"], "additionalProperties": False}}}
SHORT_CLOCK = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def gemma_dir(tiny_engine):
    return tiny_engine(get_recipe("gemma-7b-it"))


@pytest.fixture(scope="module")
def real(gemma_dir):
    from toolkit.server.serve import build_app

    app = build_app([gemma_dir], [Served.API_KEY], grace_s=1.0)
    with LiveServer(app) as live:
        yield openai.OpenAI(api_key=Served.API_KEY, base_url=f"{live.base_url}/v1", max_retries=0, timeout=60)


def _shortest_call(engine_dir, choice: str) -> int:
    """Tokens of the shortest call the constraint of ``choice`` allows, in this engine's tokenizer."""
    from toolkit.runtime.json_constraint import JsonConstraintFactory
    from toolkit.runtime.prompting import load_tokenizer
    from toolkit.runtime.sampling_params import SamplingParams
    from toolkit.server.tools import ToolSpec as Spec

    specs = [Spec(t["function"]["name"], "", t["function"].get("parameters")) for t in (SHORT_TOOL, SHORT_CLOCK)]
    plan = make_plan(specs, "named" if choice == "named" else "required", "get_weather")
    factory = JsonConstraintFactory(load_tokenizer(engine_dir))
    return len(factory(SamplingParams(json_schema=plan.json_schema())).closing_path())


@pytest.mark.parametrize("choice", ["required", "named"])
def test_real_engine_forced_call_arguments_parse(real, gemma_dir, choice):
    """A random model's forced calls, from the shortest budget that can hold a call upward: the
    streamed head comes first and the joined arguments parse and match the tool's schema."""
    shortest = _shortest_call(gemma_dir, choice)
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else choice
    for extra in (0, 3, 8, 40):
        chunks = list(real.chat.completions.create(
            model=MODEL, messages=user("weather?"), tools=[SHORT_TOOL, SHORT_CLOCK], tool_choice=tool_choice,
            stream=True, max_tokens=shortest + extra, seed=extra, temperature=1.0))
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls and calls[0].id and calls[0].function.name in ("get_weather", "get_time"), chunks
        assert calls[0].function.arguments == "" and all(not tc.id for tc in calls[1:])
        args = json.loads("".join(tc.function.arguments or "" for tc in calls))
        if calls[0].function.name == "get_weather":
            assert set(args) == {"city"} and isinstance(args["city"], str)
        else:
            assert choice == "required" and args == {}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
