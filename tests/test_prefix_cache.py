"""Prefix caching: block keys, pins and LRU accounting; greedy output identical with and without the cache."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from engine_helpers import until_idle

from toolkit.recipes import get_recipe
from toolkit.runtime import load_engine
from toolkit.runtime.kv_cache import BLOCK, KVCacheManager, KvGeometry
from toolkit.runtime.prefix_cache import PrefixCache, block_keys
from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.scheduler import SchedulerConfig
from toolkit.runtime.types import GenerateRequest

GRAPHS = ("optimum", "gqa")
QWEN = get_recipe("qwen2-7b-instruct")
GREEDY = dict(temperature=0, ignore_eos=True)
SYSTEM = ("You are a careful assistant for a hardware shop. Answer in two sentences, name the aisle, "
          "never invent prices, and say when an item is out of stock. Opening hours: 9 to 18 on weekdays.")
QUESTIONS = ("Where are the screws?", "Do you sell ladders and paint rollers?", "Is the shop open on Sunday?",
             "Which aisle has garden hoses?", "Can I return a drill?", "Where do I find light bulbs?")


# ---- units: keys, matching, pins, LRU, budget ------------------------------------------------------
def _cache(total_blocks: int) -> tuple[KVCacheManager, PrefixCache]:
    geometry = KvGeometry(num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32")
    kv = KVCacheManager(geometry, geometry.bytes_per_token * BLOCK * total_blocks)
    return kv, PrefixCache(kv)


def _past(prompt) -> dict[str, np.ndarray]:
    """A fake left-aligned past whose values are the token ids (so blocks can be told apart)."""
    values = np.asarray(prompt, np.float32)[None, None, :, None].repeat(2, axis=3)
    return {"past_key_values.0.key": values, "past_key_values.0.value": -values}


def test_block_keys_are_chained_and_include_the_adapter():
    prompt = tuple(range(3 * BLOCK))
    keys = block_keys(prompt, None, 3)
    assert len(set(keys)) == 3
    assert block_keys(prompt[:BLOCK * 2], None, 2) == keys[:2]  # a key names the whole prefix up to its block
    changed = (999, *prompt[1:])  # one token of block 0 changes every later key
    assert all(a != b for a, b in zip(block_keys(changed, None, 3), keys))
    moved = (*prompt[BLOCK:BLOCK * 2], *prompt[:BLOCK])  # same block tokens at another position: another key
    assert block_keys(moved, None, 2)[1] != keys[0] and block_keys(moved, None, 2)[1] != keys[1]
    assert set(block_keys(prompt, "a", 3)).isdisjoint(keys)
    assert block_keys(prompt, "a", 3) != block_keys(prompt, "b", 3)


def test_match_pins_leaves_a_token_and_lru_evicts_unpinned_leaves_first():
    kv, cache = _cache(total_blocks=8)
    a = tuple(range(2 * BLOCK))  # exactly 2 blocks
    assert cache.insert(a, None, _past(a)) == 2 and kv.cached_blocks == 2 and kv.used_blocks == 0
    match = cache.match(a, None)
    assert match.tokens == BLOCK  # the whole prompt is cached, but one token must be prefilled
    assert np.array_equal(PrefixCache.past(match)["past_key_values.0.key"][0, 0, :, 0], np.arange(BLOCK))
    cache.release(match)
    longer = (*a, *range(100, 100 + BLOCK + 3))
    assert cache.match(longer, "lora").tokens == 0  # another adapter: no reuse
    match = cache.match(longer, None)
    assert match.tokens == 2 * BLOCK and [b.refs for b in match.blocks] == [1, 1]
    assert cache.insert(longer, None, _past(longer)) == 1  # the third block is new
    b = tuple(range(500, 500 + 2 * BLOCK))
    cache.insert(b, None, _past(b))
    assert kv.cached_blocks == 5 and cache.evictable_blocks == 3
    # LRU order now: l2 (a's third block), a1, a0 (pinned), b1, b0: a 5-block reservation needs 2 evictions
    assert not kv.can_allocate(5 * BLOCK) and kv.make_room(5 * BLOCK)
    assert kv.cached_blocks == 3 and cache.evicted == 2
    for prompt, tokens in ((longer, 2 * BLOCK), (b, BLOCK)):  # l2 went, pinned a0/a1 stayed; b lost b1 before b0
        probe = cache.match(prompt, None)
        assert probe.tokens == tokens
        cache.release(probe)
    kv.allocate("s", 5 * BLOCK)
    assert kv.used_blocks == 5 and kv.cached_blocks == 3
    assert not kv.make_room(3 * BLOCK)  # 5 + 3 + 2 pinned > 8 even with b0 gone
    assert kv.cached_blocks == 3  # so nothing was evicted
    for _ in range(2):
        cache.release(match)  # idempotent
    assert [blk.refs for blk in cache.blocks.values()] == [0, 0, 0]
    assert kv.make_room(3 * BLOCK) and kv.cached_blocks == 0
    kv.allocate("t", 3 * BLOCK)
    assert cache.insert(b, None, _past(b)) == 0 and kv.cached_blocks == 0  # a full budget caches nothing
    kv.free("s")
    kv.free("t")
    assert kv.used_blocks == 0


# ---- engines: greedy output identical with and without the cache -------------------------------------
async def started(engine_dir, **options):
    engine = load_engine(engine_dir, **options)
    await engine.start()
    return engine


def _prompt(engine, question: str, system: str = SYSTEM) -> tuple[int, ...]:
    return tuple(engine.prompts.encode([{"role": "system", "content": system}, {"role": "user", "content": question}]))


async def _run(engine, prompt, max_tokens=12, adapter=None) -> tuple[list[int], int]:
    """Greedy tokens of one request and the cached_tokens its outputs reported (the same on every output)."""
    tokens, cached = [], set()
    request = GenerateRequest(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), adapter=adapter)
    async for out in await engine.generate(request):
        cached.add(out.cached_tokens)
        for choice in out.choices:
            tokens.extend(choice.token_ids)
    assert len(cached) == 1, cached
    return tokens, cached.pop()


def _common(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _pins(engine) -> list[int]:
    return [block.refs for block in engine.scheduler.prefix_cache.blocks.values()]


@pytest.mark.parametrize("graph", GRAPHS)
def test_second_request_with_the_same_system_prompt_reuses_its_blocks(graph, tiny_engine):
    engine_dir = tiny_engine(QWEN, "fp32", graph)

    async def main():
        plain = await started(engine_dir, config=SchedulerConfig(prefix_cache=False))
        cached = await started(engine_dir)
        prompts = [_prompt(cached, QUESTIONS[0]), _prompt(cached, QUESTIONS[1]), _prompt(cached, QUESTIONS[0])]
        expected = [await _run(plain, p) for p in prompts]
        got = [await _run(cached, p) for p in prompts]
        stats = await until_idle(cached), await until_idle(plain)
        for engine in (plain, cached):
            await engine.stop()
        return prompts, expected, got, stats, _pins(cached)

    prompts, expected, got, (stats, plain_stats), pins = asyncio.run(main())
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [c for _, c in expected] == [0, 0, 0] and plain_stats.kv_cache_cached_tokens == 0
    shared = _common(prompts[0], prompts[1]) // BLOCK
    assert shared >= 3, "the system prompt should span several blocks"
    assert [c for _, c in got] == [0, shared * BLOCK, (len(prompts[0]) - 1) // BLOCK * BLOCK]
    blocks = len(prompts[0]) // BLOCK + len(prompts[1]) // BLOCK - shared
    assert stats.kv_cache_cached_tokens == blocks * BLOCK and stats.kv_cache_used_tokens == 0
    assert pins and set(pins) == {0}


@pytest.mark.parametrize("graph", GRAPHS)
def test_staggered_batch_sharing_a_prefix(graph, tiny_engine):
    """Two requests prefill the system prompt together (no hit yet, both insert it); once the first has its
    first token, four more join the running batch staggered with chunked prefill, each starting from the cache."""
    engine_dir = tiny_engine(QWEN, "fp32", graph)
    config = dict(max_batch_size=4, max_num_tokens=40)

    async def main():
        plain = await started(engine_dir, config=SchedulerConfig(prefix_cache=False, **config))
        cached = await started(engine_dir, config=SchedulerConfig(**config))
        prompts = [_prompt(cached, q) for q in QUESTIONS]
        expected = [await _run(plain, p, max_tokens=24) for p in prompts]
        first = await cached.generate(GenerateRequest(prompts[0], SamplingParams(max_tokens=24, **GREEDY)))
        second = asyncio.create_task(_run(cached, prompts[1], max_tokens=24))
        head = await first.__anext__()

        async def later(i):
            await asyncio.sleep(0.004 * i)
            return await _run(cached, prompts[i], max_tokens=24)

        rest = await asyncio.gather(*(later(i) for i in range(2, len(prompts))))
        tokens = list(head.choices[0].token_ids)
        async for out in first:
            tokens.extend(out.choices[0].token_ids)
        got = [(tokens, head.cached_tokens), await second, *rest]
        stats = await until_idle(cached)
        for engine in (plain, cached):
            await engine.stop()
        return prompts, expected, got, stats, _pins(cached)

    prompts, expected, got, stats, pins = asyncio.run(main())
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert got[0][1] == 0
    for prompt, (_, cached_tokens) in zip(prompts[2:], got[2:]):
        assert cached_tokens == min(_common(prompt, prompts[0]), len(prompt) - 1) // BLOCK * BLOCK > 0
    assert stats.kv_cache_used_tokens == 0 and set(pins) == {0}


@pytest.mark.parametrize("graph", GRAPHS)
def test_tiny_budget_evicts_and_outputs_stay_identical(graph, tiny_engine):
    """A budget of one request plus a few blocks: caching one prompt evicts another's blocks, and admission
    evicts cached blocks rather than make a request wait forever; used + cached never exceed the budget."""
    engine_dir = tiny_engine(QWEN, "fp32", graph)
    systems = [SYSTEM, SYSTEM.replace("hardware shop", "bakery"), SYSTEM.replace("careful", "cheerful")]
    plan = [(0, 0, 8), (1, 1, 8), (0, 2, 8), (2, 3, 40), (0, 0, 8), (0, 0, 8), (1, 4, 24)]  # (system, question, max)

    async def main():
        plain = await started(engine_dir, config=SchedulerConfig(prefix_cache=False))
        prompts = [_prompt(plain, QUESTIONS[q], systems[s]) for s, q, _ in plan]
        longest = max(len(p) for p in prompts)  # room for the largest reservation and one prompt's blocks
        blocks = -(-(longest + 40) // BLOCK) + longest // BLOCK + 1
        budget = plain.kv.geometry.bytes_per_token * BLOCK * blocks
        cached = await started(engine_dir, kv_budget_bytes=budget)
        seen = []
        cached.fault_hook = lambda _: seen.append((cached.kv.used_blocks, cached.kv.cached_blocks))
        expected = [await _run(plain, p, m) for p, (_, _, m) in zip(prompts, plan)]
        got, held_before = [], []
        for prompt, (_, _, max_tokens) in zip(prompts, plan):
            held_before.append(cached.kv.cached_blocks)
            got.append(await asyncio.wait_for(_run(cached, prompt, max_tokens), 30))
        stats = await until_idle(cached)
        for engine in (plain, cached):
            await engine.stop()
        return prompts, expected, got, stats, seen, cached, held_before

    prompts, expected, got, stats, seen, cached, held_before = asyncio.run(main())
    assert [t for t, _ in got] == [t for t, _ in expected]
    total = cached.kv.total_blocks
    assert seen and max(used + held for used, held in seen) <= total
    assert cached.scheduler.prefix_cache.evicted > 0
    assert held_before[3] + -(-(len(prompts[3]) + 40) // BLOCK) > total  # idle engine: only eviction admitted it
    assert got[5][1] == (len(prompts[5]) - 1) // BLOCK * BLOCK  # the same prompt right after it was cached
    assert stats.kv_cache_used_tokens == 0 and 0 < stats.kv_cache_cached_tokens <= stats.kv_cache_total_tokens


@pytest.mark.parametrize("graph", GRAPHS)
def test_abort_mid_prefill_and_mid_decode_unpins(graph, tiny_engine):
    engine_dir = tiny_engine(QWEN, "fp32", graph)
    long_question = " ".join(QUESTIONS)
    config = dict(max_batch_size=2, max_num_tokens=8)  # 8-token prefill chunks: the uncached rest takes several

    async def main():
        plain = await started(engine_dir, config=SchedulerConfig(prefix_cache=False, **config))
        cached = await started(engine_dir, config=SchedulerConfig(**config))
        warm, long = _prompt(cached, QUESTIONS[0]), _prompt(cached, long_question)
        expected = await _run(plain, long, 16)
        await _run(cached, warm)
        before = (await until_idle(cached)).kv_cache_cached_tokens
        # mid-prefill: hold the engine in the request's second prefill chunk, abort it there
        reached, go, pinned = threading.Event(), threading.Event(), []

        def hook(plan):
            for group, start, _ in plan.prefill:
                if group.request.prompt_ids == long and start > group.cached_tokens and not reached.is_set():
                    pinned.extend(block.refs for block in group.prefix.blocks)
                    reached.set()
                    go.wait(10)

        cached.fault_hook = hook
        stream = await cached.generate(GenerateRequest(long, SamplingParams(max_tokens=16, **GREEDY)))
        assert await asyncio.to_thread(reached.wait, 10)
        await stream.aclose()
        go.set()
        mid_prefill = await until_idle(cached), _pins(cached)
        # mid-decode: the first output means the prefill ended (its blocks were cached), then abort
        stream = await cached.generate(GenerateRequest(long, SamplingParams(max_tokens=200, **GREEDY)))
        first = await stream.__anext__()
        await stream.aclose()
        mid_decode = await until_idle(cached), _pins(cached)
        again = await _run(cached, long, 16)
        for engine in (plain, cached):
            await engine.stop()
        return warm, long, expected, before, pinned, mid_prefill, first, mid_decode, again

    warm, long, expected, before, pinned, mid_prefill, first, mid_decode, again = asyncio.run(main())
    shared = min(_common(warm, long), len(long) - 1) // BLOCK * BLOCK
    assert pinned and set(pinned) == {1}  # the aborted request held its matched blocks while prefilling
    stats, pins = mid_prefill
    assert (stats.running, stats.waiting, stats.kv_cache_used_tokens) == (0, 0, 0)
    assert stats.kv_cache_cached_tokens == before and set(pins) == {0}  # unpinned, kept, nothing of it added
    assert first.cached_tokens == shared
    stats, pins = mid_decode
    assert stats.kv_cache_used_tokens == 0 and set(pins) == {0}
    assert stats.kv_cache_cached_tokens == before + (len(long) // BLOCK - shared // BLOCK) * BLOCK
    assert again == (expected[0], (len(long) - 1) // BLOCK * BLOCK)


def test_adapter_request_never_reuses_the_base_blocks(tiny_engine, tiny_checkpoint, tmp_path):
    from lora_fixtures import copy_engine, make_peft_adapter
    from toolkit.export.lora import export_lora

    gemma = get_recipe("gemma-7b-it")
    engine_dir = copy_engine(tiny_engine(gemma, "fp32", "optimum"), tmp_path / "engine")
    export_lora(make_peft_adapter(tiny_checkpoint(gemma), tmp_path / "peft", seed=1), engine_dir, "a")
    adapters = {"a": engine_dir / "adapters" / "a"}

    async def main():
        plain = await started(engine_dir, config=SchedulerConfig(prefix_cache=False), adapters=adapters)
        cached = await started(engine_dir, adapters=adapters)
        prompt = tuple(cached.prompts.encode(prompt=SYSTEM + " " + QUESTIONS[0]))
        expected = {name: await _run(plain, prompt, adapter=name) for name in (None, "a")}
        got = [await _run(cached, prompt, adapter=name) for name in (None, "a", "a", None)]
        stats = await until_idle(cached)
        for engine in (plain, cached):
            await engine.stop()
        return prompt, expected, got, stats

    prompt, expected, got, stats = asyncio.run(main())
    hit = (len(prompt) - 1) // BLOCK * BLOCK
    assert expected[None][0] != expected["a"][0]  # the adapter changes the output
    assert got == [(expected[None][0], 0), (expected["a"][0], 0), (expected["a"][0], hit), (expected[None][0], hit)]
    assert stats.kv_cache_cached_tokens == 2 * (len(prompt) // BLOCK) * BLOCK  # one chain per adapter


def test_openai_usage_reports_cached_tokens():
    from types import SimpleNamespace

    from toolkit.server.openai.responses import usage
    from toolkit.server.registry import ModelEntry

    entry = ModelEntry("qwen", SimpleNamespace(recipe=QWEN), ("qwen",))
    body = usage(entry, 100, 7, 64)
    assert body["prompt_tokens_details"] == {"cached_tokens": 64}
    assert (body["prompt_tokens"], body["completion_tokens"], body["total_tokens"]) == (100, 7, 107)
    assert usage(entry, 5, 1)["prompt_tokens_details"] == {"cached_tokens": 0}


def test_no_prefix_cache_option_reaches_the_engine(monkeypatch, tmp_path, tiny_engine):
    from click.testing import CliRunner

    from toolkit.cli import main
    from toolkit.server import serve as serve_module

    calls = []
    monkeypatch.setattr(serve_module, "serve", lambda dirs, *a, **k: calls.append(k))
    for args in (["serve", str(tmp_path)], ["serve", "--no-prefix-cache", str(tmp_path)]):
        assert CliRunner().invoke(main, args).exit_code == 0
    assert [k["prefix_cache"] for k in calls] == [True, False]
    engine_dir = tiny_engine(QWEN, "fp32", "optimum")
    on, off = (serve_module.load_engines([engine_dir], prefix_cache=flag)[QWEN.name] for flag in (True, False))
    assert on.scheduler.prefix_cache is not None and off.scheduler.prefix_cache is None
    assert off.config.prefix_cache is False and SchedulerConfig().prefix_cache is True
