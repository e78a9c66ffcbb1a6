"""Bounded memory (issue #13, req. 5): the decode buffer gives rows back, the prefix cache lives in a pool whose
evicted slots go back to the kernel, every KV holder stays within the budget, and /metrics shows it all."""

from __future__ import annotations

import asyncio
import mmap

import numpy as np
import pytest
from engine_helpers import until_idle

from toolkit.recipes import get_recipe
from toolkit.runtime import load_engine
from toolkit.runtime.kv_cache import BLOCK, KVCacheManager, KvGeometry, default_kv_budget_bytes
from toolkit.runtime.native_memory import Trimmer, malloc_free_bytes
from toolkit.runtime.prefix_cache import PrefixCache
from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.scheduler import SchedulerConfig
from toolkit.runtime.shared_kv import GROWTH_QUANTUM, ROW_QUANTUM, SharedKV, round_up
from toolkit.runtime.types import GenerateRequest

NAMES = ["past_key_values.0.key", "past_key_values.0.value"]
QWEN = get_recipe("qwen2-7b-instruct")


def _row(value: float, length: int) -> dict[str, np.ndarray]:
    return {name: np.full((1, 1, length, 4), value, np.float32) for name in NAMES}


# ---- SharedKV: the arena outlives rows leaving, not the batch --------------------------------------
def test_decode_arena_is_kept_while_rows_leave_and_unmapped_when_the_batch_empties():
    kv = SharedKV(NAMES, 1, 4, np.float32, max_length=1024)
    for i in range(16):
        kv.add_rows(_row(float(i), 10 + i), [10 + i])
    burst_bytes, mappings = kv.nbytes, kv.reallocations
    order = kv.keep_rows([3, 15, 7])  # 13 rows leave: no copy beyond the movers, no new mapping
    assert kv.nbytes == burst_bytes and kv.reallocations == mappings
    views, mask = kv.step_views()
    assert all(view.shape[0] == 3 for view in views.values()) and mask.shape[0] == 3  # a step sees live rows only
    key = kv.buffers[NAMES[0]]
    for slot, old in enumerate(order):  # every live row's cache survived the move, in the reported order
        assert (key[slot, :, : 10 + old] == old).all()
    assert kv.lengths == [10 + old for old in order]
    kv.keep_rows([order.index(15)])
    assert kv.nbytes == burst_bytes and (kv.buffers[NAMES[0]][0, :, :25] == 15).all()
    assert kv.keep_rows([]) == [] and kv.nbytes == 0  # an empty batch holds nothing


def test_capacity_changes_move_rows_inside_the_arena():
    """Growing and shrinking the capacity re-lays every (row, head) slot out in place: same memory, data kept."""
    kv = SharedKV(NAMES, 2, 4, np.float32, max_length=4096)
    for i in range(4):
        kv.add_rows({name: np.arange(2 * 300 * 4, dtype=np.float32).reshape(1, 2, 300, 4) + 1000 * i for name in NAMES},
                    [(40, 60, 80, 250)[i]])  # capacity 256
    kv.add_rows({name: np.full((1, 2, 5, 4), -1.0, np.float32) for name in NAMES}, [5])
    kv.keep_rows([0, 1, 2, 4])  # the 250-token row leaves: the capacity shrinks to 128 at the next step
    base = kv.buffers[NAMES[0]].__array_interface__["data"][0]
    mappings = kv.reallocations
    kv.step_views()
    assert kv.capacity == 128 and kv.relayouts >= 1

    def check():
        for name in NAMES:
            buffer = kv.buffers[name]
            for slot, length in enumerate((40, 60, 80)):  # the prompts' tokens (the steps' own columns are unwritten)
                expected = np.arange(2 * 300 * 4, dtype=np.float32).reshape(2, 300, 4)[:, :length] + 1000 * slot
                assert (buffer[slot, :, :length] == expected).all()
            assert (buffer[3, :, :5] == -1).all()

    check()
    for _ in range(kv.capacity - max(kv.lengths)):  # grow to 192 columns: in place again (the arena holds 5 x 256)
        kv.step_views()
        kv.accept_step()
    kv.step_views()
    assert kv.capacity == 192 and kv.reallocations == mappings
    assert kv.buffers[NAMES[0]].__array_interface__["data"][0] == base
    check()


def test_row_growth_is_by_quantum_not_doubling():
    kv = SharedKV(NAMES, 1, 4, np.float32, max_length=1024)
    for i in range(9):
        kv.add_rows(_row(1.0, 5), [5])
    assert kv.row_capacity == 12  # doubling would have made 16
    assert kv.nbytes == 2 * 12 * kv.capacity * 4 * 4


# ---- the prefix cache's slot pool ------------------------------------------------------------------
def _cache(total_blocks: int, share: float = 1.0) -> tuple[KVCacheManager, PrefixCache]:
    geometry = KvGeometry(num_layers=1, num_kv_heads=1, head_dim=256, dtype="float32")  # a block: 16 KiB per input
    kv = KVCacheManager(geometry, geometry.bytes_per_token * BLOCK * total_blocks, prefix_cache_share=share)
    return kv, PrefixCache(kv)


def _past(prompt) -> dict[str, np.ndarray]:
    values = np.asarray(prompt, np.float32)[None, None, :, None].repeat(256, axis=3)
    return {NAMES[0]: values, NAMES[1]: -values}


def test_prefix_blocks_live_in_pool_slots_that_are_reused_and_capped():
    kv, cache = _cache(total_blocks=16, share=0.25)
    assert cache.max_blocks == 4
    a, b = tuple(range(3 * BLOCK)), tuple(range(1000, 1000 + 3 * BLOCK))
    assert cache.insert(a, None, _past(a)) == 3
    assert cache.held_bytes == 3 * 2 * BLOCK * 256 * 4 and kv.cached_blocks == 3
    slots_a = {block.slot for block in cache.blocks.values()}
    assert cache.insert(b, None, _past(b)) == 3  # the cap is 4: two of a's blocks are evicted for b's
    assert len(cache.blocks) == 4 and cache.evicted == 2
    assert {block.slot for block in cache.blocks.values()} <= slots_a | {3}  # freed slots were reused
    for block in cache.blocks.values():  # each block holds its own tokens' KV, also in a reused slot
        expected = np.asarray(block.tokens, np.float32)[None, None, :, None]
        assert (block.kv[NAMES[0]] == expected).all() and (block.kv[NAMES[1]] == -expected).all()
    match = cache.match(b + (7,), None)
    assert match.tokens == 3 * BLOCK
    past = PrefixCache.past(match)
    assert (past[NAMES[0]][0, 0, :, 0] == np.asarray(b, np.float32)).all()


def test_an_evicted_slot_reads_as_zeros_its_pages_were_given_back():
    kv, cache = _cache(total_blocks=8)
    a = tuple(range(1, 1 + BLOCK))
    cache.insert(a, None, _past(a))
    block = next(iter(cache.blocks.values()))
    view = block.kv[NAMES[0]]
    assert cache.pool.slot_bytes % mmap.PAGESIZE == 0 and view.any()
    cache.evict(1)
    assert not view.any()  # MADV_DONTNEED: the slot's pages went back; a fresh read maps zero pages
    assert cache.held_bytes == 0 and kv.cached_blocks == 0


# ---- budget defaults and the native-memory helpers -------------------------------------------------
def test_default_budget_is_a_tenth_of_memory_within_one_context_and_16_gib():
    per_token, context = 36 * 1024, 32768
    assert default_kv_budget_bytes(per_token, context, memory_bytes=24 << 30) == (24 << 30) // 10
    assert default_kv_budget_bytes(per_token, context, memory_bytes=4 << 30) == per_token * context
    assert default_kv_budget_bytes(per_token, context, memory_bytes=1 << 40) == 16 << 30


def test_trimmer_runs_on_its_interval_and_stops():
    trimmer = Trimmer(0.01)
    trimmer.start()
    for _ in range(500):
        if trimmer.trims >= 2:
            break
        asyncio.run(asyncio.sleep(0.01))
    trimmer.stop()
    assert trimmer.trims >= 2 and malloc_free_bytes() is not None  # glibc here
    off = Trimmer(0)
    off.start()
    assert off._thread is None


# ---- the engine: a burst stays within the budget, outputs unchanged, buffer given back --------------
async def _greedy(engine, prompt, max_tokens) -> list[int]:
    tokens = []
    request = GenerateRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    async for out in await engine.generate(request):
        for choice in out.choices:
            tokens.extend(choice.token_ids)
    return tokens


def test_burst_keeps_kv_within_budget_outputs_unchanged_and_buffer_given_back(tiny_engine):
    engine_dir = tiny_engine(QWEN, "fp32", "gqa")
    max_tokens = 24

    async def main():
        solo = await _started(engine_dir, config=SchedulerConfig(prefix_cache=False))
        prompts = [tuple(solo.prompts.encode([{"role": "user", "content": f"Burst request {i}: " + "word " * (3 * i)}]))
                   for i in range(10)]
        expected = [await _greedy(solo, p, max_tokens) for p in prompts]
        longest = max(len(p) for p in prompts) + max_tokens
        budget = solo.kv.geometry.bytes_per_token * 4 * longest  # four of the longest at a time
        engine = await _started(engine_dir, kv_budget_bytes=budget, prefix_cache_share=0.5,
                                config=SchedulerConfig(max_batch_size=8, max_num_tokens=64))
        seen = []
        engine.fault_hook = lambda _: seen.append((engine.stats().memory, len(engine.scheduler.running),
                                                   engine.batch.capacity))
        got = await asyncio.gather(*(_greedy(engine, p, max_tokens) for p in prompts))
        idle = await until_idle(engine)
        for e in (solo, engine):
            await e.stop()
        return expected, got, seen, idle, engine

    expected, got, seen, idle, engine = asyncio.run(main())
    assert got == expected
    per_token = engine.kv.geometry.bytes_per_token
    assert seen and max(running for _, running, _ in seen) >= 2  # it did batch
    widest = max(capacity for _, _, capacity in seen)
    for memory, running, capacity in seen:
        kv = memory["kv_decode"] + memory["kv_prefill"] + memory["prefix_cache"]
        # the decode arena's rounding (rows to ROW_QUANTUM, tokens to 64 with up to 2 x 64 kept), at the
        # largest shape it held (it is kept while rows leave), is the stated slack
        slack = (ROW_QUANTUM - 1) * widest * per_token + engine.config.max_batch_size * 2 * GROWTH_QUANTUM * per_token
        assert kv <= memory["kv_budget"] + slack, (memory, running)
        assert memory["prefix_cache"] <= memory["kv_budget"] * 0.5
    assert idle.memory["kv_decode"] == 0 and idle.memory["kv_prefill"] == 0  # the burst's buffer is gone
    assert 0 < idle.memory["prefix_cache"] <= idle.memory["kv_budget"] // 2
    assert idle.memory["weights"] > 0


async def _started(engine_dir, **options):
    engine = load_engine(engine_dir, **options)
    await engine.start()
    return engine


# ---- /metrics ---------------------------------------------------------------------------------------
def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_export_process_memory_and_kv_bytes_consistent_with_the_engine(tiny_engine):
    """The app as ``toolkit serve`` builds it (memory options included) over a tiny engine: resident bytes, KV
    budget and bytes by part agree with the engine's own numbers."""
    import httpx
    from fake_engine import LiveServer

    from toolkit.server.serve import build_app

    engine_dir = tiny_engine(QWEN, "fp32", "gqa")
    budget = 64 << 20
    app = build_app([engine_dir], [], grace_s=1.0, memory={"kv_budget_bytes": budget, "prefix_cache_share": 0.25})
    with LiveServer(app) as live:
        engine = app.state.ctx.models.resolve(QWEN.name).engine
        response = httpx.post(f"{live.base_url}/v1/completions", timeout=60, json={
            "model": QWEN.name, "prompt": "Tell me about the weather. " * 8, "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        asyncio.run(until_idle(engine))
        samples = _samples(httpx.get(f"{live.base_url}/metrics", timeout=30).text)
        memory = engine.stats().memory
    model = next(labels for name, labels in samples if name == "toolkit_kv_cache_budget_bytes")  # the one model
    assert samples[("process_resident_memory_bytes", ())] > memory["weights"]  # the process holds at least its model
    assert samples[("toolkit_kv_cache_budget_bytes", model)] == memory["kv_budget"] == engine.kv.budget_bytes
    assert budget - engine.kv.block_bytes < memory["kv_budget"] <= budget  # --kv-cache-gib reached the engine
    assert engine.scheduler.prefix_cache.max_blocks == engine.kv.total_blocks // 4  # and the prefix share
    assert samples[("toolkit_model_weights_bytes", model)] == memory["weights"] > 0
    parts = {part: samples[("toolkit_kv_cache_allocated_bytes", (*model, ("part", part)))]
             for part in ("kv_decode", "kv_prefill", "prefix_cache")}
    assert parts == {part: memory[part] for part in parts}
    assert parts["kv_decode"] == 0 and parts["prefix_cache"] > 0  # idle: the batch is empty, the prompt is cached
    assert sum(parts.values()) <= memory["kv_budget"]
    assert samples[("toolkit_malloc_free_bytes", ())] >= 0


# ---- the onnxruntime arena option ---------------------------------------------------------------------
ARENA_CHECK = """
import sys, numpy as np
from pathlib import Path
from toolkit.runtime.gqa_runner import GqaModelRunner
model = Path(sys.argv[1]) / "model.onnx"
runners = [GqaModelRunner(model, 1, 256) for _ in range(2)]  # two sessions: a shared arena serves both
logits = [r.prefill([1, 2, 3, 4, 5], None, 0)[0] for r in runners]
np.save(sys.argv[2], np.stack(logits))
"""


def test_arena_off_and_shared_capped_arena_compute_the_same_logits(tiny_engine, tmp_path):
    import os
    import subprocess
    import sys

    from toolkit.artifact.onnx_session import ARENA_ENV, arena_mib

    engine_dir = tiny_engine(QWEN, "fp32", "gqa")
    results = {}
    for setting in ("", "0", "64"):  # onnxruntime's own arena, none, one shared arena of 64 MiB (process-wide: subprocesses)
        out = tmp_path / f"logits{setting or 'default'}.npy"
        env = {**os.environ, ARENA_ENV: setting}
        subprocess.run([sys.executable, "-c", ARENA_CHECK, str(engine_dir), str(out)], env=env, check=True, timeout=300)
        results[setting] = np.load(out)
    for setting in ("0", "64"):
        assert np.array_equal(results[setting], results[""])
    assert arena_mib("") is None and arena_mib("0") == 0 and arena_mib("512") == 512
    with pytest.raises(ValueError, match=ARENA_ENV):
        arena_mib("-1")


def test_sessions_cache_no_memory_pattern_per_input_shape(tiny_engine):
    """onnxruntime keeps one memory pattern per combination of input shapes, never evicted, and a server's
    shapes change every step (artifact/onnx_session.py's docstring): the sessions it serves with have them off."""
    from toolkit.runtime.model_runner import create_runner

    runner = create_runner("gqa", tiny_engine(QWEN, "fp32", "gqa") / "model.onnx", 1, 256)
    assert runner.session.get_session_options().enable_mem_pattern is False
