"""Errors, limits and operations against a live server: each API answers in its own envelope.

Covers client disconnects, unknown fields, wrong types and out-of-range parameters, auth, body size, overload, mid-stream errors, /health, /metrics,
request ids and the OpenAPI schema.
"""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
from fake_engine import FakeEngine, LiveServer, sse_data, wait_until
from toolkit.recipes import get_recipe
from toolkit.runtime.errors import EngineFailureError, OverloadedError
from toolkit.server.app import create_app

MODEL = "google/gemma-7b-it"
CHAT = "/v1/chat/completions"
RUN = "/client/v4/accounts/a/ai/run/@hf/google/gemma-7b-it"


def chat(text: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def openai_error(response: httpx.Response) -> dict:
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


def workers_error(response: httpx.Response) -> dict:
    body = response.json()
    assert body["success"] is False and body["result"] == {} and body["messages"] == []
    assert "Traceback" not in response.text
    return body["errors"][0]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b'"text"', b'{"model": 5, "messages": []}'])
def test_malformed_bodies_in_both_schemas(served, content):
    r = served.post(CHAT, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and openai_error(r)["type"] == "invalid_request_error"
    r = served.post(RUN, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and workers_error(r)["code"] == 5006


@pytest.mark.parametrize("field,value", [("temperature", "hot"), ("temperature", 2.5), ("n", "2"), ("n", 5),
                                         ("top_p", 0), ("top_k", -1), ("top_k", 1000), ("max_tokens", -1),
                                         ("presence_penalty", 3), ("repetition_penalty", 0), ("seed", -1),
                                         ("stop", ["s"] * 17), ("stream", "yes"), ("logprobs", 1)])
def test_wrong_type_or_out_of_range_value_names_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       extra_body={field: value})
    assert info.value.status_code == 400 and info.value.param == field and field in info.value.message


def test_unknown_fields_are_tolerated_and_logged(client, caplog):
    with caplog.at_level(logging.INFO, logger="toolkit.server.body"):
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "new"}],
                                               extra_body={"some_future_field": {"a": 1}})
    assert reply.choices[0].message.content
    assert any("some_future_field" in r.getMessage() for r in caplog.records)


def test_prompt_beyond_the_context_window_is_refused(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="google/codegemma-7b-it",
                                       messages=[{"role": "user", "content": "word " * 100}])
    assert info.value.code == "context_length_exceeded" and "64" in info.value.message


def test_message_level_errors(client):
    for messages, param in [([], "messages"), ([{"role": "user"}], "messages[0].content"),
                            ([{"role": "robot", "content": "x"}], "messages[0].role"),
                            ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=messages)
        assert info.value.param == param


def test_tool_choice_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       tool_choice={"type": "function", "function": {"name": "ghost"}})
    assert info.value.param == "tool_choice"


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="../../etc/passwd", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found" and info.value.param == "model"


def test_body_too_large_is_413_in_both_schemas(served):
    big = json.dumps(chat("x" * (2 * 1024 * 1024 + 10))).encode()
    r = served.post(CHAT, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and openai_error(r)["code"] == "request_too_large"
    r = served.post(RUN, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and workers_error(r)["code"] == 3006


def test_overload_is_429_with_retry_after(client, served):
    served.gemma.script("overload", fail_before=OverloadedError(4, 4))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "overload"}])
    assert info.value.response.headers["retry-after"] == "1"


def test_engine_failure_before_output_is_500_without_trace(served):
    served.gemma.script("boom", fail_before=EngineFailureError("the model step failed"))
    r = served.post(CHAT, json=chat("boom"))
    assert r.status_code == 500 and openai_error(r)["type"] == "server_error"


def test_error_after_stream_started_is_an_error_event(client, served):
    served.gemma.script("midway", fail_after=2, failure=EngineFailureError("the model step failed"))
    events = sse_data(served.post(CHAT, json=chat("midway", stream=True)).content)
    assert "[DONE]" not in events
    assert json.loads(events[-1]) == {"error": {"message": "the model step failed", "type": "server_error",
                                                "param": None, "code": None}}
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == ["Hello", "!"]
    with pytest.raises(openai.APIError, match="the model step failed"):
        list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "midway"}],
                                            stream=True))
    events = sse_data(served.post(RUN, json={"prompt": "midway", "stream": True}).content)
    assert json.loads(events[-1])["errors"][0]["code"] == 3043 and "[DONE]" not in events


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_the_cache(served, stream):
    key = f"slow {stream}"
    served.gemma.script(key, pieces=["tok "] * 200, delay_s=0.02)
    with httpx.Client(timeout=httpx.Timeout(10, read=0.3 if not stream else 10)) as http:
        if stream:
            with http.stream("POST", served.base_url + CHAT, json=chat(key, stream=True),
                             headers=served.headers) as response:
                next(response.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(served.base_url + CHAT, json=chat(key), headers=served.headers)
    request_id = served.gemma.requests_for(key)[-1].request_id
    assert wait_until(lambda: request_id in served.gemma.aborted)
    assert wait_until(lambda: served.gemma.stats().running == 0 and served.gemma.stats().kv_cache_used_tokens == 0)


def test_auth_in_the_callers_schema(served):
    no_key = httpx.post(served.base_url + CHAT, json=chat("x"))
    assert no_key.status_code == 401 and openai_error(no_key)["code"] == "invalid_api_key"
    wrong = httpx.post(served.base_url + RUN, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and workers_error(wrong)["code"] == 10000
    bad = openai.OpenAI(api_key="nope", base_url=f"{served.base_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(served.base_url + "/health").status_code == 200
    assert httpx.get(served.base_url + "/metrics").status_code == 401


def test_open_server_warns_and_needs_no_key(caplog):
    with caplog.at_level(logging.WARNING, logger="toolkit.server.app"):
        app = create_app({"default": FakeEngine(get_recipe("default"))}, api_keys=None)
    assert any("no API key" in r.getMessage() for r in caplog.records)
    with LiveServer(app) as live:
        r = httpx.post(live.base_url + CHAT, json={"model": "gemma-3-270m", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
        assert r.status_code == 200


def test_health_is_503_until_started_and_stop_gets_the_grace(served):
    engine = FakeEngine(get_recipe("default"), start_delay_s=1.0)
    with LiveServer(create_app({"default": engine}, shutdown_grace_s=3.0), wait_ready=False) as live:
        assert httpx.get(live.base_url + "/health").status_code == 503
        early = httpx.post(live.base_url + RUN.replace("gemma-7b-it", "gemma-3-270m"), json={"prompt": "x"})
        assert early.status_code == 503 and workers_error(early)["code"] == 3040
        assert wait_until(lambda: httpx.get(live.base_url + "/health").status_code == 200, timeout=10)
    assert engine.stopped_with == 3.0


def test_method_and_route_errors_use_the_path_schema(served):
    r = httpx.get(served.base_url + CHAT, headers=served.headers)
    assert r.status_code == 405 and openai_error(r)
    r = httpx.get(served.base_url + "/v1/nothing-here", headers=served.headers)
    assert r.status_code == 404 and openai_error(r)["code"] == "not_found"
    r = httpx.post(served.base_url + "/client/v4/accounts/a/ai/nothing", headers=served.headers)
    assert r.status_code == 404 and workers_error(r)["code"] == 7000


def test_request_ids_reach_the_engine_and_the_response(served):
    r = served.post(CHAT, json=chat("rid"), headers={"X-Request-Id": "my-trace-123"})
    assert r.headers["x-request-id"] == "my-trace-123"
    assert served.gemma.requests_for("rid")[-1].request_id == "my-trace-123"
    r = served.post(CHAT, json=chat("rid2"), headers={"X-Request-Id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"
    assert served.gemma.requests_for("rid2")[-1].request_id == r.headers["x-request-id"]


def test_metrics(served):
    served.post(CHAT, json=chat("metrics", stream=True))
    text = httpx.get(served.base_url + "/metrics", headers=served.headers).text
    assert 'toolkit_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    for name in ("toolkit_time_to_first_token_seconds_count", "toolkit_inter_token_latency_seconds_count",
                 "toolkit_prompt_tokens_total", "toolkit_completion_tokens_total", "toolkit_queue_depth",
                 "toolkit_running_requests", "toolkit_kv_cache_usage_ratio"):
        line = next(line for line in text.splitlines() if line.startswith(name) and MODEL in line)
        assert float(line.rsplit(" ", 1)[1]) >= (1 if "count" in name or "tokens_total" in name else 0)


def test_openapi_schema_documents_both_apis(served):
    schema = httpx.get(served.base_url + "/schema/openapi.json").json()
    chat_body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert maximum(chat_body["schema"]["properties"]["n"]) == 4
    run = schema["paths"]["/client/v4/accounts/{account_id}/ai/run/{model}"]["post"]
    assert maximum(run["requestBody"]["content"]["application/json"]["schema"]["properties"]["top_k"]) == 50


def maximum(prop: dict) -> float | None:
    """The ``maximum`` of a property schema, looking inside ``anyOf`` (optional fields)."""
    return next((alt["maximum"] for alt in prop.get("anyOf", [prop]) if "maximum" in alt), None)
