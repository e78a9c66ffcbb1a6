"""A batched ``/v1/completions`` (a list of prompts): one engine request per prompt, run concurrently,
merged into one response with OpenAI's choice order (prompt i, choice j -> index ``i * n + j``).

:class:`BatchGeneration` has the interface of :class:`~toolkit.server.generation.Generation` that
``respond`` and the SSE writer use (``start``, ``outputs``, ``collect``, ``close``, the token counts),
so a batch streams and collects like one request. The usage is summed over the prompts; when any
prompt's request fails, the others are aborted and the request fails with that error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from toolkit.runtime.types import ChoiceDelta, RequestOutput
from toolkit.server.generation import Generation


class BatchGeneration:
    """Several :class:`Generation` objects (one per prompt, each with ``n`` choices) as one."""

    collect = Generation.collect  # the same disconnect-aware collection over :meth:`outputs`

    def __init__(self, parts: list[Generation], n: int) -> None:
        self.parts, self.n = parts, n
        self.request = parts[0].request
        self.finished = False

    @property
    def prompt_tokens(self) -> int:
        return sum(p.prompt_tokens for p in self.parts)

    @property
    def completion_tokens(self) -> int:
        return sum(p.completion_tokens for p in self.parts)

    @property
    def cached_tokens(self) -> int:
        return sum(p.cached_tokens for p in self.parts)

    async def start(self) -> None:
        """Submit every prompt's request; if any is refused, the others are aborted and its error raised."""
        results = await asyncio.gather(*(p.start() for p in self.parts), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise errors[0]

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The merged outputs, re-indexed, in arrival order; on error or early exit every request is aborted."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, part: Generation) -> None:
            try:
                async for output in part.outputs():
                    queue.put_nowait((i, output))
                queue.put_nowait((i, None))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, exc))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(self.parts)]
        open_parts = len(self.parts)
        try:
            while open_parts:
                i, item = await queue.get()
                if item is None:
                    open_parts -= 1
                    continue
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                yield self._merge(i, item, finished=open_parts == 1 and item.finished)
            self.finished = True
        finally:
            for task in tasks:
                task.cancel()
            await self.close()

    def _merge(self, i: int, output: RequestOutput, finished: bool) -> RequestOutput:
        choices = [ChoiceDelta(i * self.n + c.index, c.text, c.token_ids, c.logprobs, c.finish_reason)
                   for c in output.choices]
        return RequestOutput(self.request.request_id, choices, self.prompt_tokens, self.completion_tokens, finished,
                             self.cached_tokens)

    async def close(self) -> None:
        """Close (and so abort, where unfinished) every prompt's request."""
        await asyncio.gather(*(p.close() for p in self.parts), return_exceptions=True)
