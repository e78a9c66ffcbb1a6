"""The real server over REAL tiny ONNX engines (gemma-7b-it and qwen2-7b-instruct) on 127.0.0.1.

``toolkit.server.serve.build_app`` loads two tiny exported engine directories (the session
fixture ``tiny_engine``) exactly as ``toolkit serve DIR DIR`` does; uvicorn runs it in a
thread. Clients: the official ``openai`` package, the ``cloudflare`` SDK's ``ai.run`` and raw
httpx for exact SSE bytes. Streaming usage, split multi-byte characters, ``n``, stop strings,
seeds, tool calls, context limits, unknown fields and disconnects are exercised here against the
real runtime (detokenizer, stop strings, JSON constraints, seeds, batching, abort), where the fake-engine tests (test_server_*.py) can only check the server's plumbing.

The tiny models have random weights, so the tests never expect meaningful text: they compare
the server against the engine directory's own fp32 reference, against itself (stream vs not,
seed vs seed) or against constraints (JSON schemas, stop strings).
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import cloudflare
import httpx
import jsonschema
import openai
import pytest
from fake_engine import LiveServer, sse_data, wait_until
from toolkit.export.golden import Reference
from toolkit.recipes import get_recipe
from toolkit.server.serve import build_app

KEY = "real-test-key"
ACCOUNT = "acc-real"
GEMMA = "google/gemma-7b-it"
QWEN = "Qwen/Qwen2-7B-Instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RUN_GEMMA = f"/client/v4/accounts/{ACCOUNT}/ai/run/@hf/google/gemma-7b-it"
RUN_QWEN = f"/client/v4/accounts/{ACCOUNT}/ai/run/@hf/qwen/qwen2-7b-instruct"
CONTEXT = 512  # the tiny engines' context window
#: A raw prompt on which the tiny Qwen's greedy continuation runs to the end of the context.
LONG_RAW_PROMPT = "😀 🎉 日本語"
#: Characters that the tiny byte-level tokenizers split across several tokens.
MULTIBYTE = "おはよう 😀🎉 日本語 ✓🦀"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
SMALL_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "count"],
                "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
                               "count": {"type": "integer", "minimum": 0, "maximum": 99}}}


# ---- fixtures and helpers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_dirs(tiny_engine):
    return {GEMMA: tiny_engine(get_recipe("gemma-7b-it")), QWEN: tiny_engine(get_recipe("qwen2-7b-instruct"))}


@pytest.fixture(scope="module")
def served(engine_dirs):
    """The app as ``toolkit serve`` builds it, live on 127.0.0.1; ``served.engines[name]`` are the OnnxEngines."""
    app = build_app(list(engine_dirs.values()), [KEY], grace_s=1.0)
    with LiveServer(app) as live:
        live.engines = {name: app.state.ctx.models.resolve(name).engine for name in engine_dirs}
        yield live


@pytest.fixture(scope="module")
def oa(served):
    return openai.OpenAI(api_key=KEY, base_url=f"{served.base_url}/v1", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def sent_paths():
    return []


@pytest.fixture(scope="module")
def cf(served, sent_paths):
    """The cloudflare SDK pointed at the server; ``sent_paths`` records the raw paths it requests."""
    hook = lambda request: sent_paths.append(request.url.raw_path.decode())  # noqa: E731
    http = httpx.Client(event_hooks={"request": [hook]}, timeout=60)
    return cloudflare.Cloudflare(api_token=KEY, base_url=f"{served.base_url}/client/v4", max_retries=0,
                                 http_client=http)


def post(served, path: str, body: dict, timeout: float | httpx.Timeout = 60) -> httpx.Response:
    return httpx.post(served.base_url + path, json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=timeout)


def events(response: httpx.Response) -> list:
    """The JSON payloads of an SSE response, checking the framing and that it ends with ``[DONE]``."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    data = sse_data(response.content)
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat_text(chunks: list[dict], index: int = 0) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"] and c["choices"][0]["index"] == index)


def finish_reasons(chunks: list[dict]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["finish_reason"]:
                out.setdefault(choice["index"], []).append(choice["finish_reason"])
    return out


def tokenizer_of(engine_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(engine_dir))


def greedy_expectation(tokenizer, recipe_name: str, greedy_ids: list[int]) -> tuple[str, str, int]:
    """What the server must answer for a reference continuation: (text, finish_reason, completion_tokens).

    The reference runs 32 greedy steps ignoring EOS; the server stops at the first stop token
    (counted in the usage, not shown) and otherwise at max_tokens=32.
    """
    recipe = get_recipe(recipe_name)
    stops = {tokenizer.convert_tokens_to_ids(t) for t in recipe.stop_tokens} | {tokenizer.eos_token_id}
    cut = next((i for i, t in enumerate(greedy_ids) if t in stops), None)
    if cut is None:
        text = tokenizer.decode(greedy_ids, skip_special_tokens=True)
        return text.rstrip("\ufffd"), "length", len(greedy_ids)  # an incomplete last char is never sent
    return tokenizer.decode(greedy_ids[:cut], skip_special_tokens=True), "stop", cut + 1


def idle(engine) -> bool:
    stats = engine.stats()
    return stats.running == 0 and stats.waiting == 0 and stats.kv_cache_used_tokens == 0


class Throttle:
    """Slows every engine step (the engine's test hook) and records the largest decode batch."""

    def __init__(self, engine, step_s: float) -> None:
        self.engine, self.step_s, self.max_batch = engine, step_s, 0

    def __call__(self, plan) -> None:
        self.max_batch = max(self.max_batch, len(self.engine.scheduler.running))
        time.sleep(self.step_s)

    def __enter__(self) -> "Throttle":
        self.engine.fault_hook = self
        return self

    def __exit__(self, *exc) -> None:
        self.engine.fault_hook = None


# ---- basics: both schemas, all model names ---------------------------------------------------

@pytest.mark.parametrize("name", [GEMMA, "@hf/google/gemma-7b-it", "gemma-7b-it", QWEN, "@hf/qwen/qwen2-7b-instruct"])
def test_openai_chat_and_completion_under_every_name(oa, served, name):
    reply = oa.chat.completions.create(model=name, messages=user("Hello there"), max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.model == name and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = reply.usage
    assert u.prompt_tokens > 0 and 1 <= u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    recipe = served.engines[GEMMA if "gemma" in name else QWEN].recipe
    price = recipe.price_per_million_tokens
    cost = (u.prompt_tokens * price["input"] + u.completion_tokens * price["output"]) / 1e6
    assert u.model_extra["estimated_cost"] == pytest.approx(cost)
    legacy = oa.completions.create(model=name, prompt="Hello there", max_tokens=8, temperature=0)
    assert legacy.object == "text_completion" and isinstance(legacy.choices[0].text, str)
    assert 1 <= legacy.usage.completion_tokens <= 8


def test_models_lists_both_engines(oa):
    ids = {m.id for m in oa.models.list()}
    assert {GEMMA, "@hf/google/gemma-7b-it", QWEN, "@hf/qwen/qwen2-7b-instruct"} <= ids


def test_health_and_metrics_report_the_real_engines(served, oa):
    health = httpx.get(served.base_url + "/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {GEMMA, QWEN}
    oa.chat.completions.create(model=QWEN, messages=user("metrics"), max_tokens=4, temperature=0)
    text = httpx.get(served.base_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert f'toolkit_kv_cache_used_tokens{{model="{QWEN}"}}' in text
    assert f'toolkit_completion_tokens_total{{model="{QWEN}"}}' in text


# ---- greedy output equals the engine directory's fp32 reference -------------------------------

@pytest.mark.parametrize("model", [GEMMA, QWEN])
def test_greedy_through_the_server_equals_the_reference(oa, engine_dirs, model):
    """Chat messages of every golden case (and its prompt ids on /v1/completions) → the reference continuation."""
    reference = Reference.load(engine_dirs[model])
    tokenizer = tokenizer_of(engine_dirs[model])
    recipe_name = "gemma-7b-it" if model == GEMMA else "qwen2-7b-instruct"
    stopped = 0
    for case in reference.cases:
        text, finish, tokens = greedy_expectation(tokenizer, recipe_name, case.greedy_ids)
        stopped += finish == "stop"
        reply = oa.chat.completions.create(model=model, messages=case.messages, max_tokens=32, temperature=0)
        got = reply.choices[0]
        assert (got.message.content, got.finish_reason) == (text, finish), case.messages
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(case.prompt_ids), tokens)
        by_ids = oa.completions.create(model=model, prompt=case.prompt_ids, max_tokens=32, temperature=0)
        assert (by_ids.choices[0].text, by_ids.choices[0].finish_reason) == (text, finish)
        assert by_ids.usage.prompt_tokens == len(case.prompt_ids)
    assert 0 < stopped < len(reference.cases), "the golden cases should cover both EOS and max_tokens endings"


# ---- streaming ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [GEMMA, QWEN])
def test_openai_client_chat_stream_equals_non_stream(oa, model):
    messages = user("Tell me a short joke about computers.")
    whole = oa.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0).choices[0]
    chunks = list(oa.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0,
                                             stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].choices[0].delta.content is None  # the last chunk has an empty delta


def test_openai_client_completion_stream_equals_non_stream(oa):
    whole = oa.completions.create(model=QWEN, prompt="def reverse(s):", max_tokens=24, temperature=0).choices[0]
    chunks = list(oa.completions.create(model=QWEN, prompt="def reverse(s):", max_tokens=24, temperature=0,
                                        stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_usage_chunk_only_when_asked(served, path):
    body = {"model": GEMMA, "stream": True, "max_tokens": 12, "temperature": 0}
    body.update({"messages": user("usage please")} if path == CHAT else {"prompt": "usage please"})
    asked = events(post(served, path, {**body, "stream_options": {"include_usage": True}}))
    usage = asked[-1]
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == (
        usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"])
    assert 1 <= usage["usage"]["completion_tokens"] <= 12 and usage["usage"]["estimated_cost"] > 0
    assert all("usage" in c and c["usage"] is None for c in asked[:-1])
    for options in (None, {}, {"include_usage": False}):
        plain = events(post(served, path, body if options is None else {**body, "stream_options": options}))
        assert all("usage" not in c for c in plain), options
        assert all(c["choices"] for c in plain)
        assert len(plain) == len(asked) - 1


@pytest.mark.parametrize("model", [GEMMA, QWEN])
def test_split_multibyte_characters_never_stream_u_fffd(oa, served, model):
    """A JSON-schema const forces characters that the tiny tokenizers split into byte tokens."""
    schema = {"type": "object", "properties": {"text": {"const": MULTIBYTE}}, "required": ["text"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "greeting", "schema": schema}}
    probe = oa.chat.completions.create(model=model, messages=user("greet"), max_tokens=80, temperature=0,
                                       response_format=fmt, logprobs=True)
    assert any("\ufffd" in t.token for t in probe.choices[0].logprobs.content), "no character was split"
    assert json.loads(probe.choices[0].message.content) == {"text": MULTIBYTE}
    for path, body in ((CHAT, {"messages": user("greet")}), (COMPLETIONS, {"prompt": "greet"})):
        response = post(served, path, {"model": model, "stream": True, "max_tokens": 80, "temperature": 0,
                                       "response_format": fmt, **body})
        assert "\ufffd".encode() not in response.content and b"\\ufffd" not in response.content
        chunks = events(response)
        if path == CHAT:
            text = chat_text(chunks)
        else:
            text = "".join(c["choices"][0]["text"] for c in chunks)
        assert json.loads(text) == {"text": MULTIBYTE}
        assert len(chunks) > 10  # really streamed piecewise


def test_workers_ai_stream_of_multibyte_text(served):
    body = {"prompt": "Translate good morning into German and Japanese: Guten Morgen, おはようございます.",
            "temperature": 0, "max_tokens": 120}
    whole = post(served, RUN_GEMMA, body).json()["result"]["response"]
    response = post(served, RUN_GEMMA, {**body, "stream": True})
    assert "\ufffd".encode() not in response.content
    chunks = events(response)
    assert "".join(c["response"] for c in chunks) == whole
    assert any(ord(ch) > 0x2000 for ch in whole) and "\ufffd" not in whole


# ---- n, stop strings, seeds, logprobs ------------------------------------------------------------

def test_n2_two_choices_stream_and_not(oa, served):
    args = dict(model=QWEN, messages=user("Hi"), n=2, max_tokens=16, temperature=1.0, seed=11, logprobs=True)
    reply = oa.chat.completions.create(**args)
    assert [c.index for c in reply.choices] == [0, 1]
    # the stop token that ended a choice counts in the usage but has no logprob entry (issue #11)
    stopped = sum(c.finish_reason == "stop" for c in reply.choices)
    assert sum(len(c.logprobs.content) for c in reply.choices) + stopped == reply.usage.completion_tokens
    assert reply.choices[0].message.content != reply.choices[1].message.content
    body = {**args, "stream": True, "logprobs": False}
    chunks = events(post(served, CHAT, body))
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
    assert all(len(c["choices"]) == 1 for c in chunks)
    assert {i: chat_text(chunks, i) for i in (0, 1)} == {i: reply.choices[i].message.content for i in (0, 1)}
    assert finish_reasons(chunks) == {i: [reply.choices[i].finish_reason] for i in (0, 1)}
    legacy = oa.completions.create(model=QWEN, prompt="Hi", n=2, max_tokens=8, temperature=1.0, seed=3)
    assert sorted(c.index for c in legacy.choices) == [0, 1]


def test_n_above_four_is_a_clear_400(oa):
    with pytest.raises(openai.BadRequestError) as info:
        oa.chat.completions.create(model=QWEN, messages=user("Hi"), n=5, max_tokens=4)
    assert info.value.body["param"] == "n"


def _stop_across_tokens(text: str, tokens: list[str]) -> tuple[str, int]:
    """A 4-character stop string spanning a token boundary, whose first occurrence is at the returned index."""
    offset = 0
    for token in tokens[:-1]:
        offset += len(token)
        start = offset - 2
        stop = text[start:offset + 2]
        if start >= 2 and len(stop) == 4 and stop.strip() and text.find(stop) == start \
                and "\ufffd" not in text[:offset + 2]:
            return stop, start
    raise AssertionError(f"no usable token boundary in {text!r}")


@pytest.mark.parametrize("model", [GEMMA, QWEN])
def test_stop_string_spanning_tokens_is_never_emitted(oa, served, model):
    messages = user("Hello! How can I help? Tell me a short joke about computers")
    greedy = oa.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0,
                                        logprobs=True).choices[0]
    text = greedy.message.content
    stop, at = _stop_across_tokens(text, [t.token for t in greedy.logprobs.content])
    body = {"model": model, "messages": messages, "max_tokens": 40, "temperature": 0,
            "stop": ["never-in-the-output", stop]}
    whole = post(served, CHAT, body).json()["choices"][0]
    assert (whole["message"]["content"], whole["finish_reason"]) == (text[:at], "stop")
    chunks = events(post(served, CHAT, {**body, "stream": True}))
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
    assert "".join(pieces) == text[:at]  # nothing of the stop string, not even its first characters
    assert all(stop not in p for p in pieces)
    assert finish_reasons(chunks) == {0: ["stop"]}
    single = oa.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0, stop=stop)
    assert single.choices[0].message.content == text[:at]


def test_same_seed_same_text_alone_and_in_a_busy_batch(oa, served):
    def ask(prompt: str, seed: int | None, max_tokens: int = 24) -> str:
        return oa.chat.completions.create(model=QWEN, messages=user(prompt), temperature=1.0, top_p=0.95,
                                          seed=seed, max_tokens=max_tokens).choices[0].message.content

    alone = ask("Tell me a joke", 4242)
    assert ask("Tell me a joke", 4242) == alone
    with Throttle(served.engines[QWEN], 0.003) as throttle, ThreadPoolExecutor(6) as pool:
        noise = [pool.submit(ask, f"noise {i} please", None, 40) for i in range(5)]
        time.sleep(0.05)
        busy = pool.submit(ask, "Tell me a joke", 4242)
        assert busy.result() == alone
        [f.result() for f in noise]
    assert throttle.max_batch >= 3, "the seeded request was never batched with the others"
    assert ask("Tell me a joke", 4243) != alone
    body = {"prompt": "Tell me a joke", "seed": 77, "max_tokens": 24}  # Workers AI: default temperature 0.6
    first = post(served, RUN_QWEN, body).json()["result"]["response"]
    assert post(served, RUN_QWEN, body).json()["result"]["response"] == first
    assert post(served, RUN_QWEN, {**body, "seed": 78}).json()["result"]["response"] != first


def test_logprobs_shape(oa, served):
    reply = oa.chat.completions.create(model=GEMMA, messages=user("What is the capital of France?"), max_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.logprob == pytest.approx(tops[0])
        if "\ufffd" not in entry.token:
            assert entry.bytes == list(entry.token.encode("utf-8"))
    plain = oa.chat.completions.create(model=GEMMA, messages=user("What is the capital of France?"), max_tokens=10,
                                       temperature=0)
    assert plain.choices[0].logprobs is None
    assert "".join(e.token for e in content).startswith(plain.choices[0].message.content)
    legacy = oa.completions.create(model=GEMMA, prompt="The quick brown fox", max_tokens=6, temperature=0,
                                   logprobs=2).choices[0].logprobs
    n = len(legacy.tokens)
    assert n and len(legacy.token_logprobs) == len(legacy.top_logprobs) == len(legacy.text_offset) == n
    assert all(len(top) <= 2 for top in legacy.top_logprobs) and legacy.text_offset == sorted(legacy.text_offset)
    chunks = events(post(served, CHAT, {"model": GEMMA, "messages": user("What is the capital of France?"),
                                        "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 1,
                                        "stream": True}))
    streamed = [t for c in chunks if c["choices"][0].get("logprobs") for t in c["choices"][0]["logprobs"]["content"]]
    assert [t["token"] for t in streamed] == [e.token for e in content]


def test_logprob_bytes_rebuild_split_characters(oa):
    schema = {"type": "object", "properties": {"text": {"const": MULTIBYTE}}, "required": ["text"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "g", "schema": schema}}
    reply = oa.chat.completions.create(model=QWEN, messages=user("greet"), max_tokens=80, temperature=0,
                                       logprobs=True, response_format=fmt)
    raw = b"".join(bytes(t.bytes) for t in reply.choices[0].logprobs.content)
    assert raw.decode("utf-8", errors="replace").startswith(reply.choices[0].message.content)


# ---- JSON mode and tools ---------------------------------------------------------------------

@pytest.mark.parametrize("model", [GEMMA, QWEN])
def test_json_schema_mode_output_validates(oa, served, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SMALL_SCHEMA}}
    for seed in (1, 2):
        reply = oa.chat.completions.create(model=model, messages=user("Describe a thing"), max_tokens=80,
                                           temperature=1.0, seed=seed, response_format=fmt)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SMALL_SCHEMA)
    chunks = events(post(served, CHAT, {"model": model, "messages": user("Describe a thing"), "max_tokens": 80,
                                        "temperature": 0, "response_format": fmt, "stream": True}))
    jsonschema.validate(json.loads(chat_text(chunks)), SMALL_SCHEMA)


def test_json_object_mode_parses(oa):
    reply = oa.chat.completions.create(model=QWEN, messages=user("json"), max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("model", [GEMMA, QWEN])
def test_required_and_named_tool_choice_give_valid_calls(oa, model):
    tools = [WEATHER_TOOL, CLOCK_TOOL]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}},
                   {"type": "function", "function": {"name": "get_time"}}):
        reply = oa.chat.completions.create(model=model, messages=user("Weather in Paris?"), tools=tools,
                                           tool_choice=choice, max_tokens=60, temperature=0)
        picked = reply.choices[0]
        assert picked.finish_reason == "tool_calls" and picked.message.content is None
        call = picked.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        if isinstance(choice, dict):
            assert call.function.name == choice["function"]["name"]
        if call.function.name == "get_weather":
            jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
        else:
            assert call.function.arguments == "{}"  # a tool without parameters gets "{}"


@pytest.mark.parametrize("model", [GEMMA, QWEN])
def test_streamed_tool_call_fragments_join_into_json(oa, served, model):
    body = {"model": model, "messages": user("Weather in Paris?"), "tools": [WEATHER_TOOL, CLOCK_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 60,
            "temperature": 1.0, "seed": 5}
    whole = post(served, CHAT, body).json()["choices"][0]["message"]["tool_calls"][0]
    chunks = events(post(served, CHAT, {**body, "stream": True}))
    deltas = [tc for c in chunks for tc in (c["choices"][0]["delta"].get("tool_calls") or [])]
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"]["name"] == "get_weather"
    assert all(d["index"] == 0 for d in deltas)
    arguments = "".join(d["function"].get("arguments", "") for d in deltas)
    assert arguments == whole["function"]["arguments"]
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])
    assert all(not c["choices"][0]["delta"].get("content") for c in chunks)
    assert finish_reasons(chunks) == {0: ["tool_calls"]}
    client_chunks = list(oa.chat.completions.create(stream=True, **body))
    fragments = [tc.function.arguments or "" for c in client_chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert "".join(fragments) == arguments and client_chunks[-1].choices[0].finish_reason == "tool_calls"


def test_max_tokens_zero_counts_the_real_prompt(oa):
    reply = oa.chat.completions.create(model=GEMMA, messages=user("What is the capital of France?"), max_tokens=0)
    full = oa.chat.completions.create(model=GEMMA, messages=user("What is the capital of France?"), max_tokens=1)
    assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == full.usage.prompt_tokens > 0


@pytest.mark.parametrize("path", [CHAT, RUN_GEMMA])
def test_engine_failure_mid_stream_is_an_error_event(served, path):
    engine = served.engines[GEMMA]
    steps = {"n": 0}

    def fail_third_step(plan) -> None:
        steps["n"] += 1
        if steps["n"] == 3:
            raise RuntimeError("injected model failure")

    body = {"messages": user("Tell me a short joke about computers."), "max_tokens": 40, "temperature": 0,
            "stream": True, **({"model": GEMMA} if path == CHAT else {})}
    engine.fault_hook = fail_third_step
    try:
        response = post(served, path, body)
    finally:
        engine.fault_hook = None
    data = sse_data(response.content)
    assert response.status_code == 200 and "[DONE]" not in data
    last = json.loads(data[-1])
    error = last["error"] if path == CHAT else last["errors"][0]
    assert "injected model failure" in error["message"] and "Traceback" not in response.text
    assert len(data) >= 2  # some text went out before the failure
    assert wait_until(lambda: idle(engine))
    assert post(served, path, {**body, "stream": False}).status_code == 200  # the engine recovered


# ---- context window --------------------------------------------------------------------------

def test_prompt_beyond_the_context_in_both_schemas(oa, cf, served):
    long_text = "hello world " * 400
    with pytest.raises(openai.BadRequestError) as info:
        oa.chat.completions.create(model=GEMMA, messages=user(long_text), max_tokens=8)
    assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
    assert str(CONTEXT) in info.value.body["message"] and info.value.body["param"] == "messages"
    r = post(served, COMPLETIONS, {"model": QWEN, "prompt": long_text})
    assert r.status_code == 400 and str(CONTEXT) in r.json()["error"]["message"]
    r = post(served, CHAT, {"model": QWEN, "messages": user("short"), "max_tokens": 100_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    for path, body in ((RUN_GEMMA, {"prompt": long_text}), (RUN_QWEN, {"messages": user(long_text), "stream": True})):
        r = post(served, path, body)
        error = r.json()
        assert r.status_code == 413 and error["success"] is False and error["errors"][0]["code"] == 3006
        assert str(CONTEXT) in error["errors"][0]["message"]
    with pytest.raises(cloudflare.APIStatusError) as wa:
        cf.ai.run("@hf/google/gemma-7b-it", account_id=ACCOUNT, prompt=long_text)
    assert wa.value.status_code == 413
    assert all(idle(engine) for engine in served.engines.values())


def test_unknown_fields_tolerated_and_bad_values_named(served):
    ok = post(served, CHAT, {"model": QWEN, "messages": user("Hi"), "max_tokens": 4, "some_future_field": {"x": 1}})
    assert ok.status_code == 200
    for field, value in (("top_k", -1), ("temperature", "hot"), ("max_tokens", -5)):
        r = post(served, CHAT, {"model": QWEN, "messages": user("Hi"), field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    r = post(served, RUN_QWEN, {"prompt": "Hi", "top_k": 0})
    error = r.json()["errors"][0]
    assert r.status_code == 400 and error["code"] == 5006 and "top_k" in error["message"]


# ---- Workers AI ------------------------------------------------------------------------------

def test_workers_ai_sdk_prompt_and_messages_percent_encoded(cf, served, sent_paths):
    result = cf.ai.run("@hf/google/gemma-7b-it", account_id=ACCOUNT, prompt="Hello there", max_tokens=12,
                       temperature=0)
    assert isinstance(result["response"], str) and 1 <= result["usage"]["completion_tokens"] <= 12
    assert sent_paths[-1] == f"/client/v4/accounts/{ACCOUNT}/ai/run/@hf%2Fgoogle%2Fgemma-7b-it"
    raw = post(served, RUN_GEMMA, {"prompt": "Hello there", "max_tokens": 12, "temperature": 0}).json()
    assert raw["result"] == result and raw["success"] is True and raw["errors"] == [] and raw["messages"] == []
    encoded = post(served, RUN_GEMMA.replace("@hf/google/", "@hf%2Fgoogle%2F"),
                   {"prompt": "Hello there", "max_tokens": 12, "temperature": 0}).json()
    assert encoded["result"] == result
    # the prompt form applies the chat template: the same answer and usage as one user message
    messages = cf.ai.run("@hf/google/gemma-7b-it", account_id=ACCOUNT, messages=user("Hello there"),
                         max_tokens=12, temperature=0)
    assert messages == result
    chat = post(served, CHAT, {"model": GEMMA, "messages": user("Hello there"), "max_tokens": 12,
                               "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"] == result["response"]
    assert chat["usage"]["prompt_tokens"] == result["usage"]["prompt_tokens"]


def test_workers_ai_raw_prompt_skips_the_template(cf):
    templated = cf.ai.run("@hf/qwen/qwen2-7b-instruct", account_id=ACCOUNT, prompt="Hello", max_tokens=4)
    raw = cf.ai.run("@hf/qwen/qwen2-7b-instruct", account_id=ACCOUNT, prompt="Hello", raw=True, max_tokens=4)
    assert raw["usage"]["prompt_tokens"] < templated["usage"]["prompt_tokens"]


def test_workers_ai_stream_bytes(served):
    body = {"messages": user("Tell me a short joke about computers."), "max_tokens": 24, "temperature": 0}
    whole = post(served, RUN_GEMMA, body).json()["result"]
    response = post(served, RUN_GEMMA, {**body, "stream": True})
    data = sse_data(response.content)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert data[-1] == "[DONE]"
    payloads = [json.loads(d) for d in data[:-1]]
    for d, payload in zip(data, payloads):
        assert d == json.dumps(payload, ensure_ascii=False)  # the reference's spacing, UTF-8 not escaped
    *texts, final = payloads
    assert texts and all(list(p) == ["response"] and p["response"] for p in texts)
    assert final == {"response": "", "usage": whole["usage"]}
    assert "".join(p["response"] for p in texts) == whole["response"]


def test_workers_ai_json_mode(cf, served):
    schema = {"type": "object", "properties": {"text": {"const": MULTIBYTE}, "ok": {"type": "boolean"}},
              "required": ["text", "ok"], "additionalProperties": False}
    result = cf.ai.run("@hf/google/gemma-7b-it", account_id=ACCOUNT, messages=user("json please"), max_tokens=80,
                       response_format={"type": "json_schema", "json_schema": schema})
    assert isinstance(result["response"], dict)
    jsonschema.validate(result["response"], schema)
    obj = cf.ai.run("@hf/qwen/qwen2-7b-instruct", account_id=ACCOUNT, messages=user("json"), max_tokens=200,
                    temperature=0, response_format={"type": "json_object"})
    assert isinstance(obj["response"], dict)
    r = post(served, RUN_QWEN, {"messages": user("json"), "stream": True, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5006


def test_workers_ai_sdk_errors(cf):
    with pytest.raises(cloudflare.BadRequestError) as unknown:
        cf.ai.run("@hf/nobody/no-such-model", account_id=ACCOUNT, prompt="Hi")
    assert unknown.value.status_code == 400 and "5007" in str(unknown.value.body) + str(unknown.value)
    with pytest.raises(cloudflare.APIStatusError) as lora:
        cf.ai.run("@hf/google/gemma-7b-it", account_id=ACCOUNT, prompt="Hi", lora="my-adapter")
    assert lora.value.status_code == 405


# ---- a disconnect aborts the generation and frees its cache -------------------------

LONG_JSON = {"type": "json_schema", "json_schema": {"name": "long", "schema": {
    "type": "object", "properties": {"s": {"type": "string", "minLength": 4000}}, "required": ["s"]}}}
DISCONNECTS = {
    "openai-chat-stream": (CHAT, {"model": QWEN, "stream": True, "messages": user("long"), "temperature": 0,
                                  "response_format": LONG_JSON}),
    "openai-completion-stream": (COMPLETIONS, {"model": QWEN, "stream": True, "prompt": LONG_RAW_PROMPT,
                                               "temperature": 0}),
    "workers-ai-stream": (RUN_QWEN, {"prompt": LONG_RAW_PROMPT, "raw": True, "stream": True, "temperature": 0}),
    "openai-chat-non-stream": (CHAT, {"model": QWEN, "messages": user("long"), "temperature": 0,
                                      "response_format": LONG_JSON}),
    "workers-ai-non-stream": (RUN_QWEN, {"prompt": LONG_RAW_PROMPT, "raw": True, "temperature": 0}),
}


def _send_raw(served, path: str, body: dict) -> socket.socket:
    """POST over a plain socket (so the test can hang up at any moment); returns the open socket."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    sock.sendall(head + payload)
    return sock


@pytest.mark.parametrize("case", list(DISCONNECTS))
def test_client_disconnect_aborts_and_frees_the_cache(served, case):
    path, body = DISCONNECTS[case]
    body = {**body, "max_tokens": 400}
    engine = served.engines[QWEN]
    assert wait_until(lambda: idle(engine))
    before = engine.stats().generated_tokens_total
    with Throttle(engine, 0.01):  # 400 tokens would take > 4 s
        if body.get("stream"):  # httpx: read two events, then close the response
            with httpx.Client(timeout=30) as client, client.stream(
                    "POST", served.base_url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status_code == 200
                received = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        received.append(line)
                    if len(received) == 2:
                        break
                assert not any('"error"' in line for line in received), received
                # the engine thread may be between two bookkeeping updates; give it a moment
                wait_until(lambda: engine.stats().running == 1, timeout=1)
                busy = engine.stats()
        else:  # non-streaming: hang up once the engine is generating
            sock = _send_raw(served, path, body)
            started = wait_until(lambda: engine.stats().generated_tokens_total - before >= 2, timeout=30)
            busy, received = engine.stats(), []
            sock.close()
            assert started, engine.stats()
        assert busy.running == 1 and busy.kv_cache_used_tokens > 0, (busy, received)  # still generating
        assert wait_until(lambda: idle(engine), timeout=10), engine.stats()
    generated = engine.stats().generated_tokens_total - before
    assert generated < 200, f"{generated} tokens generated: the request ran on after the disconnect"
