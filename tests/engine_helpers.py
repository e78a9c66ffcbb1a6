"""Helpers for tests that drive a real engine directly (no HTTP)."""

from __future__ import annotations

import asyncio


async def until_idle(engine, timeout: float = 10.0):
    """Poll ``engine.stats()`` until nothing runs, waits or holds KV cache (or ``timeout`` passes); the last stats."""
    for _ in range(int(timeout / 0.02)):
        stats = engine.stats()
        if stats.running == 0 and stats.waiting == 0 and stats.kv_cache_used_tokens == 0:
            return stats
        await asyncio.sleep(0.02)
    return engine.stats()
