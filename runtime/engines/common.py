"""The tokens/s meter both engines share (the per-request output stream is ``runtime.types.OutputStream``)."""

from __future__ import annotations

import threading
import time
from collections import deque

RATE_WINDOW_S = 5.0


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
