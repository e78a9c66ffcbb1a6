"""What goes into and comes out of an engine: ``GenerateRequest``, ``RequestOutput`` and live ``EngineStats``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from toolkit.runtime.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    """One generation request. Exactly one of ``messages`` / ``prompt`` / ``prompt_ids`` is set.

    messages: chat messages, rendered with the recipe's chat format by the engine;
    prompt: plain text (the recipe's BOS is added unless ``raw``);
    prompt_ids: token ids, used as given.
    """

    params: SamplingParams = field(default_factory=SamplingParams)
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    raw: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class TokenLogprob:
    """Log probability of one generated token and its most likely alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)
    token_bytes: bytes | None = None
    """Raw bytes of the token (a byte-fallback piece of a split UTF-8 character is one raw byte)."""
    top_bytes: list[bytes] | None = None


@dataclass
class ChoiceDelta:
    """New output of one choice (``index`` in 0..n-1) since the previous ``RequestOutput``.

    finish_reason: None while running, else "stop" (EOS or stop string), "length" or "abort".
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """One streamed update of a request: the deltas of the choices that advanced, plus token counts."""

    request_id: str
    choices: list[ChoiceDelta]
    prompt_tokens: int
    completion_tokens: int
    finished: bool


@dataclass
class EngineStats:
    """Live numbers for /metrics."""

    running: int
    waiting: int
    kv_cache_used_tokens: int
    kv_cache_total_tokens: int
    generated_tokens_total: int
    tokens_per_second: float

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache_used_tokens / self.kv_cache_total_tokens if self.kv_cache_total_tokens else 0.0


class Engine(Protocol):
    """The runtime's engine protocol (ONNX Runtime or TensorRT-LLM behind it).

    ``await engine.generate(request)`` validates and queues the request — raising a
    ``toolkit.runtime.errors`` subclass when it is invalid, too long or the queue is full — and
    returns the async iterator of its outputs; a model failure mid-way ends that iterator with
    ``EngineFailureError``. Closing the iterator early aborts the request.
    """

    model_names: tuple[str, ...]
    context_length: int

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def start(self) -> None: ...

    async def stop(self, grace_s: float = 0.0) -> None: ...

    def stats(self) -> EngineStats: ...

    def count_tokens(self, request: GenerateRequest) -> int: ...
