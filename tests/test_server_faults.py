"""Faults with a REAL tiny OnnxEngine behind the live server: a failing engine step, the server-side
request timeout, and a graceful SIGTERM drain of ``toolkit serve``.

The tiny random model ends most replies within a few dozen tokens, so the long requests here use
JSON mode (``response_format: json_object``), under which it keeps generating up to max_tokens.
Faults are injected through ``OnnxEngine.fault_hook`` (called at the start of every engine step,
in the engine thread): raising fails the requests of that step; sleeping slows every step.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from fake_engine import LiveServer, sse_data, wait_until
from toolkit.recipes import get_recipe
from toolkit.runtime import load_engine
from toolkit.server.app import create_app

KEY = "fault-test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
MODEL = "google/gemma-7b-it"
CHAT = "/v1/chat/completions"
RUN = "/client/v4/accounts/acct/ai/run/@hf/google/gemma-7b-it"
#: A JSON schema that needs well over 100 tokens: requests constrained by it run to max_tokens.
LONG_SCHEMA = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}, "minItems": 100}},
               "required": ["a"]}
LONG = {"response_format": {"type": "json_schema", "json_schema": {"name": "long", "schema": LONG_SCHEMA}},
        "temperature": 1.0, "seed": 7, "max_tokens": 300}


@pytest.fixture(scope="module")
def engine_dir(tiny_engine):
    return tiny_engine(get_recipe("gemma-7b-it"), "fp32")


@pytest.fixture(scope="module")
def live(engine_dir):
    engine = load_engine(engine_dir)
    app = create_app({"gemma-7b-it": engine}, [KEY])
    with LiveServer(app) as server:
        server.engine = engine
        server.ctx = app.state.ctx
        yield server


@pytest.fixture(scope="module")
def long_plain_prompt(live):
    """A Workers AI streaming request (no JSON mode there) that deterministically runs >= 20 tokens."""
    for seed in range(1, 40):
        body = {"prompt": "tell me a long story", "seed": seed, "temperature": 1.0, "max_tokens": 300}
        usage = post(live, RUN, body).json()["result"]["usage"]
        if usage["completion_tokens"] >= 20:
            return body
    pytest.fail("no seed gave a long enough reply")


@pytest.fixture(autouse=True)
def no_hook_left(request):
    yield
    if "live" in request.fixturenames:
        live = request.getfixturevalue("live")
        live.engine.fault_hook = None
        live.ctx.request_timeout_s = 600.0


def post(live: LiveServer, path: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(live.base_url + path, json=body, headers=HEADERS, timeout=timeout)


def chat(text: str = "hi", **extra: Any) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def assert_idle(engine) -> None:
    assert wait_until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0
                      and engine.stats().kv_cache_used_tokens == 0, timeout=10), engine.stats()


def assert_serves_normally(live: LiveServer) -> None:
    r = post(live, CHAT, chat("and now?", max_tokens=8))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
    r = post(live, RUN, {"prompt": "and now?", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["success"] is True, r.text


class OneFault:
    """A fault hook that raises once: on the first step (or first decode-only step), optionally after
    waiting (up to 10 s) until ``wait_for()`` is true; then it removes itself."""

    def __init__(self, engine, decode_only: bool = False, wait_for=None) -> None:
        self.engine, self.decode_only, self.wait_for = engine, decode_only, wait_for
        self.waiting = threading.Event()
        self.fired = threading.Event()

    def __call__(self, plan) -> None:
        if self.fired.is_set() or (self.decode_only and (plan.prefill or not plan.decode)):
            return
        self.waiting.set()
        deadline = time.monotonic() + 10
        while self.wait_for is not None and not self.wait_for() and time.monotonic() < deadline:
            time.sleep(0.002)
        self.fired.set()
        self.engine.fault_hook = None
        raise RuntimeError("injected fault")


# --- (a) an engine step that raises -------------------------------------------------------------------


def test_failed_step_fails_only_its_batch_and_the_server_keeps_serving(live):
    """A streams; its next decode step waits for B to be queued, then raises: A gets an error event,
    B (submitted but not in that step) succeeds, nothing leaks, the next requests succeed."""
    engine = live.engine
    hook = OneFault(engine, decode_only=True, wait_for=lambda: engine.stats().waiting > 0)
    engine.fault_hook = hook
    result: dict[str, Any] = {}

    def stream_a() -> None:
        result["a"] = post(live, CHAT, chat("request A", stream=True, **LONG))

    thread = threading.Thread(target=stream_a)
    thread.start()
    assert hook.waiting.wait(10), "A never reached a decode step"
    b = post(live, RUN, {"prompt": "request B", "max_tokens": 16})
    thread.join(30)
    assert hook.fired.is_set()

    events = sse_data(result["a"].content)
    assert result["a"].status_code == 200 and "[DONE]" not in events
    error = json.loads(events[-1])
    assert error == {"error": {"message": "model step failed: RuntimeError: injected fault", "type": "server_error",
                               "param": None, "code": None}}
    assert any(json.loads(e).get("choices") for e in events[:-1]), "A failed before streaming anything"
    assert "Traceback" not in result["a"].text

    assert b.status_code == 200 and b.json()["success"] is True, b.text
    assert_idle(engine)
    assert_serves_normally(live)


@pytest.mark.parametrize("when", ["first-step", "mid-generation"])
@pytest.mark.parametrize("api,stream", [("openai", False), ("openai", True), ("workers_ai", False),
                                        ("workers_ai", True)])
def test_failed_step_is_a_clean_error_in_each_schema(live, long_plain_prompt, api, stream, when):
    """The failing step is the request's first (nothing sent yet: an error response) or a later decode
    step (a stream already started: an error event, no [DONE]; non-streaming: an error response)."""
    engine = live.engine
    engine.fault_hook = OneFault(engine, decode_only=when == "mid-generation")
    if api == "openai":
        r = post(live, CHAT, chat("fail me", stream=stream, **LONG))
    elif stream:  # JSON mode cannot stream on Workers AI: a seed known to give a long reply
        r = post(live, RUN, {**long_plain_prompt, "stream": True})
    else:
        r = post(live, RUN, {"prompt": "fail me", "max_tokens": 300, "seed": 7,
                             "response_format": {"type": "json_schema", "json_schema": LONG_SCHEMA}})
    assert engine.fault_hook is None, "the fault did not fire"
    assert "Traceback" not in r.text and ".py" not in r.text
    message = "model step failed: RuntimeError: injected fault"
    openai_error = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    workers_error = {"result": {}, "success": False, "messages": [], "errors": [{"message": message, "code": 3043}]}
    expected = openai_error if api == "openai" else workers_error
    if stream and when == "mid-generation":
        events = sse_data(r.content)
        assert r.status_code == 200 and "[DONE]" not in events and len(events) >= 2
        assert json.loads(events[-1]) == expected
    else:
        assert r.status_code == 500 and r.json() == expected
    assert_idle(engine)
    assert_serves_normally(live)


# --- (b) the server-side request timeout ------------------------------------------------------------


def slow_steps(seconds: float):
    def hook(plan) -> None:
        time.sleep(seconds)
    return hook


@pytest.mark.parametrize("api,stream", [("openai", False), ("openai", True), ("workers_ai", False),
                                        ("workers_ai", True)])
def test_request_timeout_aborts_the_request_and_frees_its_cache(live, long_plain_prompt, api, stream):
    engine = live.engine
    live.ctx.request_timeout_s = 0.5
    engine.fault_hook = slow_steps(0.05)  # 300 tokens would take 15 s (and >= 20 tokens >= 1 s)
    started = time.monotonic()
    if api == "openai":
        r = post(live, CHAT, chat("too slow", stream=stream, **LONG))
    elif stream:
        r = post(live, RUN, {**long_plain_prompt, "stream": True})
    else:
        r = post(live, RUN, {"prompt": "too slow", "max_tokens": 300, "seed": 7,
                             "response_format": {"type": "json_schema", "json_schema": LONG_SCHEMA}})
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    message = "the request did not finish within the server's 0.5 s request timeout and was aborted; " \
              "lower max_tokens or retry later"
    if stream:
        assert r.status_code == 200
        events = sse_data(r.content)
        assert "[DONE]" not in events
        last = json.loads(events[-1])
        if api == "openai":
            assert last == {"error": {"message": message, "type": "timeout", "param": None,
                                      "code": "request_timeout"}}
        else:
            assert last == {"result": {}, "success": False, "messages": [],
                            "errors": [{"message": message, "code": 3007}]}
    elif api == "openai":
        assert r.status_code == 408
        assert r.json() == {"error": {"message": message, "type": "timeout", "param": None,
                                      "code": "request_timeout"}}
    else:
        assert r.status_code == 408
        assert r.json() == {"result": {}, "success": False, "messages": [], "errors": [{"message": message,
                                                                                          "code": 3007}]}
    # aborted in the engine: without the abort it would run for ~15 s more
    assert_idle(engine)
    assert time.monotonic() - started < 5
    engine.fault_hook = None
    live.ctx.request_timeout_s = 600.0
    assert_serves_normally(live)


def test_request_timeout_default_is_generous_and_configurable():
    import inspect

    default = inspect.signature(create_app).parameters["request_timeout_s"].default
    assert default >= 300


# --- (c) SIGTERM drains gracefully --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_drains_in_flight_streams_and_exits_zero(engine_dir, tmp_path):
    port, grace = free_port(), 5
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from toolkit.cli import main; main()", "serve", str(engine_dir),
             "--port", str(port), "--grace", str(grace)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)

        streams: dict[int, list[str]] = {}
        started = threading.Barrier(4)

        def stream(i: int) -> None:
            body = chat(f"stream {i}", stream=True, n=4, max_tokens=480, ignore_eos=True, temperature=1.0, seed=i)
            events: list[str] = []
            try:
                with httpx.stream("POST", base + CHAT, json=body, timeout=30) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            if not events:
                                started.wait(10)
                            events.append(line[len("data: "):])
            except httpx.HTTPError as exc:  # recorded: a cut stream fails the assertions below
                events.append(f"<{type(exc).__name__}>")
            streams[i] = events

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        started.wait(30)  # every stream has its first event: all three are in flight
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        refused_after = None
        while time.monotonic() - sigterm_at < grace:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                refused_after = time.monotonic() - sigterm_at
                break
            time.sleep(0.01)
        assert refused_after is not None, "new connections were still accepted after SIGTERM"

        returncode = proc.wait(timeout=grace + 10)
        exited_after = time.monotonic() - sigterm_at
        for thread in threads:
            thread.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert returncode == 0, output[-3000:]
    assert exited_after <= grace + 2, exited_after
    assert sorted(streams) == [0, 1, 2]
    for i, events in streams.items():
        assert events, f"stream {i} got nothing"
        # completed ([DONE]) or ended cleanly with an error event in the OpenAI schema
        assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), (i, events[-3:])
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/health", timeout=2)
    print(f"\nSIGTERM: new connections refused after {refused_after:.3f} s, exit 0 after {exited_after:.2f} s "
          f"(grace {grace} s); streams: " + ", ".join(f"{len(e)} events, last {e[-1][:12]!r}" for e in streams.values()))
