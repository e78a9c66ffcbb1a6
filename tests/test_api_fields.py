"""Issue #11: every field a client sends is honoured, refused with a 400 naming it, or listed in the README
as accepted without effect (``server/api_fields.py``); over the fake engine (what reaches the engine).

The real-engine effects (logit_bias, min_tokens, stop tokens, batches equal to single prompts, FIM ids)
are in test_api_fields_runtime.py and test_api_fields_real.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import openai
import pytest
from fake_engine import DEFAULT_PIECES, sse_data
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from toolkit.server.api_fields import OPENAI_FIELDS, WORKERS_AI_FIELDS, readme_rows
from toolkit.server.openai.schemas import ChatCompletionRequest, CompletionRequest
from toolkit.server.workers_ai.schemas import RunRequest

README = Path(__file__).resolve().parents[1] / "README.md"
GEMMA = "google/gemma-7b-it"
CODEGEMMA = "google/codegemma-7b-it"
STATUSES = ("honoured", "refused", "ignored")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- the classification is complete and the README agrees -----------------------------------------

def _client_fields() -> set[str]:
    chat = set(chat_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
    legacy = set(completion_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
    return chat | legacy


def test_every_openai_client_parameter_is_classified():
    missing = sorted(_client_fields() - set(OPENAI_FIELDS))
    assert not missing, f"classify these openai client parameters in server/api_fields.py: {missing}"


def test_every_schema_field_is_classified_and_every_classified_field_is_decoded():
    schema = set(ChatCompletionRequest.__struct_fields__) | set(CompletionRequest.__struct_fields__)
    assert schema == set(OPENAI_FIELDS), (sorted(schema - set(OPENAI_FIELDS)), sorted(set(OPENAI_FIELDS) - schema))
    assert set(RunRequest.__struct_fields__) == set(WORKERS_AI_FIELDS)


@pytest.mark.parametrize("fields", [OPENAI_FIELDS, WORKERS_AI_FIELDS])
def test_statuses_are_well_formed(fields):
    for name, status in fields.items():
        kind, _, reason = status.partition(": ")
        assert kind in STATUSES, (name, status)
        assert kind != "ignored" or len(reason) > 20, f"{name}: an ignored field needs its reason"


def test_readme_table_lists_every_classified_field():
    text = README.read_text()
    section = text.split("## API fields", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| OpenAI |") or line.startswith("| Workers AI |")]
    assert rows == readme_rows("OpenAI", OPENAI_FIELDS) + readme_rows("Workers AI", WORKERS_AI_FIELDS)


# ---- refused: a 400 naming the field ------------------------------------------------------------------

REFUSED = {"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
           "web_search_options": {}, "moderation": {"model": "x"}}


@pytest.mark.parametrize("name", sorted(n for n, s in OPENAI_FIELDS.items() if s == "refused"))
def test_refused_field_is_a_400_naming_it(served, name, no_server_errors):
    response = served.post("/v1/chat/completions", json={"model": GEMMA, "messages": user("hi"), name: REFUSED[name]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == name


def test_no_op_values_of_refused_fields_are_accepted(client):
    reply = client.chat.completions.create(model=GEMMA, messages=user("no-op"), modalities=["text"])
    assert reply.choices[0].message.content == "".join(DEFAULT_PIECES)


# ---- ignored: accepted, and the engine request is the same as without them --------------------------

IGNORED_VALUES = {"user": "u-1", "safety_identifier": "s-1", "metadata": {"k": "v"}, "store": True,
                  "service_tier": "flex", "prompt_cache_key": "k", "prompt_cache_retention": "24h",
                  "prompt_cache_options": {"a": 1},
                  "reasoning_effort": "low", "verbosity": "low"}


def test_every_ignored_field_has_a_test_value():
    assert set(IGNORED_VALUES) == {n for n, s in OPENAI_FIELDS.items() if s.startswith("ignored")}


def test_ignored_fields_change_nothing(served):
    plain = served.post("/v1/chat/completions", json={"model": GEMMA, "messages": user("ignored?"), "seed": 5})
    extra = served.post("/v1/chat/completions",
                        json={"model": GEMMA, "messages": user("ignored?"), "seed": 5, **IGNORED_VALUES})
    assert plain.status_code == extra.status_code == 200, extra.text
    first, second = served.gemma.requests_for("ignored?")[-2:]
    assert first.prompt_ids == second.prompt_ids and first.params == second.params
    assert plain.json()["choices"] == extra.json()["choices"]


# ---- honoured: what reaches the engine ---------------------------------------------------------------

def test_vllm_sampling_fields_reach_the_engine(client, served):
    client.completions.create(model=GEMMA, prompt="vllm fields", max_tokens=5, extra_body={
        "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [7, 9], "include_stop_str_in_output": True,
        "skip_special_tokens": False}, logit_bias={"12": 100, "13": -100})
    params = served.gemma.requests_for("vllm fields")[-1].params
    assert (params.min_tokens, params.ignore_eos, params.stop_token_ids) == (2, True, (7, 9))
    assert params.include_stop_str_in_output and not params.skip_special_tokens
    assert params.logit_bias == {12: 100.0, 13: -100.0}


@pytest.mark.parametrize("bias, status", [({"abc": 1}, 400), ({"12": 101}, 400), ({"-1": 1}, 400),
                                          ({str(1 << 30): 1}, 400), ({"12": -100}, 200)])
def test_logit_bias_keys_and_range(served, bias, status):
    response = served.post("/v1/completions", json={"model": GEMMA, "prompt": "bias", "logit_bias": bias})
    assert response.status_code == status, response.text
    if status == 400:
        assert "logit_bias" in response.json()["error"]["param"]


def test_best_of_must_equal_n(served):
    ok = served.post("/v1/completions", json={"model": GEMMA, "prompt": "best", "best_of": 2, "n": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    bad = served.post("/v1/completions", json={"model": GEMMA, "prompt": "best", "best_of": 3, "n": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "best_of"


TWO_CALLS = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time"}}]


def test_parallel_tool_calls_false_keeps_one_call(client, served):
    served.gemma.script("two calls", pieces=[TWO_CALLS[i:i + 9] for i in range(0, len(TWO_CALLS), 9)])
    both = client.chat.completions.create(model=GEMMA, messages=user("two calls"), tools=TOOLS)
    assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    one = client.chat.completions.create(model=GEMMA, messages=user("two calls"), tools=TOOLS,
                                         parallel_tool_calls=False)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    system = served.gemma.rendered(served.gemma.requests_for("two calls")[-1]).messages[0]["content"]
    assert "at most one tool" in system
    stream = client.chat.completions.create(model=GEMMA, messages=user("two calls"), tools=TOOLS,
                                            parallel_tool_calls=False, stream=True)
    heads = [t for c in stream for t in (c.choices[0].delta.tool_calls or []) if c.choices and t.function.name]
    assert [t.function.name for t in heads] == ["get_weather"]


def test_legacy_functions_and_function_call_are_tools_and_tool_choice(client, served):
    served.gemma.script("legacy", pieces=['{"name": "get_time", "arguments": {}}'])
    functions = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
                 {"name": "get_time"}]
    reply = client.chat.completions.create(model=GEMMA, messages=user("legacy"), functions=functions)
    assert reply.choices[0].message.tool_calls[0].function.name == "get_time"
    client.chat.completions.create(model=GEMMA, messages=user("legacy"), functions=functions,
                                   function_call={"name": "get_weather"})
    forced = served.gemma.requests_for("legacy")[-1].params.json_schema
    assert forced["properties"]["name"] == {"const": "get_weather"}
    client.chat.completions.create(model=GEMMA, messages=user("legacy"), functions=functions, function_call="none")
    assert served.gemma.rendered(served.gemma.requests_for("legacy")[-1]).messages[0]["role"] == "user"
    bad = served.post("/v1/chat/completions", json={"model": GEMMA, "messages": user("legacy"),
                                                    "functions": functions, "tools": TOOLS})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "functions"


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", {"messages": user("usage please")}),
                                        ("/v1/completions", {"prompt": "usage please"})])
def test_continuous_usage_stats_puts_the_usage_on_every_chunk(served, path, body):
    response = served.post(path, json={"model": GEMMA, **body, "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    chunks = [json.loads(d) for d in sse_data(response.content)[:-1]]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"] is not None for c in chunks)
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == len(DEFAULT_PIECES)
    assert len(set(counts)) > 3  # it grows with the stream, not just the final number repeated


def test_echo_with_a_token_id_prompt_decodes_the_ids(client, served):
    ids = served.gemma.prompts.encode(prompt="echo these words")
    reply = client.completions.create(model=GEMMA, prompt=ids, echo=True, max_tokens=3)
    assert reply.choices[0].text == "<1> echo these words" + "".join(DEFAULT_PIECES[:3])


# ---- batches of prompts --------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_of_prompts_gives_one_choice_per_prompt_and_n_in_openai_order(client, served, stream):
    served.gemma.script("batch a", pieces=["A1", " A2"])
    served.gemma.script("batch b", pieces=["B1", " B2", " B3"])
    kwargs = dict(model=GEMMA, prompt=["batch a", "batch b"], n=2, seed=None)
    if stream:
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        usage = None
        for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
                reasons[c.index] = c.finish_reason or reasons.get(c.index)
            usage = chunk.usage or usage
        got = [texts[i] for i in range(4)]
        assert all(reasons[i] == "stop" for i in range(4))
    else:
        reply = client.completions.create(**kwargs)
        assert [c.index for c in reply.choices] == [0, 1, 2, 3]
        got, usage = [c.text for c in reply.choices], reply.usage
    assert got == ["A1 A2", "A1 A2", "B1 B2 B3", "B1 B2 B3"]
    prompt_tokens = sum(len(served.gemma.prompts.encode(prompt=p)) for p in ("batch a", "batch b"))
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, 2 * 2 + 2 * 3)


def test_a_batch_of_token_id_lists_and_echo(client, served):
    a, b = (served.gemma.prompts.encode(prompt=p) for p in ("ids a", "ids b"))
    served.gemma.script("ids a", pieces=["x"])
    served.gemma.script("ids b", pieces=["y"])
    reply = client.completions.create(model=GEMMA, prompt=[a, b], echo=True)
    assert [c.text for c in reply.choices] == ["<1> ids a" + "x", "<1> ids b" + "y"]


def test_an_error_in_one_prompt_of_a_batch_fails_the_request_and_aborts_the_others(served, no_server_errors):
    from toolkit.runtime.errors import PromptTooLongError

    served.gemma.script("batch slow", pieces=["s"] * 50, delay_s=0.05)
    served.gemma.script("batch bad", fail_before=PromptTooLongError(10, 10, 5))
    response = served.post("/v1/completions", json={"model": GEMMA, "prompt": ["batch slow", "batch bad"]})
    assert response.status_code == 400, response.text
    slow = served.gemma.requests_for("batch slow")[-1]
    assert slow.request_id in served.gemma.aborted


@pytest.mark.parametrize("prompt", [[], [[]], ["a", [1]], [["a"]], ["x"] * 17])
def test_malformed_batches_are_a_400_naming_prompt(served, prompt):
    response = served.post("/v1/completions", json={"model": GEMMA, "prompt": prompt})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


# ---- fill-in-the-middle ------------------------------------------------------------------------------

def test_suffix_builds_the_fim_prompt_or_is_refused(client, served):
    client.completions.create(model=CODEGEMMA, prompt="def f(x):", suffix="return y", max_tokens=2)
    rendered = served.small.rendered(served.small.requests[-1])
    assert rendered.prompt == "<|fim_prefix|>def f(x):<|fim_suffix|>return y<|fim_middle|>"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=GEMMA, prompt="def f(x):", suffix="return y")
    assert info.value.body["param"] == "suffix"


# ---- tokenizer endpoints -------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "/v1", "/v1/openai"])
def test_tokenize_and_detokenize(served, prefix):
    prompts = served.gemma.prompts
    body = served.post(prefix + "/tokenize", json={"model": GEMMA, "prompt": "count these words"}).json()
    assert body == {"count": 4, "max_model_len": served.gemma.context_length,
                    "tokens": prompts.encode(prompt="count these words")}
    chat = served.post(prefix + "/tokenize", json={"model": GEMMA, "messages": user("count these words")}).json()
    assert chat["tokens"] == prompts.encode(messages=user("count these words")) and chat["count"] == 7
    text = served.post(prefix + "/detokenize", json={"model": GEMMA, "tokens": body["tokens"]}).json()
    assert text == {"prompt": "<1> count these words"}


@pytest.mark.parametrize("body, param", [({"model": GEMMA}, "messages"),
                                         ({"model": GEMMA, "prompt": "a", "messages": user("a")}, "prompt"),
                                         ({"model": GEMMA, "messages": user("a"), "add_generation_prompt": False},
                                          "add_generation_prompt")])
def test_tokenize_errors_name_the_field(served, body, param):
    response = served.post("/tokenize", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_detokenize_refuses_ids_outside_the_vocabulary(served):
    response = served.post("/detokenize", json={"model": GEMMA, "tokens": [1 << 31]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tokens"


def test_the_load_generators_ignore_eos_reaches_the_engine(served):
    from toolkit.bench.loadgen import LoadSpec, request_body, run_http_bench
    import asyncio

    body = request_body(LoadSpec(served.base_url + "/v1", GEMMA, ignore_eos=True), "bench prompt", 4)
    assert served.post("/v1/completions", json=body).status_code == 200
    assert served.gemma.requests_for("bench prompt")[-1].params.ignore_eos is True
    with pytest.raises(ValueError, match="ignore_eos"):
        asyncio.run(run_http_bench(served.base_url, GEMMA, [1], schema="workers-ai", ignore_eos=True))
