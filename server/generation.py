"""Drive one engine request for a handler: prime, stream or collect, and always clean up.

Whatever way a request ends early (client disconnect, an error, the response task cancelled,
the request timeout), :meth:`Generation.close` closes the engine's ``OutputStream``, shielded
from cancellation; the stream is the one place that turns an early close into
``engine.abort(request_id)``, so the engine frees the sequence's batch slot and KV cache.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
from toolkit.runtime.errors import PromptTooLongError
from toolkit.runtime.types import ChoiceDelta, GenerateRequest, OutputStream, RequestOutput
from toolkit.server.errors import ApiError, ClientDisconnected
from toolkit.server.metrics import Metrics
from toolkit.server.registry import ModelEntry

log = logging.getLogger(__name__)


class Generation:
    """One request to one engine, with metrics and guaranteed abort."""

    def __init__(self, entry: ModelEntry, request: GenerateRequest, metrics: Metrics | None,
                 zero_tokens: bool = False, timeout_s: float | None = None) -> None:
        """``zero_tokens``: the client asked for max_tokens 0; count the prompt, generate nothing.

        ``timeout_s``: the request (counted from its arrival) is aborted after this many seconds
        and fails with a ``timeout`` error; None means no limit.
        """
        self.entry = entry
        if entry.adapter is not None and request.adapter is None:  # the model name selected a LoRA adapter
            request = dataclasses.replace(request, adapter=entry.adapter)
        self.timeout_s = timeout_s
        self.deadline = request.arrival_time + timeout_s if timeout_s else None
        self.request = request
        self.metrics = metrics
        self.zero_tokens = zero_tokens
        self.finished = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens from the engine's prefix cache
        self.prediction_tokens = (0, 0)  # (accepted, rejected) tokens of the request's ``prediction``
        self._stream: OutputStream | None = None
        self._first: RequestOutput | None = None
        self._closed = False
        self._last_time: float | None = None
        # the metrics label: the base model, or BASE:ADAPTER for a LoRA adapter's requests
        self._model = f"{entry.parent or entry.names[0]}:{request.adapter}" if request.adapter else entry.names[0]
        if request.adapter:
            log.info("request %s: model %s with LoRA adapter %s", request.request_id, entry.parent or entry.names[0],
                     request.adapter)

    async def start(self) -> None:
        """Submit the request and get the first output, so up-front errors reach the handler."""
        try:
            if self.zero_tokens:
                self._stream = self._zero_output()
            else:
                self._stream = await self.entry.engine.generate(self.request)
            self._first = await self._next()
        except StopAsyncIteration:
            self._first = None
            self.finished = True
        except Exception:
            self.finished = True  # rejected or failed: the engine's stream has ended on its own
            await self.close()
            raise
        except BaseException:  # cancelled while queued: close (aborts)
            await self.close()
            raise
        if self._first is not None:
            self._observe(self._first)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Every output from the first on; on early exit the request is aborted."""
        if self._stream is None:
            await self.start()
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            while not self.finished:
                try:
                    output = await self._next()
                except StopAsyncIteration:
                    self.finished = True
                    break
                except Exception:
                    self.finished = True  # the engine ended the stream with an error
                    raise
                self._observe(output)
                yield output
        finally:
            await self.close()

    async def _next(self) -> RequestOutput:
        """The engine's next output; past the deadline the request is aborted and ``timeout`` raised."""
        if self.deadline is None:
            return await self._stream.__anext__()  # type: ignore[union-attr]
        with anyio.move_on_after(self.deadline - time.monotonic()):
            return await self._stream.__anext__()  # type: ignore[union-attr]
        log.warning("request %s: no result within the %g s request timeout, aborted",
                    self.request.request_id, self.timeout_s)
        await self.close()  # not finished: aborts the engine request and frees its KV cache
        raise ApiError("timeout", f"the request did not finish within the server's {self.timeout_s:g} s "
                       "request timeout and was aborted; lower max_tokens or retry later")

    async def collect(self, receive: Any) -> list[RequestOutput]:
        """All outputs of a non-streaming request; a client disconnect aborts it."""
        outputs: list[RequestOutput] = []
        disconnected = False
        error: Exception | None = None
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                nonlocal disconnected
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        disconnected = True
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watch)
            try:
                async for output in self.outputs():
                    outputs.append(output)
            except Exception as exc:  # noqa: BLE001 - re-raised below, not wrapped in an ExceptionGroup
                error = exc
            finally:
                group.cancel_scope.cancel()
        if error is not None:
            raise error
        if disconnected and not self.finished:
            log.info("request %s: client disconnected, aborted", self.request.request_id)
            raise ClientDisconnected()
        return outputs

    async def close(self) -> None:
        """Close the engine stream (which aborts an unfinished request); idempotent and safe under cancellation."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._stream is not None:
                try:
                    await self._stream.aclose()
                except Exception:  # noqa: BLE001 - cleanup must not raise
                    log.warning("aborting %s failed", self.request.request_id, exc_info=True)
            self._record_tokens()

    def _observe(self, output: RequestOutput) -> None:
        self.prompt_tokens = output.prompt_tokens
        self.completion_tokens = output.completion_tokens
        self.cached_tokens = output.cached_tokens
        self.prediction_tokens = (output.accepted_prediction_tokens, output.rejected_prediction_tokens)
        if output.finished:
            self.finished = True
        if self.metrics is None:
            return
        now = time.monotonic()
        new_tokens = sum(len(c.token_ids) for c in output.choices)
        if self._last_time is None:
            if new_tokens or any(c.text for c in output.choices):
                self.metrics.ttft.labels(self._model).observe(max(0.0, now - self.request.arrival_time))
                self._last_time = now
        elif new_tokens:
            self.metrics.itl.labels(self._model).observe((now - self._last_time) / new_tokens)
            self._last_time = now

    def _record_tokens(self) -> None:
        if self.metrics is None:
            return
        self.metrics.prompt_tokens.labels(self._model).inc(self.prompt_tokens)
        self.metrics.completion_tokens.labels(self._model).inc(self.completion_tokens)

    def _zero_output(self) -> OutputStream:
        """max_tokens 0: one finished output that counts the prompt (an over-long prompt is still refused)."""
        prompt_tokens = len(self.request.prompt_ids)
        limit = self.entry.context_length
        if limit and prompt_tokens > limit:
            raise PromptTooLongError(prompt_tokens, 0, limit)
        choices = [ChoiceDelta(index=i, text="", token_ids=[], finish_reason="length")
                   for i in range(self.request.params.n)]
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(RequestOutput(self.request.request_id, choices, prompt_tokens, 0, True))
        return OutputStream(queue, _nothing_to_abort)


async def _nothing_to_abort() -> None:
    """The zero-token answer never reached an engine."""
