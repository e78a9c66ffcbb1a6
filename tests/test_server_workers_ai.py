"""The Workers AI schema against a live server: the ``cloudflare`` SDK and raw httpx (exact SSE bytes)."""

from __future__ import annotations

import json

import cloudflare
import pytest
from fake_engine import DEFAULT_PIECES, sse_data

MODEL = "@hf/google/gemma-7b-it"
RUN = f"/client/v4/accounts/acc123/ai/run/{MODEL}"
DEFAULT_TEXT = "".join(DEFAULT_PIECES)
FLAT_TOOL = {"name": "get_weather", "description": "Current weather",
             "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "city"}},
                            "required": ["city"]}}
CALL_TEXT = '{"name": "get_weather", "arguments": {"city": "Lisbon"}}'


def test_sdk_prompt_with_percent_encoded_model(cf, served):
    result = cf.ai.run(MODEL, account_id="acc123", prompt="sdk prompt")
    assert result["response"] == DEFAULT_TEXT
    assert result["usage"]["completion_tokens"] == len(DEFAULT_PIECES)
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + len(DEFAULT_PIECES)
    request = served.gemma.rendered(served.gemma.requests_for("sdk prompt")[-1])
    assert request.messages == [{"role": "user", "content": "sdk prompt"}]  # chat template applied


def test_raw_slashes_and_envelope(served):
    for path in (RUN, "/client/v4/accounts/acc123/ai/run/@hf%2Fgoogle%2Fgemma-7b-it"):
        r = served.post(path, json={"prompt": "envelope"})
        assert r.status_code == 200
        body = r.json()
        assert list(body) == ["result", "success", "errors", "messages"]
        assert body["success"] is True and body["errors"] == [] and body["messages"] == []
        assert body["result"]["response"] == DEFAULT_TEXT


def test_sdk_messages(cf, served):
    messages = [{"role": "system", "content": "You are a friendly assistant"},
                {"role": "user", "content": "sdk messages"}]
    assert cf.ai.run(MODEL, account_id="a", messages=messages)["response"] == DEFAULT_TEXT
    assert served.gemma.rendered(served.gemma.requests_for("sdk messages")[-1]).messages == messages


def test_workers_ai_defaults_and_ranges(served):
    served.post(RUN, json={"prompt": "wa defaults"})
    params = served.gemma.requests_for("wa defaults")[-1].params
    assert (params.temperature, params.max_tokens) == (0.6, 256)
    served.post(RUN, json={"prompt": "wa custom", "temperature": 4.5, "top_k": 50, "seed": 9999999999,
                           "top_p": 0.001, "repetition_penalty": 0, "frequency_penalty": -2})
    params = served.gemma.requests_for("wa custom")[-1].params
    assert (params.temperature, params.top_k, params.seed, params.top_p) == (4.5, 50, 9999999999, 0.001)
    assert params.repetition_penalty == 1.0 and params.frequency_penalty == -2


def test_raw_prompt_skips_the_template(served):
    served.post(RUN, json={"prompt": "<start_of_turn>user\nraw", "raw": True})
    request = served.gemma.rendered(served.gemma.requests_for("<start_of_turn>user\nraw")[-1])
    assert request.raw is True and request.messages is None


def test_stream_exact_bytes(served):
    r = served.post(RUN, json={"prompt": "wa stream", "stream": True, "max_tokens": 3})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    prompt_tokens = len(served.gemma.requests_for("wa stream")[-1].prompt_ids)
    expected = "".join(f'data: {{"response": "{p}"}}\n\n' for p in DEFAULT_PIECES[:3])
    expected += (f'data: {{"response": "", "usage": {{"prompt_tokens": {prompt_tokens}, "completion_tokens": 3, '
                 f'"total_tokens": {prompt_tokens + 3}}}}}\n\ndata: [DONE]\n\n')
    assert r.content == expected.encode()


def test_sdk_stream(cf):
    with cf.ai.with_streaming_response.run(MODEL, account_id="a", prompt="sdk stream", stream=True) as response:
        assert "%2F" in str(response.http_request.url)
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert "".join(p["response"] for p in payloads) == DEFAULT_TEXT
    assert payloads[-1]["response"] == "" and payloads[-1]["usage"]["completion_tokens"] == len(DEFAULT_PIECES)


def test_json_mode_returns_an_object(cf, served):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    result = cf.ai.run(MODEL, account_id="a", prompt="json please",
                       response_format={"type": "json_schema", "json_schema": schema})
    assert result["response"] == {"name": "fake", "age": 1}
    assert served.gemma.requests_for("json please")[-1].params.json_schema == schema
    result = cf.ai.run(MODEL, account_id="a", prompt="json obj", response_format={"type": "json_object"})
    assert isinstance(result["response"], dict)


def test_json_mode_with_stream_is_rejected(served):
    r = served.post(RUN, json={"prompt": "x", "stream": True, "response_format": {"type": "json_object"}})
    assert r.status_code == 400
    assert r.json()["errors"][0]["code"] == 5006 and "stream" in r.json()["errors"][0]["message"]


@pytest.mark.parametrize("tool", [FLAT_TOOL, {"type": "function", "function": FLAT_TOOL}], ids=["flat", "openai"])
def test_tools_both_forms(cf, served, tool):
    served.gemma.script("wa tools", pieces=[CALL_TEXT[:20], CALL_TEXT[20:]])
    result = cf.ai.run(MODEL, account_id="a", messages=[{"role": "user", "content": "wa tools"}], tools=[tool])
    assert result["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Lisbon"}}]
    assert result["response"] == ""
    assert '"get_weather"' in served.gemma.rendered(served.gemma.requests_for("wa tools")[-1]).messages[0]["content"]


def test_tools_stream(served):
    served.gemma.script("wa tools s", pieces=[CALL_TEXT[:9], CALL_TEXT[9:]])
    body = {"messages": [{"role": "user", "content": "wa tools s"}], "tools": [FLAT_TOOL], "stream": True}
    events = sse_data(served.post(RUN, json=body).content)
    assert events[-1] == "[DONE]"
    calls_event, usage_event = json.loads(events[-3]), json.loads(events[-2])
    assert calls_event == {"response": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Lisbon"}}]}
    assert usage_event["response"] == "" and set(usage_event) == {"response", "usage"}


def test_plain_text_with_tools_stays_text(served):
    body = {"messages": [{"role": "user", "content": "wa no call"}], "tools": [FLAT_TOOL]}
    result = served.post(RUN, json=body).json()["result"]
    assert result["response"] == DEFAULT_TEXT and "tool_calls" not in result


def test_tool_turns_in_history(served):
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"name": "get_weather", "arguments": {"city": "X"}}]},
                {"role": "tool", "name": "get_weather", "content": "sunny"},
                {"role": "user", "content": "wa history"}]
    served.post(RUN, json={"messages": messages, "tools": [FLAT_TOOL]})
    turns = served.gemma.rendered(served.gemma.requests_for("wa history")[-1]).messages
    assert turns[2]["content"] == '{"name": "get_weather", "arguments": {"city": "X"}}'
    assert turns[3] == {"role": "user", "content": "Tool result (get_weather): sunny"}


def test_unknown_lora_is_an_error_not_ignored(cf, served):
    with pytest.raises(cloudflare.APIStatusError) as info:
        cf.ai.run(MODEL, account_id="a", prompt="lora", lora="my-adapter")
    assert info.value.status_code == 405
    assert info.value.body["errors"][0]["code"] == 5005 and "my-adapter" in info.value.body["errors"][0]["message"]
    assert not served.gemma.requests_for("lora")


def test_unknown_model(cf):
    with pytest.raises(cloudflare.BadRequestError) as info:
        cf.ai.run("@hf/nobody/nothing", account_id="a", prompt="x")
    body = info.value.body
    assert body["success"] is False and body["result"] == {} and body["errors"][0]["code"] == 5007


@pytest.mark.parametrize("field,value", [("top_k", 51), ("top_k", 0), ("seed", 0), ("seed", 10_000_000_000),
                                         ("temperature", 5.5), ("top_p", 0), ("repetition_penalty", 2.5),
                                         ("max_tokens", "many"), ("presence_penalty", -3)])
def test_out_of_range_names_the_field(cf, field, value):
    with pytest.raises(cloudflare.BadRequestError) as info:
        cf.ai.run(MODEL, account_id="a", prompt="range", extra_body={field: value})
    error = info.value.body["errors"][0]
    assert error["code"] == 5006 and field in error["message"]


@pytest.mark.parametrize("body", [{}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
                                  {"prompt": ""}, {"messages": []}, {"messages": [{"role": "user"}]},
                                  {"messages": [{"role": "wizard", "content": "x"}]}])
def test_bad_input_forms(served, body):
    r = served.post(RUN, json=body)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5006 and r.json()["success"] is False


def test_prompt_beyond_context_is_413(served):
    r = served.post("/client/v4/accounts/a/ai/run/@hf/google/codegemma-7b-it", json={"prompt": "word " * 100})
    assert r.status_code == 413 and r.json()["errors"][0]["code"] == 3006


def test_overload_is_3040_with_retry_after(served):
    from toolkit.runtime.errors import OverloadedError

    served.gemma.script("busy", fail_before=OverloadedError(8, 8))
    r = served.post(RUN, json={"prompt": "busy"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["errors"][0]["code"] == 3040


def test_bad_token_is_401_in_workers_ai_schema(served):
    bad = cloudflare.Cloudflare(api_token="wrong", base_url=f"{served.base_url}/client/v4", max_retries=0)
    with pytest.raises(cloudflare.AuthenticationError) as info:
        bad.ai.run(MODEL, account_id="a", prompt="x")
    assert info.value.body["errors"][0]["code"] == 10000 and info.value.body["success"] is False
