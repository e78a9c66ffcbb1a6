"""Server-side cost of one request: HTTP arrival → the request lands in the engine's submission queue.

Measures what the serving layer spends per request before the engine loop sees it (body
decoding, validation, chat template, tokenization, ``max_tokens`` resolution, building the
engine request), on the real default model, with the bench's prompt shape (a ~108-token filler
prompt, chat and completion, no ``max_tokens`` so the default is derived from the prompt length).

The engine's submission queue is wrapped: its ``put`` records ``now - arrival_time`` of the
request and then refuses it (the server answers 429), so no generation runs and only the
serving path is timed. Usage::

    python benchmarks/request_overhead.py [--requests 200] [ENGINE_DIR]

Prints p50 / p90 in milliseconds per route.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

FILLER = "The quick brown fox jumps over the lazy dog while the engineers measure latency and throughput. "


def _engine_of(app):
    state = getattr(app.state, "ctx", None) or app.state.app_state
    return state.models.entries[0].engine


def _instrument(engine, samples: list[float]) -> None:
    from toolkit.runtime.errors import OverloadedError

    queue = engine._submissions

    class Recording:
        def __getattr__(self, name):
            return getattr(queue, name)

        def put(self, group):
            samples.append(time.monotonic() - group.request.arrival_time)
            raise OverloadedError(0, 0)

    engine._submissions = Recording()


async def _run(engine_dir: Path, requests: int) -> dict[str, list[float]]:
    from litestar.testing import AsyncTestClient

    from toolkit.server.serve import build_app

    app = build_app([engine_dir], [])
    bodies = {
        "/v1/chat/completions": {"model": "default", "messages": [{"role": "user", "content": FILLER * 6}]},
        "/v1/completions": {"model": "default", "prompt": FILLER * 6},
        "/client/v4/accounts/a/ai/run/default": {"messages": [{"role": "user", "content": FILLER * 6}]},
    }
    results: dict[str, list[float]] = {}
    async with AsyncTestClient(app) as client:
        for _ in range(600):  # wait for the engine to start
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        samples: list[float] = []
        _instrument(_engine_of(app), samples)
        for path, body in bodies.items():
            samples.clear()
            for _ in range(20):  # warm-up
                await client.post(path, json=body)
            samples.clear()
            for _ in range(requests):
                reply = await client.post(path, json=body)
                assert reply.status_code == 429, reply.text
            results[path] = list(samples)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", nargs="?", type=Path)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    engine_dir = args.engine_dir
    if engine_dir is None:
        engine_dir = sorted((Path.home() / ".cache/toolkit/engines").glob("default-onnx*int8*"))[0]
    for path, samples in asyncio.run(_run(engine_dir, args.requests)).items():
        ms = sorted(s * 1000 for s in samples)
        print(f"{path:45s} n={len(ms)} p50={statistics.median(ms):.2f} ms p90={ms[int(0.9 * len(ms))]:.2f} ms")


if __name__ == "__main__":
    main()
