"""Decode speed of a single stream right after a burst, against the stream after it.

    python benchmarks/after_burst.py [ENGINE_DIR] [--burst 16] [--rounds 2]

Issue #13 measured it over HTTP: right after 16 streams, the next single stream (an 857-token
prompt) decoded at 40 tok/s instead of 63, "the batch-sized KV buffer outlives the burst". This
drives one engine in-process: a burst of ``--burst`` streaming requests, then one long-prompt
request (the "after" stream) and one more (the "next" stream, after a single stream: the
baseline), and times each single stream's decode (first token to last), ``--rounds`` times. The
decode arena (``runtime/shared_kv.py``) is kept while rows leave but a step only sees the live
rows, so the two should match. Prints tok/s per stream, their ratio and the CPU; the speed
figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

DEFAULT_ENGINE = Path.home() / ".cache/toolkit/engines/default-onnx-gqa-int8"


async def stream(engine, prompt: tuple[int, ...], max_tokens: int) -> tuple[float, int]:
    """Generate greedily; (decode seconds from the first token to the last, tokens after the first)."""
    from toolkit.runtime.sampling_params import SamplingParams
    from toolkit.runtime.types import GenerateRequest

    request = GenerateRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    first = last = None
    tokens = 0
    async for out in await engine.generate(request):
        now = time.perf_counter()
        n = sum(len(c.token_ids) for c in out.choices)
        if first is None and n:
            first, n = now, n - 1
        tokens += n
        last = now
    return (last - first), tokens


async def one_round(engine, burst: int, short: tuple[int, ...], long: tuple[int, ...], max_tokens: int) -> dict:
    await asyncio.gather(*(stream(engine, (*short[:-1], 1000 + i), 128) for i in range(burst)))
    while engine.stats().running or engine.stats().kv_cache_used_tokens:  # the burst's rows have left the batch
        await asyncio.sleep(0.01)
    results = {}
    for name in ("after", "next"):
        seconds, tokens = await stream(engine, long, max_tokens)
        results[name] = tokens / seconds
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine_dir", nargs="?", type=Path, default=DEFAULT_ENGINE)
    p.add_argument("--burst", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=857)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))

    from soak import cpu_name

    from toolkit.bench.offline import FILLER
    from toolkit.runtime import load_engine
    from toolkit.runtime.scheduler import SchedulerConfig

    async def run() -> dict[str, dict[str, list[float]]]:
        engine = load_engine(args.engine_dir, config=SchedulerConfig(prefix_cache=False))
        await engine.start()
        words = (FILLER + " ") * 200
        ids = tuple(engine.prompts.encode([{"role": "user", "content": words}]))
        long, short = ids[: args.prompt_tokens], ids[:108]
        speeds: dict[str, list[float]] = {"after": [], "next": []}
        for r in range(args.rounds):
            got = await one_round(engine, args.burst, short, long, args.max_tokens)
            for name, value in got.items():
                speeds[name].append(value)
            print(f"round {r + 1}: after the burst {got['after']:.1f} tok/s, next {got['next']:.1f} tok/s", flush=True)
        await engine.stop()
        return speeds

    speeds = asyncio.run(run())
    print(f"CPU: {cpu_name()}")
    after, following = (statistics.median(speeds[name]) for name in ("after", "next"))
    print(f"after the burst {after:.1f} tok/s, next {following:.1f} tok/s, ratio {after / following:.2f}")


if __name__ == "__main__":
    main()
