"""The server's pure pieces without HTTP: registry, body errors, tool parsing, stream state machines."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from fake_engine import FakeEngine
from toolkit.recipes import get_recipe
from toolkit.runtime.types import ChoiceDelta, RequestOutput, TokenLogprob
from toolkit.server.auth import key_matches
from toolkit.server.errors import ApiError
from toolkit.server.openai.responses import ResponseMeta
from toolkit.server.openai.schemas import ChatCompletionRequest
from toolkit.server.openai.stream import ChatStream, CompletionStream
from toolkit.server.registry import ModelRegistry
from toolkit.server.tool_parse import parse_tool_calls
from toolkit.server.tool_stream import HoldBack
from toolkit.server.tools import ToolSpec, make_plan
from toolkit.server.body import validation_error
from toolkit.server.workers_ai.routes import model_from_path

META = ResponseMeta("id-1", 123, "m")
WEATHER = ToolSpec("get_weather", "weather", {"type": "object", "properties": {"city": {"type": "string"}}})


def output(*deltas: ChoiceDelta, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", list(deltas), 3, 1, finished)


def test_registry_names_exact_lowercase_and_never_paths():
    registry = ModelRegistry({"gemma-7b-it": FakeEngine(get_recipe("gemma-7b-it"))})
    for name in ("google/gemma-7b-it", "@hf/google/gemma-7b-it", "gemma-7b-it", "Google/Gemma-7B-IT"):
        assert registry.resolve(name) is registry.entries[0]
    for name in ("google/../google/gemma-7b-it", "/google/gemma-7b-it", "google/gemma-7b-it/", "", None):
        assert registry.resolve(name) is None


def test_registry_rejects_a_name_served_twice():
    with pytest.raises(ValueError, match="served by two engines"):
        ModelRegistry({"a": FakeEngine(get_recipe("gemma-7b-it")), "b": FakeEngine(get_recipe("gemma-7b-it"))})


def test_workers_ai_model_name_is_cut_from_the_decoded_path():
    assert model_from_path("/client/v4/accounts/a/ai/run/@hf/google/gemma-7b-it") == "@hf/google/gemma-7b-it"
    assert model_from_path("/client/v4/accounts/a/ai/run/") == ""


@pytest.mark.parametrize("body,param", [({"model": "m", "messages": [], "n": 9}, "n"),
                                        ({"model": "m"}, "messages"),
                                        ({"model": "m", "messages": [{"role": "user", "content": 1}]},
                                         "messages[0].content"),
                                        ({"model": "m", "messages": [], "tool_choice": "always"}, "tool_choice")])
def test_validation_errors_name_the_field(body, param):
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(body, ChatCompletionRequest)
    error = validation_error(info.value)
    assert isinstance(error, ApiError) and error.param == param and param in error.message


@pytest.mark.parametrize("text,expected", [
    ('{"name": "get_weather", "arguments": {"city": "Rome"}}', [("get_weather", {"city": "Rome"})]),
    ('```json\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n```',
     [("get_weather", {"city": "Rome"})]),
    ('[{"name": "get_weather", "arguments": {}}, {"name": "get_weather"}]', [("get_weather", {}), ("get_weather", {})]),
    ('{"name": "unknown_tool", "arguments": {}}', None),
    ('{"name": "get_weather", "arguments": {}} and some text', None),
    ('The weather is nice.', None),
    ('{"name": "get_weather", "arguments": [1]}', None),
])
def test_parse_tool_calls(text, expected):
    calls = parse_tool_calls(text, {"get_weather"})
    assert (None if calls is None else [(c.name, c.arguments) for c in calls]) == expected


def test_tool_plan_schema_and_errors():
    named = make_plan([WEATHER], "named", "get_weather").json_schema()
    assert named["properties"]["name"] == {"const": "get_weather"} and named["required"] == ["name", "arguments"]
    assert make_plan([WEATHER, ToolSpec("b")], "required").json_schema()["anyOf"][1]["properties"]["arguments"] == {
        "type": "object", "properties": {}, "additionalProperties": False}
    assert make_plan([WEATHER], "auto").json_schema() is None
    with pytest.raises(ApiError):
        make_plan([WEATHER], "named", "ghost")
    with pytest.raises(ApiError):
        make_plan([], "required")


def test_holdback_passes_text_and_holds_json():
    plan = make_plan([WEATHER], "auto")
    text = HoldBack(plan)
    assert text.feed("  ") is None and text.feed("Hi") == ("  Hi", []) and text.feed("!") == ("!", [])
    call = HoldBack(plan)
    assert call.feed('{"name": "get_weather",') is None and call.feed(' "arguments": {}}') is None
    calls, held, _ = call.finish()
    assert calls[0].name == "get_weather" and held == ""
    broken = HoldBack(plan)
    assert broken.feed("{") is None and broken.feed("oops") == ("{oops", [])  # text once it cannot be a call
    assert broken.finish()[:2] == (None, "")
    cut = HoldBack(plan)
    assert cut.feed('{"na') is None and cut.finish()[:2] == (None, '{"na')


def test_chat_stream_n2_ordering_and_usage():
    stream = ChatStream(META, 2, make_plan([], None), want_logprobs=False, include_usage=True)
    chunks = stream.chunks(output(ChoiceDelta(0, "a", [1]), ChoiceDelta(1, "b", [2])))
    chunks += stream.chunks(output(ChoiceDelta(0, "", [3], finish_reason="length"), ChoiceDelta(1, "c", [4])))
    chunks += stream.final({"prompt_tokens": 3})
    summary = [(c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"])
               for c in chunks if c["choices"]]
    role = {"role": "assistant"}
    assert summary == [(0, {**role, "content": "a"}, None), (1, {**role, "content": "b"}, None),
                       (0, {}, "length"), (1, {**role, "content": "c"}, None), (1, {}, "stop")]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1] == {
        "id": "id-1", "object": "chat.completion.chunk", "created": 123, "model": "m", "choices": [],
        "usage": {"prompt_tokens": 3}}


def test_chat_stream_logprobs_and_tool_fragments():
    stream = ChatStream(META, 1, make_plan([WEATHER], "auto"), want_logprobs=True, include_usage=False)
    lp = [TokenLogprob(5, "{", -0.5, [(5, "{", -0.5)])]
    pieces = ['{"name": "get_weather", "arguments": {"city": "a very', " long city", ' name indeed"}}']
    chunks = stream.chunks(output(ChoiceDelta(0, pieces[0], [5], lp)))
    chunks += stream.chunks(output(ChoiceDelta(0, pieces[1], [6], lp)))
    chunks += stream.chunks(output(ChoiceDelta(0, pieces[2], [7], lp, "stop"), finished=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:-1]]
    assert fragments == ['{"city": "a very', " long city", ' name indeed"}']  # one per decoded piece
    assert json.loads("".join(fragments)) == {"city": "a very long city name indeed"}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}


def test_completion_stream_echo_and_offsets():
    stream = CompletionStream(META, 1, want_logprobs=True, include_usage=False, echo="Say: ")
    lps = [TokenLogprob(1, "Hi", -0.1)]
    first = stream.chunks(output(ChoiceDelta(0, "Hi", [1], lps)))[0]["choices"][0]
    assert first["text"] == "Say: Hi" and first["logprobs"]["text_offset"] == [5]
    second = stream.chunks(output(ChoiceDelta(0, "!", [2], [TokenLogprob(2, "!", -0.2)], "stop")))
    assert second[0]["choices"][0]["logprobs"]["text_offset"] == [7]
    assert second[1]["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}


def test_api_keys_compare_every_key():
    assert key_matches("b", ("a", "b")) and not key_matches("c", ("a", "b")) and not key_matches("", ("a",))


def test_serve_helpers(tmp_path, monkeypatch):
    from toolkit.server.serve import ServeError, api_keys_from_env, build_app, engine_dirs_to_serve

    monkeypatch.setenv("TOOLKIT_API_KEY", "a, b")
    assert api_keys_from_env(["c"]) == ["c", "a", "b"]
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "toolkit.json").write_text("{}")
    (tmp_path / "junk").mkdir()
    assert engine_dirs_to_serve(["x"], tmp_path) == [Path("x"), tmp_path / "m1"]
    with pytest.raises(ServeError, match="junk"):
        build_app([tmp_path / "junk"])
    with pytest.raises(ServeError, match="not a directory"):
        build_app([], models_dir=tmp_path / "missing")
