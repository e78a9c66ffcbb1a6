"""The prefix cache's pool reserved up front (issue #13, req. 5, ``toolkit serve``): resident from the start, never
past its size however much is cached, its pages kept through eviction, and carved out of the KV budget."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import mmap

import numpy as np
import pytest
from engine_helpers import until_idle
from test_memory import _greedy, _samples

from toolkit.recipes import get_recipe
from toolkit.runtime import load_engine
from toolkit.runtime.kv_cache import BLOCK, KVCacheManager, KvGeometry
from toolkit.runtime.prefix_cache import PrefixCache
from toolkit.runtime.scheduler import SchedulerConfig

NAMES = ["past_key_values.0.key", "past_key_values.0.value"]
QWEN = get_recipe("qwen2-7b-instruct")
GEOMETRY = KvGeometry(num_layers=1, num_kv_heads=1, head_dim=256, dtype="float32")  # a block: 32 KiB


def _rss_anon() -> int:
    """Anonymous resident bytes of this process (/proc/self/status ``RssAnon``: no file pages, no shared libraries)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _pool_rss(cache: PrefixCache) -> int:
    """Resident bytes of exactly the cache pool's memory map, page by page (mincore(2),
    https://man7.org/linux/man-pages/man2/mincore.2.html), so neither what other tests left in this
    process's heap nor a neighbouring mapping the kernel merged with it can move the measure; 0 before
    the pool is mapped."""
    memory = cache.pool._map
    if memory is None:
        return 0
    page = mmap.PAGESIZE
    length = len(memory)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    pages = (length + page - 1) // page
    vector = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vector) == 0, ctypes.get_errno()
    return sum(byte & 1 for byte in vector) * page


def _cache(pool_blocks: int, reserve: bool, share: float = 0.25) -> tuple[KVCacheManager, PrefixCache]:
    budget = GEOMETRY.bytes_per_token * BLOCK * int(pool_blocks / share)
    kv = KVCacheManager(GEOMETRY, budget, rectangular=True, prefix_cache_share=share, reserve_prefix_cache=reserve)
    return kv, PrefixCache(kv)


def _past(prompt, into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A left-aligned past whose values are the token ids (written into ``into``'s arrays when given)."""
    values = np.asarray(prompt, np.float32)[None, None, :, None]
    past = into or {name: np.empty((1, 1, len(prompt), 256), np.float32) for name in NAMES}
    past[NAMES[0]][...], past[NAMES[1]][...] = values, -values
    return past


def test_reserved_pool_is_resident_at_start_and_bounded_when_filled_past_capacity():
    gc.collect()
    before = _rss_anon()
    kv, cache = _cache(pool_blocks=4096, reserve=True)  # 128 MiB
    pool = cache.max_blocks * kv.block_bytes
    assert pool == 128 << 20 and cache.held_bytes == pool  # the /metrics prefix_cache part: the whole pool
    assert _pool_rss(cache) >= 0.8 * pool and _rss_anon() - before >= 0.8 * pool  # committed before any block was cached
    prompt_blocks = 64
    past = _past(range(prompt_blocks * BLOCK))
    prompts = [tuple(range(i * 100_000, i * 100_000 + prompt_blocks * BLOCK)) for i in range(2 * 4096 // prompt_blocks)]
    for prompt in prompts:  # twice the pool's capacity: the first half is evicted for the second
        assert cache.insert(prompt, None, _past(prompt, past)) == prompt_blocks
    assert cache.held_blocks == cache.max_blocks and cache.evicted == 4096
    filled = _rss_anon() - before
    assert 0.8 * pool <= filled <= pool + (24 << 20)  # no growth past the pool (24 MiB: the test's own arrays, noise)
    newest = cache.match(prompts[-1] + (1,), None)  # reused slots hold the new blocks' values
    assert newest.tokens == prompt_blocks * BLOCK
    assert (PrefixCache.past(newest)[NAMES[0]][0, 0, :, 0] == np.asarray(prompts[-1], np.float32)).all()
    cache.release(newest)
    assert cache.evict(cache.max_blocks) == cache.max_blocks and cache.held_blocks == 0
    assert _pool_rss(cache) >= 0.8 * pool  # evicted slots keep their pages for the next blocks
    assert cache.held_bytes == pool


def test_lazy_pool_is_not_resident_until_written_and_gives_evicted_pages_back():
    """The contrast (the engine's default, e.g. tests and benches): the same pool costs nothing until used."""
    kv, cache = _cache(pool_blocks=4096, reserve=False)
    assert _pool_rss(cache) == 0 and cache.held_bytes == 0
    prompt = tuple(range(1024 * BLOCK))
    cache.insert(prompt, None, _past(prompt))  # 1,024 blocks: 32 MiB written
    assert cache.held_bytes == 32 << 20 and _pool_rss(cache) >= 32 << 20
    cache.evict(1024)
    assert cache.held_bytes == 0 and _pool_rss(cache) < 1 << 20  # the evicted pages went back to the kernel


def test_reserved_pool_is_carved_out_of_the_budget_and_never_evicted_for_requests():
    kv, cache = _cache(pool_blocks=4, reserve=True)  # budget 16 blocks, pool 4
    assert kv.total_blocks == 16 and cache.max_blocks == 4
    assert kv.reservable_tokens == 12 * BLOCK
    assert kv.can_ever_fit(12 * BLOCK) and not kv.can_ever_fit(12 * BLOCK + 1)
    assert not kv.can_allocate(13 * BLOCK)  # even with nothing cached: the pool's memory is already taken
    kv.allocate("a", 12 * BLOCK)
    prompt = tuple(range(5 * BLOCK))
    assert cache.insert(prompt, None, _past(prompt)) == 4  # the pool's own room, whatever the requests reserve
    assert cache.held_blocks == 4 and kv.used_blocks == 12
    kv.free("a")
    assert not kv.make_room(13 * BLOCK) and cache.evicted == 0  # evicting would free no memory: not done
    lazy_kv, lazy = _cache(pool_blocks=4, reserve=False)
    assert lazy_kv.reservable_tokens == 16 * BLOCK and lazy_kv.can_allocate(16 * BLOCK)


def test_cached_blocks_keep_no_per_input_views():
    """A full cache's Python bookkeeping stays small: blocks keep their slot, not a dict of views per past input
    (36 for the default model: ~7 KiB a block, 7.7 MiB for the soak's 1,071 blocks, before)."""
    import tracemalloc

    geometry = KvGeometry(num_layers=18, num_kv_heads=1, head_dim=8, dtype="float32")
    kv = KVCacheManager(geometry, geometry.bytes_per_token * BLOCK * 2048, prefix_cache_share=0.25, reserve_prefix_cache=True)
    cache = PrefixCache(kv)
    names = [f"past_key_values.{layer}.{part}" for layer in range(18) for part in ("key", "value")]
    past = {name: np.ones((1, 1, 16 * BLOCK, 8), np.float32) for name in names}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(cache.max_blocks // 16):
            cache.insert(tuple(range(i * 1000, i * 1000 + 16 * BLOCK)), None, past)
        per_block = (tracemalloc.get_traced_memory()[0] - before) / cache.held_blocks
    finally:
        tracemalloc.stop()
    assert cache.held_blocks == cache.max_blocks == 512
    assert per_block < 2048, per_block
    assert set(cache.blocks[next(iter(cache.blocks))].kv) == set(names)  # views made when asked for


# ---- the engine --------------------------------------------------------------------------------------
def test_engine_with_a_reserved_pool_reuses_evicted_slots_with_outputs_unchanged(tiny_engine):
    """A pool of a few blocks, cycled through by several system prompts: every slot is reused (not zeroed) many
    times and greedy outputs match an engine without the cache; the KV held stays within the budget."""
    engine_dir = tiny_engine(QWEN, "fp32", "gqa")
    systems = [f"You are assistant number {i} of a shop; answer briefly and name the aisle. " * 2 for i in range(4)]
    plan = [0, 1, 0, 2, 3, 1, 0, 2, 0]

    async def main():
        plain = load_engine(engine_dir, config=SchedulerConfig(prefix_cache=False))
        await plain.start()
        prompts = [tuple(plain.prompts.encode([{"role": "system", "content": systems[s]},
                                               {"role": "user", "content": f"Question {i}?"}])) for i, s in enumerate(plan)]
        expected = [await _greedy(plain, p, 6) for p in prompts]
        pool_blocks = max(len(p) for p in prompts) // BLOCK + 1  # about one prompt's blocks
        budget = plain.kv.geometry.bytes_per_token * BLOCK * 4 * pool_blocks
        engine = load_engine(engine_dir, kv_budget_bytes=budget, prefix_cache_share=0.25, reserve_prefix_cache=True)
        reserved_at_start = engine.stats().memory["prefix_cache"]  # before start: made with the engine
        await engine.start()
        got = [await _greedy(engine, p, 6) for p in prompts]
        idle = await until_idle(engine)
        await asyncio.gather(plain.stop(), engine.stop())
        assert got == expected
        return engine, reserved_at_start, idle

    engine, reserved_at_start, idle = asyncio.run(main())
    cache = engine.scheduler.prefix_cache
    assert cache.reserved and cache.evicted > cache.max_blocks  # slots were reused more than once over
    pool = cache.max_blocks * engine.kv.block_bytes
    assert reserved_at_start == idle.memory["prefix_cache"] == pool
    assert idle.kv_cache_cached_tokens > 0
    assert idle.memory["prefix_cache"] + idle.memory["kv_decode"] <= idle.memory["kv_budget"]


def test_metrics_report_the_reserved_pool_from_the_start(tiny_engine):
    """/metrics (the app as ``toolkit serve`` builds it): the prefix_cache part is the whole pool before any request."""
    import httpx
    from fake_engine import LiveServer

    from toolkit.server.serve import build_app

    engine_dir = tiny_engine(QWEN, "fp32", "gqa")
    budget = 64 << 20
    app = build_app([engine_dir], [], grace_s=1.0,
                    memory={"kv_budget_bytes": budget, "prefix_cache_share": 0.25, "reserve_prefix_cache": True})
    with LiveServer(app) as live:
        engine = app.state.ctx.models.resolve(QWEN.name).engine
        samples = _samples(httpx.get(f"{live.base_url}/metrics", timeout=30).text)
    model = next(labels for name, labels in samples if name == "toolkit_kv_cache_budget_bytes")
    pool = engine.scheduler.prefix_cache.max_blocks * engine.kv.block_bytes
    assert pool > 0 and samples[("toolkit_kv_cache_allocated_bytes", (*model, ("part", "prefix_cache")))] == pool
    assert samples[("toolkit_kv_cache_budget_bytes", model)] >= pool + samples[
        ("toolkit_kv_cache_allocated_bytes", (*model, ("part", "kv_decode")))]
    assert samples[("process_resident_memory_bytes", ())] > pool  # the pool is resident


def test_toolkit_serve_options_make_engines_with_a_reserved_pool(tiny_engine):
    """``toolkit serve`` (plain and every --ray replica: one translation, server.serve.engine_options) reserves the pool;
    the engine's own default (tests, benches) does not."""
    from toolkit.server.serve import engine_options, load_engines

    engine_dir = tiny_engine(QWEN, "fp32", "gqa")
    options = engine_options(kv_cache_gib=1 / 16, prefix_cache_share=0.25)
    [served] = load_engines([engine_dir], **options).values()
    assert served.scheduler.prefix_cache.reserved
    assert served.stats().memory["prefix_cache"] == served.kv.budget_bytes // 4 // served.kv.block_bytes * served.kv.block_bytes
    assert not load_engine(engine_dir, kv_budget_bytes=1 << 26).scheduler.prefix_cache.reserved


# ---- benchmarks/soak.py's flatness measure ------------------------------------------------------------
def _soak_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soak_flatness_is_per_minute_medians_after_warm_up():
    """Short spikes (a trim away) do not count; a level that steps up after warm-up does; a cut-off last minute and
    the warm-up's climb are left out."""
    soak = _soak_module()
    mib = 2**20

    def rss(t):
        level = 1000 + (300 if t < 180 else 0) * t / 180 + (60 if t >= 420 else 0)  # climbs in warm-up, steps at 7 min
        return int((level + (400 if t % 30 == 0 else 0)) * mib)  # a 400 MiB spike every 30 s (1 sample in 10)

    samples = [{"t": t, "rss": rss(t)} for t in range(0, 630, 3)]  # ends 30 s into minute 10
    rows = soak.per_minute(samples)
    assert [row["whole"] for row in rows] == [True] * 10 + [False]
    assert soak.minute_median_growth(rows, 180) == 6.0  # 1,000 -> 1,060 MiB: neither the spikes nor the climb
    flat = soak.per_minute([{"t": t, "rss": int((1000 + (400 if t % 30 == 0 else 0)) * mib)} for t in range(0, 600, 3)])
    assert soak.minute_median_growth(flat, 180) == 0.0
    assert soak.minute_median_growth(flat, 540) is None  # one minute after warm-up: nothing to compare


def test_a_reserved_pool_of_the_whole_budget_is_refused(tiny_engine):
    """The pool is set aside from what requests reserve: all of the budget would leave them none, so it is refused
    (by ``toolkit serve``'s option range, and by the engine for programmatic use), not served as an engine that
    answers every request with "over the KV cache budget"."""
    from click.testing import CliRunner

    from toolkit.cli import main as cli

    engine_dir = tiny_engine(QWEN, "fp32", "gqa")
    with pytest.raises(ValueError, match="leaves requests no room"):
        load_engine(engine_dir, kv_budget_bytes=1 << 26, prefix_cache_share=1.0, reserve_prefix_cache=True)
    assert load_engine(engine_dir, kv_budget_bytes=1 << 26, prefix_cache_share=1.0).kv.reservable_tokens > 0  # lazy: evictable
    result = CliRunner().invoke(cli, ["serve", str(engine_dir), "--prefix-cache-share", "1"])
    assert result.exit_code == 2 and "--prefix-cache-share" in result.output
