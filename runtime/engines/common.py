"""Pieces both engines share: the per-request output stream and the tokens/s meter."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from toolkit.runtime.types import RequestOutput

RATE_WINDOW_S = 5.0


async def stream_outputs(queue: asyncio.Queue, abort: Callable[[], Awaitable[None]]) -> AsyncIterator[RequestOutput]:
    """Yield a request's outputs from ``queue`` until it finishes; an exception in the queue is raised.

    Leaving early (the consumer closed the iterator, or was cancelled) calls ``abort()``.
    """
    finished = False
    try:
        while not finished:
            item = await queue.get()
            if isinstance(item, BaseException):
                finished = True
                raise item
            finished = item.finished
            yield item
    finally:
        if not finished:
            await abort()


class ThroughputMeter:
    """Generated-token total and the rate over the last ``RATE_WINDOW_S`` seconds (thread-safe)."""

    def __init__(self) -> None:
        self.total = 0
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def record(self, tokens: int) -> None:
        """Count ``tokens`` generated now."""
        now = time.monotonic()
        with self._lock:
            self.total += tokens
            self._recent.append((now, tokens))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()

    def rate(self) -> float:
        """Tokens per second over the window."""
        now = time.monotonic()
        with self._lock:
            return sum(n for t, n in self._recent if now - t <= RATE_WINDOW_S) / RATE_WINDOW_S
