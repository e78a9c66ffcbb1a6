"""The engine boundary: ``GenerateRequest`` in, an ``OutputStream`` of ``RequestOutput`` out, live ``EngineStats``, the ``Engine`` protocol."""

from __future__ import annotations

import time
import uuid
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from toolkit.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from toolkit.recipes import Recipe
    from toolkit.runtime.prompting import PromptBuilder


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request, built once by the caller (an API adapter, the bench, the CLI).

    The prompt arrives already rendered and tokenized (``PromptBuilder.encode``): engines take
    ids and never re-render, so the serving layer tokenizes each request exactly once (as vLLM's
    serving layer does) and can derive ``max_tokens`` from the prompt length before submitting.
    ``arrival_time`` (``time.monotonic()``) is when the request reached the server: it orders
    the engine's queue (first come, first served) and starts the time-to-first-token clock.
    """

    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival_time: float = field(default_factory=time.monotonic)
    adapter: str | None = None
    """The LoRA adapter to apply (its name in the engine's ``adapter_names``), or None for the base model."""
    prediction_ids: tuple[int, ...] | None = None
    """OpenAI's ``prediction`` (Predicted Outputs), tokenized: drafts for speculative decoding (``runtime/speculative.py``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_ids, tuple):
            object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))


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
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (OpenAI's ``prompt_tokens_details.cached_tokens``)."""
    accepted_prediction_tokens: int = 0
    """Tokens of the request's ``prediction`` that the output kept (``completion_tokens_details``)."""
    rejected_prediction_tokens: int = 0
    """Tokens of the request's ``prediction`` that were verified and discarded (``completion_tokens_details``)."""


@dataclass
class StepTimings:
    """Cumulative engine-loop time, for the offline bench's overhead figure (seconds, since start).

    ``model_s`` is time inside the model; ``step_s`` + ``schedule_s`` is the whole loop, so
    ``(step_s + schedule_s - model_s)`` is what the engine spends around the model.
    """

    steps: int = 0
    schedule_s: float = 0.0
    step_s: float = 0.0
    model_s: float = 0.0


@dataclass
class EngineStats:
    """Live numbers for /metrics and the bench.

    step_timings: the engine loop's cumulative timings, or None where the loop is not ours
    (TensorRT-LLM batches inside its own executor).
    """

    running: int
    waiting: int
    kv_cache_used_tokens: int
    kv_cache_total_tokens: int
    generated_tokens_total: int
    tokens_per_second: float
    step_timings: StepTimings | None = None
    kv_cache_cached_tokens: int = 0
    """Tokens held by the prefix cache: counted against the budget apart from ``kv_cache_used_tokens``."""
    memory: dict[str, int] = field(default_factory=dict)
    """Bytes by part, where the engine knows them: ``kv_budget``, ``kv_decode`` (the decode batch's
    buffers), ``kv_prefill`` (prompts being prefilled), ``prefix_cache``, ``weights`` (model files)."""

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache_used_tokens / self.kv_cache_total_tokens if self.kv_cache_total_tokens else 0.0


class OutputStream:
    """One request's outputs, read from the queue the engine fills; closing it early aborts the request.

    This is the one place where leaving a request early (a client disconnect, a timeout, an
    error in the consumer) turns into ``engine.abort``: every consumer closes the stream
    (``aclose()`` or ``async with``) and the stream knows whether the request already finished.
    An exception put in the queue ends the stream by being raised to the consumer.
    """

    def __init__(self, queue: asyncio.Queue, abort: Callable[[], Awaitable[None]]) -> None:
        self._queue = queue
        self._abort = abort
        self.finished = False

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    async def aclose(self) -> None:
        """Abort the request unless it already finished (idempotent)."""
        if not self.finished:
            self.finished = True
            await self._abort()

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@runtime_checkable
class Engine(Protocol):
    """The runtime's engine protocol (ONNX Runtime or TensorRT-LLM behind it): the server and the bench use only this.

    ``await engine.generate(request)`` validates and queues the request — raising a
    ``toolkit.runtime.errors`` subclass when it is invalid, too long or the queue is full — and
    returns its :class:`OutputStream`; a model failure mid-way ends that stream with
    ``EngineFailureError``. Closing the stream early aborts the request.

    ``prompts`` (the recipe's chat format over the engine directory's tokenizer) is available
    once ``start()`` returned; callers build ``GenerateRequest.prompt_ids`` with it.
    """

    recipe: Recipe
    model_names: tuple[str, ...]
    context_length: int

    @property
    def prompts(self) -> PromptBuilder: ...

    async def generate(self, request: GenerateRequest) -> OutputStream: ...

    async def abort(self, request_id: str) -> None: ...

    async def start(self) -> None: ...

    async def stop(self, grace_s: float = 0.0) -> None: ...

    def stats(self) -> EngineStats: ...
