"""The OpenAI schema against a live server (uvicorn on 127.0.0.1) over fake engines.

Clients: the official ``openai`` package and raw httpx for exact SSE bytes. Streaming usage,
tool calls, stop strings, split UTF-8, ``n``, seeds and logprobs each have their own test here;
disconnects, unknown fields and invalid values are in test_server_errors.py.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from fake_engine import DEFAULT_PIECES, Served, sse_data

MODEL = "google/gemma-7b-it"
DEFAULT_TEXT = "".join(DEFAULT_PIECES)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "city"}},
                   "required": ["city"]}}}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_completion_fields_usage_and_estimated_cost(client, served):
    reply = client.chat.completions.create(model=MODEL, messages=user("chat basic"))
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL
    choice = reply.choices[0]
    assert (choice.index, choice.message.role, choice.message.content) == (0, "assistant", DEFAULT_TEXT)
    assert choice.finish_reason == "stop"
    u = reply.usage
    assert u.completion_tokens == len(DEFAULT_PIECES) and u.total_tokens == u.prompt_tokens + u.completion_tokens
    price = served.gemma.recipe.price_per_million_tokens
    expected_cost = (u.prompt_tokens * price["input"] + u.completion_tokens * price["output"]) / 1e6
    assert u.model_extra["estimated_cost"] == pytest.approx(expected_cost)


def test_deepinfra_prefix_alias_and_case(served):
    deepinfra = openai.OpenAI(api_key=Served.API_KEY, base_url=f"{served.base_url}/v1/openai", max_retries=0)
    for name in ("google/gemma-7b-it", "@hf/google/gemma-7b-it", "gemma-7b-it", "GOOGLE/Gemma-7B-IT"):
        reply = deepinfra.chat.completions.create(model=name, messages=user("prefix"))
        assert reply.choices[0].message.content == DEFAULT_TEXT and reply.model == name
    assert served.gemma.requests_for("prefix")


def test_models_lists_hf_ids_and_aliases(client):
    ids = {m.id for m in client.models.list()}
    assert {"google/gemma-7b-it", "@hf/google/gemma-7b-it", "google/gemma-3-270m"} <= ids


def test_completions_and_echo(client, served):
    reply = client.completions.create(model="google/gemma-3-270m", prompt="Once upon", max_tokens=3, echo=True)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "Once upon" + "".join(DEFAULT_PIECES[:3])
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    assert served.default.rendered(served.default.requests_for("Once upon")[-1]).prompt == "Once upon"


def test_chat_stream_exact_bytes(served):
    r = served.post("/v1/chat/completions", json={"model": MODEL, "stream": True, "messages": user("bytes")})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    first = json.loads(sse_data(r.content)[0])
    head = (f'data: {{"id": "{first["id"]}", "object": "chat.completion.chunk", "created": {first["created"]}, '
            f'"model": "{MODEL}", "choices": [{{"index": 0, "delta": ')
    expected = "".join(f'{head}{{"role": "assistant", "content": "{p}"}}, "finish_reason": null}}]}}\n\n'
                       for p in DEFAULT_PIECES)
    expected += f'{head}{{}}, "finish_reason": "stop"}}]}}\n\ndata: [DONE]\n\n'
    assert r.content == expected.encode()


def test_completion_stream_exact_bytes(served):
    r = served.post("/v1/completions", json={"model": MODEL, "stream": True, "prompt": "cbytes", "max_tokens": 2})
    first = json.loads(sse_data(r.content)[0])
    head = (f'data: {{"id": "{first["id"]}", "object": "text_completion", "created": {first["created"]}, '
            f'"model": "{MODEL}", "choices": [{{"index": 0, ')
    expected = "".join(f'{head}"text": "{p}", "logprobs": null, "finish_reason": null}}]}}\n\n'
                       for p in DEFAULT_PIECES[:2])
    expected += f'{head}"text": "", "logprobs": null, "finish_reason": "length"}}]}}\n\ndata: [DONE]\n\n'
    assert r.content == expected.encode()


def test_include_usage_adds_one_final_usage_chunk_and_nulls(served):
    body = {"model": MODEL, "stream": True, "messages": user("usage"), "stream_options": {"include_usage": True}}
    events = sse_data(served.post("/v1/chat/completions", json=body).content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(DEFAULT_PIECES)
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + len(DEFAULT_PIECES)
    assert "estimated_cost" in last["usage"]


@pytest.mark.parametrize("options", [None, {}, {"include_usage": False}])
def test_stream_has_no_usage_unless_asked(served, options):
    body = {"model": MODEL, "stream": True, "messages": user("no usage")}
    if options is not None:
        body["stream_options"] = options
    events = sse_data(served.post("/v1/chat/completions", json=body).content)
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_openai_client_stream_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=user("client stream"), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(DEFAULT_PIECES)


def test_tool_choice_auto_returns_a_parsed_tool_call(client, served):
    served.gemma.script("weather?", pieces=['{"name": "get', '_weather", "argu', 'ments": {"ci', 'ty": "Paris"}}'])
    reply = client.chat.completions.create(model=MODEL, messages=user("weather?"), tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    system = served.gemma.rendered(served.gemma.requests_for("weather?")[-1]).messages[0]
    assert system["role"] == "system" and '"get_weather"' in system["content"]


def test_streamed_tool_call_argument_fragments_join_into_json(client, served):
    args = {"city": "Reykjavík", "detail": "a long description so that the arguments take several fragments"}
    text = json.dumps({"name": "get_weather", "arguments": args}, ensure_ascii=False)
    served.gemma.script("stream weather", pieces=[text[i:i + 7] for i in range(0, len(text), 7)])
    chunks = list(client.chat.completions.create(model=MODEL, messages=user("stream weather"),
                                                 tools=[WEATHER_TOOL], stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id
    fragments = [tc.function.arguments for tc in calls if tc.function.arguments]
    assert len(fragments) > 1 and json.loads("".join(fragments)) == args
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_without_parameters_gets_empty_arguments_object(client, served):
    for stream in (False, True):
        result = client.chat.completions.create(model=MODEL, messages=user("what time"), tools=[CLOCK_TOOL],
                                                tool_choice="required", stream=stream)
        if stream:
            args = "".join(tc.function.arguments or "" for c in result for tc in (c.choices[0].delta.tool_calls or []))
        else:
            args = result.choices[0].message.tool_calls[0].function.arguments
        assert args == "{}"
    schema = served.gemma.requests_for("what time")[-1].params.json_schema
    assert schema["properties"]["name"] == {"const": "get_time"}


def test_named_tool_choice_is_enforced_with_a_schema(client, served):
    reply = client.chat.completions.create(
        model=MODEL, messages=user("force it"), tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "fake"}
    params = served.gemma.requests_for("force it")[-1].params
    assert params.json_schema["properties"]["arguments"] == WEATHER_TOOL["function"]["parameters"]


def test_tool_choice_none_renders_and_parses_nothing(client, served):
    served.gemma.script("no tools", pieces=['{"name": "get_weather", "arguments": {}}'])
    reply = client.chat.completions.create(model=MODEL, messages=user("no tools"), tools=[WEATHER_TOOL],
                                           tool_choice="none")
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    assert [m["role"] for m in served.gemma.rendered(served.gemma.requests_for("no tools")[-1]).messages] == ["user"]


def test_tool_history_is_rendered(client, served):
    messages = [{"role": "user", "content": "weather in Oslo"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "-3C"},
                {"role": "user", "content": "history"}]
    client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    turns = served.gemma.rendered(served.gemma.requests_for("history")[-1]).messages
    assert turns[2] == {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'}
    assert turns[3] == {"role": "user", "content": "Tool result (get_weather): -3C"}


def test_stop_string_spanning_tokens_never_leaks(served):
    served.gemma.script("stop span", pieces=["Hello", " wor", "ld", "! bye"])
    body = {"model": MODEL, "stream": True, "messages": user("stop span"), "stop": ["world"]}
    chunks = [json.loads(e) for e in sse_data(served.post("/v1/chat/completions", json=body).content)[:-1]]
    contents = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(contents) == "Hello " and not any("w" in c for c in contents)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_with_openai_client(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("stop"), stop="fake")
    assert reply.choices[0].message.content == "Hello! I am a " and reply.choices[0].finish_reason == "stop"


def test_split_utf8_never_streams_a_replacement_char(served):
    served.gemma.script("utf8", pieces=[b"caf\xc3", b"\xa9 ", b"\xf0\x9f", b"\x98\x80", b"!"])
    raw = served.post("/v1/chat/completions", json={"model": MODEL, "stream": True, "messages": user("utf8")}).content
    assert "\ufffd".encode() not in raw and b"\\ufffd" not in raw
    chunks = [json.loads(e) for e in sse_data(raw)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "café 😀!"


def test_n2_returns_two_choices_stream_and_not(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("two"), n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content != reply.choices[1].message.content
    stream = list(client.chat.completions.create(model=MODEL, messages=user("two s"), n=2, stream=True))
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in stream:
        choice = chunk.choices[0]
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == {0: reply.choices[0].message.content, 1: reply.choices[1].message.content}
    assert finishes == {0: "stop", 1: "stop"}


def test_same_seed_same_output_whatever_is_batched(client):
    def ask(args):
        text, seed = args
        return client.chat.completions.create(model=MODEL, messages=user(text), seed=seed,
                                              temperature=0.9).choices[0].message.content
    jobs = [("seed a", 42), ("noise 1", 7), ("seed b", 42), ("noise 2", 8), ("seed c", 43)]
    with ThreadPoolExecutor(4) as pool:
        a, _, b, _, c = pool.map(ask, jobs)
    assert a == b and a != c


def test_logprobs_chat_and_completions(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("lp"), logprobs=True, top_logprobs=2,
                                           max_tokens=3)
    content = reply.choices[0].logprobs.content
    assert [t.token for t in content] == DEFAULT_PIECES[:3] and len(content[0].top_logprobs) == 2
    assert content[0].bytes == list(DEFAULT_PIECES[0].encode())
    legacy = client.completions.create(model=MODEL, prompt="lp", logprobs=1, max_tokens=2).choices[0].logprobs
    assert legacy.tokens == DEFAULT_PIECES[:2] and legacy.text_offset == [0, len(DEFAULT_PIECES[0])]


def test_json_mode(client, served):
    reply = client.chat.completions.create(model=MODEL, messages=user("json"),
                                           response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    assert served.gemma.requests_for("json")[-1].params.json_object is True


def test_defaults_and_length(client, served):
    reply = client.chat.completions.create(model=MODEL, messages=user("limits"), max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2
    client.chat.completions.create(model="google/codegemma-7b-it", messages=user("defaults"))
    params = served.small.requests_for("defaults")[-1].params
    prompt_tokens = len(served.small.requests_for("defaults")[-1].prompt_ids)
    assert params.temperature == 1.0 and params.max_tokens == 64 - prompt_tokens  # recipe 512, clamped


def test_max_tokens_zero_returns_nothing(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("zero"), max_tokens=0)
    assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens > 0
