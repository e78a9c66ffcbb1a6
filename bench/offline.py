"""``toolkit bench --offline``: the engine alone (no HTTP) at several concurrency levels.

Each level starts ``concurrency`` requests at once (same prompt length, greedy, ``ignore_eos`` so
every request produces exactly ``max_tokens``) and records, per request, the arrival time of every
token. Reported: time to first token, inter-token latency p50/p99, end-to-end latency and aggregate
output tokens/s, plus the share of engine step time spent outside the model (scheduling, sampling,
detokenization).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.scheduler import SchedulerConfig
from toolkit.runtime.types import Engine, GenerateRequest, StepTimings

FILLER = "The quick brown fox jumps over the lazy dog while the engineers measure latency and throughput. "


@dataclass
class LevelResult:
    """Latency and throughput of one concurrency level."""

    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    e2e_s_p50: float
    overhead_pct: float | None = None


def percentile(values, q: float) -> float:
    """``q``-th percentile (0 when there are no values)."""
    return float(np.percentile(values, q)) if len(values) else 0.0


def summarize(concurrency: int, wall_s: float, starts: list[float], token_times: list[list[float]]) -> LevelResult:
    """Aggregate per-request token arrival times into a ``LevelResult``."""
    ttft = [(times[0] - start) * 1000 for start, times in zip(starts, token_times) if times]
    itl = [gap * 1000 for times in token_times for gap in np.diff(times)]
    e2e = [times[-1] - start for start, times in zip(starts, token_times) if times]
    tokens = sum(len(times) for times in token_times)
    return LevelResult(
        concurrency=concurrency,
        requests=len(starts),
        output_tokens=tokens,
        wall_s=wall_s,
        output_tokens_per_s=tokens / wall_s if wall_s else 0.0,
        ttft_ms_p50=percentile(ttft, 50),
        ttft_ms_p99=percentile(ttft, 99),
        itl_ms_p50=percentile(itl, 50),
        itl_ms_p99=percentile(itl, 99),
        e2e_s_p50=percentile(e2e, 50),
    )


def bench_prompt_ids(tokenizer, prompt_tokens: int) -> list[int]:
    """A BOS + filler-text prompt of exactly ``prompt_tokens`` ids."""
    ids = tokenizer(FILLER * (prompt_tokens // 8 + 1), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return (bos + ids)[:prompt_tokens]


async def _one(engine: Engine, prompt_ids: list[int], max_tokens: int) -> tuple[float, list[float]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start, times = time.perf_counter(), []
    async with await engine.generate(GenerateRequest(prompt_ids, params)) as stream:
        async for output in stream:
            now = time.perf_counter()
            times.extend(now for c in output.choices for _ in c.token_ids)
    return start, times


def _overhead_pct(before: StepTimings | None, after: StepTimings | None) -> float | None:
    """Share of the engine loop spent outside the model between two snapshots (None without loop timings)."""
    if before is None or after is None:
        return None
    loop = (after.step_s + after.schedule_s) - (before.step_s + before.schedule_s)
    model = after.model_s - before.model_s
    return 100.0 * (loop - model) / loop if loop else None


async def run_level(engine: Engine, concurrency: int, prompt_ids: list[int], max_tokens: int) -> LevelResult:
    """Start ``concurrency`` identical-length requests together and measure them."""
    before = engine.stats().step_timings
    started = time.perf_counter()
    results = await asyncio.gather(*[_one(engine, prompt_ids, max_tokens) for _ in range(concurrency)])
    result = summarize(concurrency, time.perf_counter() - started, [r[0] for r in results], [r[1] for r in results])
    result.overhead_pct = _overhead_pct(before, engine.stats().step_timings)
    return result


async def bench_offline(engine_dir: Path, levels: list[int], prompt_tokens: int, max_tokens: int, threads: int | None) -> list[dict]:
    """Run every level against a fresh engine (with a warm-up request first); results as dicts."""
    from toolkit.runtime import load_engine

    config = SchedulerConfig(max_batch_size=max(levels), max_num_tokens=max(512, max(levels) + prompt_tokens))
    engine = load_engine(engine_dir, config=config, threads=threads)
    await engine.start()
    try:
        prompt_ids = bench_prompt_ids(engine.prompts.tokenizer, prompt_tokens)
        await run_level(engine, min(levels), prompt_ids, max_tokens)  # warm-up: onnxruntime sizes its arenas
        return [asdict(await run_level(engine, level, prompt_ids, max_tokens)) for level in levels]
    finally:
        await engine.stop()
