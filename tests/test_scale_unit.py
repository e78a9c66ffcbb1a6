"""toolkit.scale without a Ray cluster: option mapping, replica resources, the proxy's replica-loss
middleware, the merged /metrics exposition, and ``ray`` staying out of ``import toolkit`` / ``--help``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from toolkit.recipes import get_recipe
from toolkit.scale.metrics_merge import merge_expositions
from toolkit.scale.options import (DEFAULT_MAX_ONGOING_REQUESTS, ScaleOptions, ScaleOptionsError, engine_capacity,
                                   replica_resources)
from toolkit.scale.proxy_errors import ReplicaLossMiddleware


def test_fixed_replicas_map_to_num_replicas_with_grace_and_resources():
    opts = ScaleOptions(replicas=2, threads=3, grace_s=7).deployment_options({"num_cpus": 3.0})
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    assert opts["graceful_shutdown_timeout_s"] == 7
    assert opts["ray_actor_options"] == {"num_cpus": 3.0}
    assert opts["max_ongoing_requests"] == DEFAULT_MAX_ONGOING_REQUESTS == 32 + 256  # default rows + waiting queue
    assert engine_capacity(64) == 64 + 256  # toolkit serve --ray --max-batch-size 64


def test_min_max_turn_on_autoscaling_on_ongoing_requests():
    opts = ScaleOptions(min_replicas=1, max_replicas=8, target_ongoing_requests=4).deployment_options({})
    assert "num_replicas" not in opts
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (1, 1, 8)
    assert auto["target_ongoing_requests"] == 4
    # --replicas is the starting point inside the bounds
    auto = ScaleOptions(replicas=3, max_replicas=8).deployment_options({})["autoscaling_config"]
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (1, 3, 8)


@pytest.mark.parametrize("kwargs", [{"replicas": 0}, {"min_replicas": 3, "max_replicas": 2}, {"threads": 0},
                                    {"target_ongoing_requests": 0}, {"max_replicas": 0}])
def test_contradictory_options_are_refused(kwargs):
    with pytest.raises(ScaleOptionsError):
        ScaleOptions(**kwargs)


def test_onnx_replica_reserves_its_threads_as_cpus(tiny_engine):
    engine = tiny_engine(get_recipe("gemma-7b-it"), "fp32")
    assert replica_resources([engine], threads=None) == {"num_cpus": 1.0}
    assert replica_resources([engine], threads=4) == {"num_cpus": 4.0}


@pytest.mark.parametrize(("recipe", "precision", "gpus"), [("gemma-7b-it", "int8", 1), ("codellama-70b-instruct", "fp16", 8),
                                                           ("codellama-70b-instruct", "int8", 4)])
def test_trtllm_replica_asks_for_its_tensor_parallel_gpus(tmp_path, monkeypatch, recipe, precision, gpus):
    from toolkit.scale import options as options_module

    class Manifest:
        target, recipe_name = "trtllm", recipe

    manifest = Manifest()
    manifest.recipe = recipe
    manifest.precision = precision
    monkeypatch.setattr("toolkit.artifact.manifest.load_manifest", lambda d, verify_hashes=True: manifest)
    assert get_recipe(recipe).trtllm.tensor_parallel_size[precision] == gpus
    assert options_module.replica_resources([tmp_path], threads=8) == {"num_cpus": 1.0, "num_gpus": gpus}


def test_merged_metrics_label_every_replica():
    from toolkit.server.metrics import Metrics
    from toolkit.server.registry import ModelRegistry

    texts = []
    for n in (1, 2):
        m = Metrics(ModelRegistry({}))
        m.completion_tokens.labels("m").inc(n)
        texts.append(m.render()[0].decode())
    body, content_type = merge_expositions([("r2", texts[1]), ("r1", texts[0])])
    lines = body.decode().splitlines()
    assert 'toolkit_completion_tokens_total{model="m",replica="r1"} 1.0' in lines
    assert 'toolkit_completion_tokens_total{model="m",replica="r2"} 2.0' in lines
    assert sum(line.startswith("# TYPE toolkit_completion_tokens_total ") for line in lines) == 1
    assert content_type.startswith("text/plain")


def _run_through(middleware, path):
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.disconnect"}

    asyncio.run(middleware({"type": "http", "path": path, "method": "POST"}, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert not sent[-1].get("more_body", False)
    return status, dict(next(m for m in sent if m["type"] == "http.response.start")["headers"]), body


async def _lost_before_start(scope, receive, send):
    return  # what Ray's proxy does when the replica died before answering


async def _lost_mid_stream(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b'data: {"response": "a"}\n\n', "more_body": True})


async def _completes(scope, receive, send):
    await send({"type": "http.response.start", "status": 429, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"error": "app envelope"}', "more_body": False})


def test_replica_lost_before_answer_is_a_retryable_503_in_each_schema():
    status, headers, body = _run_through(ReplicaLossMiddleware(_lost_before_start), "/v1/chat/completions")
    assert status == 503 and headers[b"retry-after"] == b"1"
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("service_unavailable_error", "engine_unavailable")
    status, _, body = _run_through(ReplicaLossMiddleware(_lost_before_start), "/client/v4/accounts/a/ai/run/@hf/m")
    assert status == 503 and json.loads(body)["errors"][0]["code"] == 3040


def test_replica_lost_mid_stream_ends_with_an_error_event():
    status, _, body = _run_through(ReplicaLossMiddleware(_lost_mid_stream), "/client/v4/accounts/a/ai/run/@hf/m")
    assert status == 200
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[0] == 'data: {"response": "a"}'
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["success"] is False and last["errors"][0]["code"] == 3040


def test_complete_answers_pass_through_unchanged():
    status, _, body = _run_through(ReplicaLossMiddleware(_completes), "/v1/chat/completions")
    assert (status, body) == (429, b'{"error": "app envelope"}')


def test_health_answers_503_when_no_replica_answers():
    async def never(scope, receive, send):
        await asyncio.sleep(60)

    status, _, body = _run_through(ReplicaLossMiddleware(never, health_timeout_s=0.2), "/health")
    assert status == 503 and json.loads(body)["status"] == "starting"


def test_ray_is_not_imported_by_import_toolkit_or_help():
    code = ("import sys, toolkit, toolkit.cli, toolkit.scale, toolkit.scale.options, toolkit.scale.proxy_errors\n"
            "from click.testing import CliRunner\n"
            "r = CliRunner().invoke(toolkit.cli.main, ['serve', '--help'])\n"
            "assert r.exit_code == 0, r.output\n"
            "assert '--ray' in r.output and '--max-replicas' in r.output, r.output\n"
            "print('ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_contradictory_cli_options_fail_before_ray_starts(tiny_engine):
    from click.testing import CliRunner

    from toolkit.cli import main

    engine = tiny_engine(get_recipe("gemma-7b-it"), "fp32")
    result = CliRunner().invoke(main, ["serve", str(engine), "--ray", "--min-replicas", "3", "--max-replicas", "2"])
    assert result.exit_code == 2 and "--min-replicas" in result.output


# ---- the proxy's adapter routing middleware (scale/adapter_routing.py) -------------------------------------------

from toolkit.scale.adapter_routing import ADAPTERS_HEADER, MODEL_ID_HEADER, AdapterRoutingMiddleware  # noqa: E402

WAI_RUN = "/client/v4/accounts/acct/ai/run/@hf/google/gemma-7b-it"


@pytest.mark.parametrize(("path", "body", "adapter"), [
    ("/v1/chat/completions", {"model": "sql", "messages": [{"role": "user", "content": "x"}]}, "sql"),
    ("/v1/chat/completions", {"model": "google/gemma-7b-it:sql", "messages": []}, "sql"),
    ("/v1/completions", {"model": "gemma-7b-it:bot", "prompt": "x"}, "bot"),
    ("/v1/completions", {"model": "bot", "prompt": "x"}, "bot"),
    (WAI_RUN, {"prompt": "x", "lora": "bot"}, "bot"),
    ("/v1/completions", {"model": "google/gemma-7b-it", "prompt": "mentions sql and bot"}, None),  # base model
    (WAI_RUN, {"prompt": "bot"}, None),
    ("/v1/completions", {"model": "gemma-7b-it:nope", "prompt": "x"}, None),  # no such adapter: the app says 404
])
def test_adapter_header_is_set_per_schema_and_the_body_replayed_byte_for_byte(path, body, adapter):
    middleware = AdapterRoutingMiddleware(None)
    middleware.known = frozenset({"sql", "bot"})
    raw = json.dumps(body).encode()
    chunks = [raw[:7], raw[7:20], raw[20:]]
    headers, messages, _ = _route_with(middleware, path, chunks)
    assert headers.get(MODEL_ID_HEADER) == (adapter.encode() if adapter else None)
    assert [m["body"] for m in messages] == chunks  # the same messages, in order, unchanged
    assert b"".join(m["body"] for m in messages) == raw


def _route_with(middleware, path, chunks, **kwargs):
    """Send ``chunks`` (the body, in pieces) through ``middleware`` to a recording app; returns (the app's
    scope headers, the body messages the app received, the response headers the client got)."""
    captured = {}

    async def app(scope, receive, send):
        captured["headers"] = dict(scope["headers"])
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if not message.get("more_body", False):
                break
        captured["messages"] = messages
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), *kwargs.pop("response_headers", ())]})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    middleware.app = app
    inbox = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return inbox.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": kwargs.pop("method", "POST"), "path": path, "headers": list(kwargs.pop("headers", ()))}
    asyncio.run(middleware(scope, receive, send))
    return captured["headers"], captured["messages"], dict(sent[0]["headers"])


def test_non_json_bodies_other_routes_and_unknown_adapters_pass_through_untouched():
    middleware = AdapterRoutingMiddleware(None)
    for chunks in ([b"not json {"], [b"[1, 2]"], [b"\xff\xfe"], [b""]):
        headers, messages, _ = _route_with(middleware, "/v1/chat/completions", chunks,
                                           headers=[(b"serve_multiplexed_model_id", b"spoofed")])
        assert MODEL_ID_HEADER not in headers and [m["body"] for m in messages] == chunks
    # a GET or another route is not read at all (the client's header is left alone there)
    headers, messages, _ = _route_with(middleware, "/v1/models", [b'{"model": "a:b"}'], method="GET",
                                       headers=[(b"x-other", b"1")])
    assert headers == {b"x-other": b"1"} and messages[0]["body"] == b'{"model": "a:b"}'
    # while the adapters are not known, only the unambiguous forms are routed
    assert _route_with(middleware, "/v1/completions", [b'{"model": "gemma-7b-it:sql"}'])[0][MODEL_ID_HEADER] == b"sql"
    assert MODEL_ID_HEADER not in _route_with(middleware, "/v1/completions", [b'{"model": "sql"}'])[0]
    assert _route_with(middleware, WAI_RUN, [b'{"lora": "sql", "prompt": "x"}'])[0][MODEL_ID_HEADER] == b"sql"


def test_the_replicas_adapter_list_is_learned_and_hidden_and_large_bodies_stream_through():
    middleware = AdapterRoutingMiddleware(None, max_body_bytes=64)
    _, _, client_headers = _route_with(middleware, "/v1/models", [b""], method="GET",
                                       response_headers=[(ADAPTERS_HEADER, b"sql,bot"), (b"x-toolkit-replica", b"r1")])
    assert ADAPTERS_HEADER not in client_headers and client_headers[b"x-toolkit-replica"] == b"r1"
    assert middleware.known == {"sql", "bot"}
    assert _route_with(middleware, "/v1/completions", [b'{"model": "sql"}'])[0][MODEL_ID_HEADER] == b"sql"
    big = json.dumps({"model": "sql", "prompt": "x" * 100}).encode()
    chunks = [big[:40], big[40:80], big[80:]]
    headers, messages, _ = _route_with(middleware, "/v1/completions", chunks)
    assert MODEL_ID_HEADER not in headers and [m["body"] for m in messages] == chunks
    # a redeploy without adapters: nothing is parsed or routed any more
    _route_with(middleware, "/health", [b""], method="GET", response_headers=[(ADAPTERS_HEADER, b"")])
    assert middleware.known == frozenset()
    assert MODEL_ID_HEADER not in _route_with(middleware, "/v1/completions", [b'{"model": "x:sql"}'])[0]
