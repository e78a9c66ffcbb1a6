"""``toolkit bench URL``: a streaming HTTP load generator for any OpenAI-compatible (or Workers AI) server.

Each request streams; every content chunk is timestamped on arrival, so time to first token,
inter-token latency (per chunk: a chunk carrying several tokens counts as one gap) and end-to-end
latency come from the client's view. Output tokens come from the server's final usage
(``stream_options.include_usage``) when it sends one, else from the number of content chunks.

Modes: ``concurrency`` (N workers each sending requests back to back until ``requests_per_level``
are done) and ``rate`` (Poisson arrivals at ``rate`` req/s; the level caps the requests in flight,
0 = no cap). Per level the result is :class:`toolkit.bench.offline.LevelResult` as a dict plus
``errors`` (non-2xx, error events, streams cut short, exceptions), ``request_throughput`` and more.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from toolkit.bench.offline import FILLER, summarize

SCHEMAS = ("openai", "workers-ai")
MODES = ("concurrency", "rate")
ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}  # OpenAI schema only
_WORDS = FILLER.split()
_TAGS = itertools.count(1)  # unique prompt starts across every level of a process


@dataclass
class RequestRecord:
    """What one streamed request produced, as seen by the client."""

    start: float
    token_times: list[float] = field(default_factory=list)
    text: str = ""  # the streamed content, joined
    usage_tokens: int | None = None
    usage: dict[str, Any] | None = None  # the server's last usage object (token details: cached, accepted)
    status: int | None = None
    error: str | None = None
    done: bool = False

    @property
    def output_tokens(self) -> int:
        """The server's completion token count when it sent one, else the content chunk count."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.token_times)


@dataclass
class LoadSpec:
    """Everything that shapes the requests of a run (lengths are inclusive uniform ranges)."""

    url: str
    model: str
    schema: str = "openai"
    prompt_tokens: tuple[int, int] = (108, 108)
    max_tokens: tuple[int, int] = (128, 128)
    api_key: str | None = None
    ignore_eos: bool = False
    include_usage: bool = True
    extra_body: dict[str, Any] | None = None
    seed: int = 0
    route: str = "completions"  # OpenAI schema: "chat" posts to /v1/chat/completions (bodies with messages)


def prompt_text(n_tokens: int, tag: int | None = None) -> str:
    """Filler text of roughly ``n_tokens`` tokens (about one per word); ``tag`` makes the start unique
    so that servers with prefix reuse (llama.cpp) cannot skip the prefill of a repeated prompt."""
    head = [f"Request {tag}:"] if tag is not None else []
    words = list(itertools.islice(itertools.cycle(_WORDS), max(1, n_tokens - 3 * len(head))))
    return " ".join(head + words)


def endpoint(spec: LoadSpec) -> str:
    """The streaming endpoint for the spec's schema (and OpenAI route) under the base URL (a trailing
    ``/v1`` is allowed)."""
    base = spec.url.rstrip("/")
    if spec.schema == "workers-ai":
        return f"{base}/client/v4/accounts/bench/ai/run/{spec.model}"
    if spec.route not in ROUTES:
        raise ValueError(f"route must be one of {sorted(ROUTES)}, not {spec.route!r}")
    return base.removesuffix("/v1") + ROUTES[spec.route]


def request_body(spec: LoadSpec, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The JSON body of one streaming request in the spec's schema."""
    if spec.schema == "workers-ai":
        body: dict[str, Any] = {"prompt": prompt, "stream": True, "max_tokens": max_tokens}
    else:
        body = {"model": spec.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        if spec.include_usage:
            body["stream_options"] = {"include_usage": True}
    if spec.ignore_eos:  # honoured by this server's OpenAI API (vLLM's field); Workers AI has none
        body["ignore_eos"] = True
    return {**body, **(spec.extra_body or {})}


def parse_event(schema: str, data: str) -> tuple[str, int | None, str | None]:
    """One SSE ``data:`` payload → (content text, usage completion tokens or None, error or None)."""
    try:
        event = json.loads(data)
    except ValueError:
        return "", None, f"malformed event: {data[:80]!r}"
    if not isinstance(event, dict):
        return "", None, f"unexpected event: {data[:80]!r}"
    if event.get("error") or event.get("success") is False or event.get("errors"):
        return "", None, f"error event: {data[:200]}"
    usage = event.get("usage") or {}
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if schema == "workers-ai":
        text = event.get("response")
        return (text if isinstance(text, str) else ""), tokens, None
    text = ""
    for choice in event.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text, tokens, None


async def stream_request(client: httpx.AsyncClient, spec: LoadSpec, body: dict[str, Any],
                         disconnect_after: int | None = None) -> RequestRecord:
    """Send one streaming request and timestamp its chunks; never raises (failures go to ``error``).

    ``disconnect_after``: close the connection after that many content chunks (not an error).
    """
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    record = RequestRecord(start=time.perf_counter())
    try:
        async with client.stream("POST", endpoint(spec), json=body, headers=headers) as response:
            record.status = response.status_code
            if not response.is_success:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return record
            await _read_events(response, spec.schema, record, disconnect_after)
    except (httpx.HTTPError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    if record.error is None and not record.done:
        record.error = "stream ended without [DONE]"
    return record


async def _read_events(response: httpx.Response, schema: str, record: RequestRecord, disconnect_after: int | None) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            record.done = True
            return
        text, tokens, error = parse_event(schema, data)
        if error:
            record.error = error
            return
        if tokens is not None:
            record.usage_tokens = tokens
            record.usage = json.loads(data).get("usage")
        if text:
            record.token_times.append(time.perf_counter())
            record.text += text
            if disconnect_after is not None and len(record.token_times) >= disconnect_after:
                record.done = True  # a deliberate disconnect: leaving the block closes the connection
                return


class _Level:
    """Request factory and bookkeeping of one level."""

    def __init__(self, client: httpx.AsyncClient, spec: LoadSpec, rng: random.Random, on_done) -> None:
        self.client, self.spec, self.rng, self.on_done = client, spec, rng, on_done
        self.records: list[RequestRecord] = []

    async def issue(self) -> None:
        """Send one request with sampled lengths and record it."""
        n_prompt = self.rng.randint(*self.spec.prompt_tokens)
        n_out = self.rng.randint(*self.spec.max_tokens)
        body = request_body(self.spec, prompt_text(n_prompt, next(_TAGS)), n_out)
        record = await stream_request(self.client, self.spec, body)
        self.records.append(record)
        self.on_done(record)


async def _drive_concurrency(level: _Level, concurrency: int, n: int) -> None:
    remaining = iter(range(n))

    async def worker() -> None:
        for _ in remaining:
            await level.issue()

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))


async def _drive_rate(level: _Level, cap: int, n: int, rate: float) -> None:
    gate = asyncio.Semaphore(cap) if cap > 0 else None

    async def gated() -> None:
        if gate is None:
            return await level.issue()
        async with gate:
            await level.issue()

    tasks = []
    for i in range(n):
        if i:
            await asyncio.sleep(level.rng.expovariate(rate))
        tasks.append(asyncio.create_task(gated()))
    await asyncio.gather(*tasks)


def level_result(concurrency: int, wall_s: float, records: list[RequestRecord]) -> dict[str, Any]:
    """``summarize()`` of the successful requests, with usage-based token counts, errors and rates."""
    ok = [r for r in records if r.error is None]
    result = asdict(summarize(concurrency, wall_s, [r.start for r in ok], [r.token_times for r in ok]))
    tokens = sum(r.output_tokens for r in ok)
    result.update(
        output_tokens=tokens,
        output_tokens_per_s=tokens / wall_s if wall_s else 0.0,
        errors=len(records) - len(ok),
        request_throughput=len(ok) / wall_s if wall_s else 0.0,
        status_counts={str(k): v for k, v in sorted(Counter(r.status for r in records).items(), key=str)},
        error_samples=list(dict.fromkeys(r.error for r in records if r.error))[:3],
    )
    return result


async def run_http_bench(url: str, model: str, levels: list[int], mode: str = "concurrency",
                         rate: float | None = None, requests_per_level: int = 64, prompt_tokens: int = 108,
                         max_tokens: int = 128, api_key: str | None = None, schema: str = "openai",
                         progress: bool = True, *, prompt_tokens_high: int | None = None,
                         max_tokens_high: int | None = None, ignore_eos: bool = False, include_usage: bool = True,
                         extra_body: dict[str, Any] | None = None, warmup: int = 1, timeout_s: float = 300.0,
                         seed: int = 0) -> list[dict]:
    """Benchmark a server at each level; one result dict per level (see the module docstring).

    Lengths are fixed, or uniform in ``prompt_tokens..prompt_tokens_high`` / ``max_tokens..max_tokens_high``.
    ``ignore_eos`` sends ``"ignore_eos": true`` (vLLM-style, honoured by this server's OpenAI API; refused
    with the Workers AI schema, which has no such field);
    ``extra_body`` is merged into every request body; ``warmup`` requests run first, unmeasured.
    """
    if mode not in MODES or schema not in SCHEMAS:
        raise ValueError(f"mode must be one of {MODES} and schema one of {SCHEMAS}")
    if ignore_eos and schema == "workers-ai":
        raise ValueError("ignore_eos is an OpenAI-schema (vLLM) field; the Workers AI schema has none")
    if mode == "rate" and not (rate and rate > 0):
        raise ValueError("rate mode needs rate > 0 (requests per second)")
    spec = LoadSpec(url, model, schema, (prompt_tokens, max(prompt_tokens, prompt_tokens_high or 0)),
                    (max_tokens, max(max_tokens, max_tokens_high or 0)), api_key, ignore_eos, include_usage,
                    extra_body, seed)
    limits = httpx.Limits(max_connections=max([*levels, 1]) + 8, max_keepalive_connections=max([*levels, 1]) + 8)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if warmup:
            await _Level(client, spec, random.Random(seed), lambda r: None).issue()
        with _progress(progress) as bar:
            return [await _run_level(client, spec, bar, level, mode, rate, requests_per_level) for level in levels]


async def _run_level(client: httpx.AsyncClient, spec: LoadSpec, bar, level: int, mode: str, rate: float | None,
                     n: int) -> dict[str, Any]:
    label = f"{mode} {level}" + (f" @ {rate:g} req/s" if mode == "rate" else "")
    task = bar.add_task(label, total=n, errors=0) if bar else None
    errors = 0

    def on_done(record: RequestRecord) -> None:
        nonlocal errors
        errors += record.error is not None
        if bar:
            bar.update(task, advance=1, errors=errors)

    state = _Level(client, spec, random.Random(f"{spec.seed}-{level}"), on_done)
    started = time.perf_counter()
    if mode == "rate":
        await _drive_rate(state, level, n, rate)
    else:
        await _drive_concurrency(state, level, n)
    result = level_result(level, time.perf_counter() - started, state.records)
    result.update(mode=mode, request_rate=rate if mode == "rate" else None)
    return result


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(), console=Console(stderr=True))
