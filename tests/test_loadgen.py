"""The HTTP load generator against a tiny in-process fake SSE server with known chunk counts and delays."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
import uvicorn

from toolkit.bench.loadgen import LoadSpec, endpoint, parse_event, prompt_text, request_body, run_http_bench, stream_request


class FakeServer:
    """A raw ASGI app speaking just enough OpenAI / Workers AI streaming.

    Every request streams ``chunks`` content events (first after ``first_delay`` s, then every
    ``gap`` s) and reports ``tokens_per_chunk * chunks`` completion tokens in its usage. Request
    number k (1-based) gets a 500 when ``k % fail_every == 0`` and an error event halfway through
    its stream (and no ``[DONE]``) when ``k % error_every == 0``.
    """

    def __init__(self, chunks=6, first_delay=0.08, gap=0.02, tokens_per_chunk=2, fail_every=0, error_every=0):
        self.chunks, self.first_delay, self.gap, self.tokens_per_chunk = chunks, first_delay, gap, tokens_per_chunk
        self.fail_every, self.error_every = fail_every, error_every
        self.count = self.in_flight = self.peak = 0
        self.bodies: list[dict] = []
        self.paths: list[str] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.count += 1
        number = self.count
        self.bodies.append(json.loads(body))
        self.paths.append(scope["path"])
        if self.fail_every and number % self.fail_every == 0:
            await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "boom"}}'})
            return
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self._stream(scope["path"].startswith("/client/v4/"), self.bodies[-1], number, send)
        finally:
            self.in_flight -= 1

    async def _stream(self, workers_ai, body, number, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})

        async def event(payload):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True})

        await asyncio.sleep(self.first_delay)
        for i in range(self.chunks):
            if i:
                await asyncio.sleep(self.gap)
            if self.error_every and number % self.error_every == 0 and i == self.chunks // 2:
                await event({"error": {"message": "engine step failed", "type": "server_error"}})
                await send({"type": "http.response.body", "body": b""})
                return
            await event({"response": f"t{i} "} if workers_ai else {"choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]})
        usage = {"prompt_tokens": 10, "completion_tokens": self.chunks * self.tokens_per_chunk}
        if workers_ai:
            await event({"response": "", "usage": usage})
        else:
            await event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                await event({"choices": [], "usage": usage})
        await event(b"[DONE]")
        await send({"type": "http.response.body", "body": b""})


def serve_fake(fake: FakeServer, client_coro):
    """Run ``client_coro(base_url)`` against ``fake`` served by uvicorn on a free 127.0.0.1 port."""

    async def main():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(fake, log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            return await client_coro(f"http://127.0.0.1:{port}")
        finally:
            server.should_exit = True
            await task

    return asyncio.run(main())


def bench(fake, levels, **kwargs):
    kwargs = {"requests_per_level": 8, "progress": False, "warmup": 0, **kwargs}
    return serve_fake(fake, lambda url: run_http_bench(url, "fake-model", levels, **kwargs))


def test_openai_tokens_latency_and_concurrency():
    fake = FakeServer(chunks=6, first_delay=0.08, gap=0.02, tokens_per_chunk=2)
    results = bench(fake, [1, 4], max_tokens=16, prompt_tokens=40)
    assert [r["concurrency"] for r in results] == [1, 4]
    for r in results:
        assert (r["requests"], r["errors"]) == (8, 0)
        assert r["output_tokens"] == 8 * 12  # the server's usage, not the 6 chunks
        assert 70 <= r["ttft_ms_p50"] <= 600
        assert 15 <= r["itl_ms_p50"] <= 200
        assert 0.17 <= r["e2e_s_p50"] <= 1.5
        assert r["status_counts"] == {"200": 8}
        assert r["request_throughput"] == pytest.approx(8 / r["wall_s"])
    assert results[1]["output_tokens_per_s"] > 2 * results[0]["output_tokens_per_s"]
    assert fake.peak == 4 and fake.count == 16
    assert set(fake.paths) == {"/v1/completions"}
    body = fake.bodies[0]
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 16
    assert body["model"] == "fake-model" and body["stream_options"] == {"include_usage": True}
    assert "ignore_eos" not in body
    assert 30 <= len(body["prompt"].split()) <= 45
    assert len({b["prompt"] for b in fake.bodies}) == 16  # unique starts: no prefix reuse across requests


def test_chunk_count_without_usage_and_optional_fields():
    fake = FakeServer(chunks=5, first_delay=0.01, gap=0.005)
    results = bench(fake, [2], include_usage=False, ignore_eos=True, extra_body={"logit_bias": {"1": -100}},
                    prompt_tokens=20, prompt_tokens_high=60, max_tokens=8, max_tokens_high=32)
    assert results[0]["output_tokens"] == 8 * 5 and results[0]["errors"] == 0
    assert all("stream_options" not in b and b["ignore_eos"] is True and b["logit_bias"] == {"1": -100} for b in fake.bodies)
    assert all(8 <= b["max_tokens"] <= 32 for b in fake.bodies)
    assert len({b["max_tokens"] for b in fake.bodies}) > 1


def test_http_errors_and_error_events_are_counted():
    fake = FakeServer(chunks=4, first_delay=0.01, gap=0.005, fail_every=3)
    result = bench(fake, [2], requests_per_level=9)[0]
    assert (result["requests"], result["errors"]) == (6, 3)
    assert result["status_counts"] == {"200": 6, "500": 3}
    assert result["output_tokens"] == 6 * 8
    assert any("HTTP 500" in e for e in result["error_samples"])

    fake = FakeServer(chunks=4, first_delay=0.01, gap=0.005, error_every=4)
    result = bench(fake, [2], requests_per_level=8)[0]
    assert (result["requests"], result["errors"]) == (6, 2)
    assert any("error event" in e for e in result["error_samples"])


def test_unreachable_server_counts_exceptions():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = asyncio.run(run_http_bench(f"http://127.0.0.1:{port}", "m", [2], requests_per_level=4,
                                         progress=False, warmup=0, timeout_s=5))
    assert (results[0]["requests"], results[0]["errors"], results[0]["output_tokens"]) == (0, 4, 0)


def test_workers_ai_stream():
    fake = FakeServer(chunks=5, first_delay=0.01, gap=0.005, tokens_per_chunk=3)
    spec = LoadSpec("http://unused", "@cf/google/gemma-3-270m", schema="workers-ai", api_key="secret")

    async def one(url):
        spec.url = url
        async with httpx.AsyncClient() as client:
            return await stream_request(client, spec, request_body(spec, "hello", 20))

    record = serve_fake(fake, one)
    assert record.error is None and record.done and record.status == 200
    assert len(record.token_times) == 5  # the final {"response": "", "usage"} event is not a chunk
    assert record.usage_tokens == 15 == record.output_tokens
    assert fake.paths == ["/client/v4/accounts/bench/ai/run/@cf/google/gemma-3-270m"]
    assert fake.bodies == [{"prompt": "hello", "stream": True, "max_tokens": 20}]

    results = bench(FakeServer(chunks=5, first_delay=0.01, gap=0.005), [2], schema="workers-ai", requests_per_level=4)
    assert (results[0]["requests"], results[0]["errors"], results[0]["output_tokens"]) == (4, 0, 4 * 10)


def test_disconnect_after_chunks():
    fake = FakeServer(chunks=6, first_delay=0.01, gap=0.01)
    spec = LoadSpec("http://unused", "m")

    async def one(url):
        spec.url = url
        async with httpx.AsyncClient() as client:
            return await stream_request(client, spec, request_body(spec, "hi", 6), disconnect_after=2)

    record = serve_fake(fake, one)
    assert record.error is None and len(record.token_times) == 2


def test_rate_mode():
    fake = FakeServer(chunks=3, first_delay=0.01, gap=0.005)
    results = bench(fake, [0, 2], mode="rate", rate=50.0, requests_per_level=10)
    assert [(r["requests"], r["errors"], r["mode"], r["request_rate"]) for r in results] == [(10, 0, "rate", 50.0)] * 2
    assert fake.peak <= 10
    with pytest.raises(ValueError):
        asyncio.run(run_http_bench("http://127.0.0.1:1", "m", [1], mode="rate", rate=None, progress=False))


@pytest.mark.parametrize("schema, data, expected", [
    ("openai", '{"choices": [{"index": 0, "text": "Hi"}]}', ("Hi", None, None)),
    ("openai", '{"choices": [{"index": 0, "delta": {"content": "Yo"}}]}', ("Yo", None, None)),
    ("openai", '{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}', ("", 7, None)),
    ("openai", '{"choices": [{"index": 0, "text": "x"}], "usage": null}', ("x", None, None)),
    ("workers-ai", '{"response": "ab"}', ("ab", None, None)),
    ("workers-ai", '{"response": "", "usage": {"completion_tokens": 4}}', ("", 4, None)),
    ("workers-ai", '{"response": "", "tool_calls": []}', ("", None, None)),
])
def test_parse_event(schema, data, expected):
    assert parse_event(schema, data) == expected


@pytest.mark.parametrize("schema, data", [
    ("openai", '{"error": {"message": "boom"}}'),
    ("workers-ai", '{"result": {}, "success": false, "errors": [{"message": "x", "code": 3043}], "messages": []}'),
    ("openai", "not json"),
    ("openai", "[1, 2]"),
])
def test_parse_error_events(schema, data):
    assert parse_event(schema, data)[2]


def test_prompt_text_length():
    assert len(prompt_text(100).split()) == 100
    assert 95 <= len(prompt_text(100, tag=7).split()) <= 100 and prompt_text(5, tag=7).startswith("Request 7:")


def test_chat_route_and_usage_details():
    """The chat route posts to /v1/chat/completions; the record keeps the whole usage object (the
    editing workload reads accepted / rejected prediction tokens from it)."""
    fake = FakeServer(chunks=4, first_delay=0.01, gap=0.005, tokens_per_chunk=3)
    spec = LoadSpec("http://unused/v1", "m", route="chat")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}, "prediction": {"type": "content", "content": "hi"}}

    async def one(url):
        spec.url = url + "/v1"
        async with httpx.AsyncClient() as client:
            return await stream_request(client, spec, body)

    record = serve_fake(fake, one)
    assert record.error is None and len(record.token_times) == 4 and record.text == "t0 t1 t2 t3 "
    assert fake.paths == ["/v1/chat/completions"] and fake.bodies == [body]
    assert record.usage == {"prompt_tokens": 10, "completion_tokens": 12} and record.output_tokens == 12
    with pytest.raises(ValueError, match="route"):
        endpoint(LoadSpec("http://x", "m", route="embeddings"))
