"""A deterministic fake of the runtime Engine protocol, and a live uvicorn server for tests.

``FakeEngine`` answers each request from a :class:`Script` chosen by the request's *key* (the
last user message, or the prompt): scripted token pieces (``str`` or raw ``bytes``, decoded
with an incremental UTF-8 decoder like a real detokenizer), a per-token delay, and failures
before the first output or after k outputs. Without a script it answers a fixed sentence
(seeded requests get seed-dependent words; choice i > 0 gets a ``" #i"`` suffix). It honours
max_tokens, stop strings (with hold-back), n, logprobs and JSON constraints (it emits the
simplest instance of the schema), records every request and abort, and keeps running /
KV-cache counters that drop to zero when a request finishes or is aborted.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from toolkit.server.serve import HTTP_PROTOCOL
from toolkit.runtime.errors import EngineStoppedError, InvalidRequestError, PromptTooLongError
from toolkit.runtime.types import (
    ChoiceDelta,
    EngineStats,
    GenerateRequest,
    OutputStream,
    RequestOutput,
    TokenLogprob,
)

DEFAULT_PIECES = ["Hello", "!", " I", " am", " a", " fake", " model", "."]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


@dataclass
class Script:
    """How the fake answers requests with one key."""

    pieces: list[str | bytes] | None = None
    delay_s: float = 0.0
    fail_before: Exception | None = None
    fail_after: int | None = None
    failure: Exception | None = None


def schema_instance(schema: dict[str, Any]) -> Any:
    """The simplest JSON value valid against ``schema`` (const, enum, anyOf, basic types)."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return schema_instance(schema["anyOf"][0])
    kind = schema.get("type", "object")
    if kind == "object":
        props = schema.get("properties", {})
        required = schema.get("required", list(props))
        return {k: schema_instance(v) for k, v in props.items() if k in required}
    simple = {"string": "fake", "integer": 1, "number": 1.5, "boolean": True, "null": None}
    if kind == "array":
        return [schema_instance(schema.get("items", {"type": "string"}))]
    return simple.get(kind, "fake")


def split_pieces(text: str, size: int = 5) -> list[str]:
    """Cut ``text`` into pieces of ``size`` characters (fake tokens)."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


class _Choice:
    """One sequence: decodes pieces, applies stop strings with hold-back and max_tokens."""

    def __init__(self, index: int, pieces: list[str | bytes], request: GenerateRequest) -> None:
        self.index, self.pieces, self.params = index, pieces, request.params
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self.full, self.sent, self.pos, self.done = "", 0, 0, False

    def step(self) -> ChoiceDelta:
        piece = self.pieces[self.pos]
        self.pos += 1
        raw = piece if isinstance(piece, bytes) else piece.encode("utf-8")
        self.full += self.decoder.decode(raw)
        finish, end = self._finish()
        text, self.sent = self.full[self.sent:end], max(self.sent, end)
        self.done = finish is not None
        return ChoiceDelta(self.index, text, [1000 + self.pos], self._logprobs(raw), finish)

    def _finish(self) -> tuple[str | None, int]:
        hits = [i for i in (self.full.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            return "stop", min(hits)
        if self.pos >= self.params.max_tokens:
            return "length", len(self.full)
        if self.pos >= len(self.pieces):
            return "stop", len(self.full)
        return None, len(self.full) - self._held()

    def _held(self) -> int:
        for size in range(min(len(self.full), max((len(s) for s in self.params.stop), default=0)), 0, -1):
            if any(s.startswith(self.full[-size:]) for s in self.params.stop):
                return size
        return 0

    def _logprobs(self, raw: bytes) -> list[TokenLogprob] | None:
        if not self.params.logprobs:
            return None
        token = raw.decode("utf-8", errors="replace")
        top = [(2000 + k, f"alt{k}", -1.0 - k) for k in range(self.params.top_logprobs)]
        return [TokenLogprob(1000 + self.pos, token, -0.25, top)]


@dataclass
class Rendered:
    """A fake prompt decoded back: chat ``messages``, or a plain ``prompt`` (``raw``: without BOS)."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    raw: bool = False


class FakePrompts:
    """The fake's tokenizer: ids that count like words and give back the exact text.

    A chat is ``[BOS] + per message ([ROLE] + text ids + [SEP, SEP])``, a plain prompt is
    ``[BOS]`` (unless raw) ``+ text ids``, where a text of k words is its own id followed by
    k - 1 padding ids: so a message costs its word count + 3 tokens, and :meth:`key_of` can
    recover the last user message (or the prompt) from the ids alone.
    """

    BOS, SEP, PAD, ROLE = 1, 2, 3, {"system": 4, "user": 5, "assistant": 6}
    FIRST_TEXT_ID = 100_000
    vocab_size = 1 << 30
    eos_ids = frozenset({SEP})

    def __init__(self, recipe_fim: str = "") -> None:
        self._ids: dict[str, int] = {}
        self._texts: dict[int, str] = {}
        self.recipe_fim = recipe_fim

    def _text(self, text: str) -> list[int]:
        words = len(text.split())
        if not words:
            return []
        text_id = self._ids.setdefault(text, self.FIRST_TEXT_ID + len(self._ids))
        self._texts[text_id] = text
        return [text_id] + [self.PAD] * (words - 1)

    def encode(self, messages: list[dict[str, str]] | None = None, prompt: str | None = None,
               raw: bool = False) -> list[int]:
        if messages is not None:
            ids = [self.BOS]
            for m in messages:
                ids += [self.ROLE.get(m["role"], 7), *self._text(m["content"]), self.SEP, self.SEP]
            return ids
        ids = ([] if raw else [self.BOS]) + self._text(prompt or "")
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """FIM like the real builder: refused (naming ``suffix``) unless the recipe has a template."""
        if not self.recipe_fim:
            raise InvalidRequestError("suffix is not supported by this model", param="suffix")
        return self.encode(prompt=self.recipe_fim.replace("{prefix}", prefix).replace("{suffix}", suffix))

    def detokenize(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text ids back to their text (special ids as ``<id>``), like ``PromptBuilder.detokenize``."""
        return " ".join(self._texts.get(t, f"<{t}>") for t in ids if t != self.PAD)

    def check_ids(self, prompt_ids: list[int]) -> None:
        if not prompt_ids or min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise InvalidRequestError("prompt token ids must be non-empty ids in the vocabulary", param="prompt")

    def decode(self, prompt_ids: tuple[int, ...]) -> Rendered:
        """What :meth:`encode` was given: the chat messages, or the plain prompt and whether it was raw."""
        roles = {v: k for k, v in self.ROLE.items()}
        if len(prompt_ids) > 1 and prompt_ids[0] == self.BOS and prompt_ids[1] in roles:
            messages, i = [], 1
            while i < len(prompt_ids):
                role, i = roles.get(prompt_ids[i], "tool"), i + 1
                content = self._texts.get(prompt_ids[i], "") if prompt_ids[i] != self.SEP else ""
                while prompt_ids[i] != self.SEP:
                    i += 1
                messages.append({"role": role, "content": content})
                i += 2
            return Rendered(messages=messages)
        text = next((self._texts[t] for t in prompt_ids if t in self._texts), None)
        return Rendered(prompt=text, raw=bool(prompt_ids) and prompt_ids[0] != self.BOS)

    def key_of(self, prompt_ids: tuple[int, ...]) -> str:
        """The last user message of a chat, or the text of a plain prompt ("" for other ids)."""
        rendered = self.decode(prompt_ids)
        users = [m["content"] for m in rendered.messages or () if m["role"] == "user"]
        return users[-1] if users else (rendered.prompt or "")


@dataclass
class FakeEngine:
    """Engine protocol fake; see the module docstring."""

    recipe: Any
    context_length: int = 0
    kv_total: int = 100_000
    start_delay_s: float = 0.0
    start_error: Exception | None = None
    scripts: dict[str, Script] = field(default_factory=dict)
    requests: list[GenerateRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    started: bool = False
    stopped_with: float | None = None
    generated_total: int = 0
    prompts: FakePrompts = field(default_factory=FakePrompts)
    _running: dict[str, int] = field(default_factory=dict)
    _tasks: dict[str, asyncio.Task] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompts.recipe_fim = self.recipe.fim
        self.model_names = tuple(self.recipe.model_names)
        self.context_length = self.context_length or self.recipe.context_window

    # -- test helpers -------------------------------------------------------------------------
    def script(self, key: str, **kwargs: Any) -> Script:
        """Register how requests whose key is ``key`` are answered."""
        self.scripts[key] = Script(**kwargs)
        return self.scripts[key]

    def key_of(self, request: GenerateRequest) -> str:
        """The last user message, or the prompt."""
        return self.prompts.key_of(request.prompt_ids)

    def rendered(self, request: GenerateRequest) -> Rendered:
        """The messages or prompt the adapter encoded into ``request.prompt_ids``."""
        return self.prompts.decode(request.prompt_ids)

    def requests_for(self, key: str) -> list[GenerateRequest]:
        """Every request seen with this key, oldest first."""
        return [r for r in self.requests if self.key_of(r) == key]

    # -- Engine protocol ----------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.sleep(self.start_delay_s)
        if self.start_error is not None:
            raise self.start_error
        self.started = True

    async def stop(self, grace_s: float = 0.0) -> None:
        self.started = False
        self.stopped_with = grace_s

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._running.pop(request_id, None)
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running), waiting=0, kv_cache_used_tokens=sum(self._running.values()),
                           kv_cache_total_tokens=self.kv_total, generated_tokens_total=self.generated_total,
                           tokens_per_second=0.0)

    async def generate(self, request: GenerateRequest) -> OutputStream:
        """Like the real engines: validate (raising up front), then return the request's output stream."""
        if not self.started:
            raise EngineStoppedError("the fake engine is not started")
        self.requests.append(request)
        script = self.scripts.get(self.key_of(request), Script())
        if script.fail_before is not None:
            raise script.fail_before
        self.prompts.check_ids(request.prompt_ids)
        prompt_tokens = len(request.prompt_ids)
        if prompt_tokens + request.params.max_tokens > self.context_length:
            raise PromptTooLongError(prompt_tokens, request.params.max_tokens, self.context_length)
        self._running[request.request_id] = prompt_tokens
        queue: asyncio.Queue = asyncio.Queue()
        self._tasks[request.request_id] = asyncio.create_task(self._produce(request, script, prompt_tokens, queue))
        return OutputStream(queue, lambda: self.abort(request.request_id))

    async def _produce(self, request: GenerateRequest, script: Script, prompt_tokens: int, queue: asyncio.Queue) -> None:
        rid = request.request_id
        choices = [_Choice(i, self._pieces(script, request, i), request) for i in range(request.params.n)]
        completion, outputs = 0, 0
        try:
            while rid in self._running and not all(c.done for c in choices):
                if script.delay_s:
                    await asyncio.sleep(script.delay_s)
                if script.fail_after is not None and outputs >= script.fail_after:
                    queue.put_nowait(script.failure)
                    return
                if rid not in self._running:
                    return
                deltas = [c.step() for c in choices if not c.done]
                completion += len(deltas)
                self.generated_total += len(deltas)
                self._running[rid] += len(deltas)
                outputs += 1
                queue.put_nowait(RequestOutput(rid, deltas, prompt_tokens, completion, all(c.done for c in choices)))
        finally:
            self._running.pop(rid, None)
            self._tasks.pop(rid, None)

    def _pieces(self, script: Script, request: GenerateRequest, index: int) -> list[str | bytes]:
        params = request.params
        if script.pieces is not None:
            return list(script.pieces)
        if params.json_schema is not None:
            return split_pieces(json.dumps(schema_instance(params.json_schema)))
        if params.json_object:
            return split_pieces('{"answer": "fake"}')
        if params.seed is not None:
            rng = random.Random(params.seed * 10 + index)
            return [f" {rng.choice(WORDS)}" for _ in range(8)]
        return DEFAULT_PIECES + ([f" #{index}"] if index else [])


class LiveServer:
    """Run an ASGI app with uvicorn on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app: Any, wait_ready: bool = True) -> None:
        self.app, self.wait_ready = app, wait_ready
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=2,
                                http=HTTP_PROTOCOL)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        while self.wait_ready and httpx.get(f"{self.base_url}/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not become ready")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


class Served:
    """A live app over three fake engines: gemma-7b-it, default and codegemma-7b-it (64-token context)."""

    API_KEY = "test-key"

    def __init__(self, api_keys: tuple[str, ...] = (API_KEY,), **app_kwargs: Any) -> None:
        from toolkit.recipes import get_recipe
        from toolkit.server.app import create_app

        self.gemma = FakeEngine(get_recipe("gemma-7b-it"))
        self.default = FakeEngine(get_recipe("default"))
        self.small = FakeEngine(get_recipe("codegemma-7b-it"), context_length=64)
        engines = {"gemma-7b-it": self.gemma, "default": self.default, "codegemma-7b-it": self.small}
        self.app = create_app(engines, list(api_keys), **app_kwargs)
        self.live = LiveServer(self.app)
        self.base_url = self.live.base_url
        self.headers = {"Authorization": f"Bearer {api_keys[0]}"} if api_keys else {}

    def __enter__(self) -> "Served":
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        """POST with the API key."""
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return httpx.post(self.base_url + path, headers=headers, timeout=10, **kwargs)


def sse_data(body: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, asserting the reference framing (``\\n``, blank line)."""
    text = body.decode("utf-8")
    assert text.endswith("\n\n"), text[-50:]
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]
