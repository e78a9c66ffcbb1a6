"""OnnxEngine correctness on tiny engines: batching, seeds, n, stop strings, abort, overload, faults."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import until_idle

from toolkit.export.golden import Reference
from toolkit.recipes import all_recipes, get_recipe
from toolkit.runtime import load_engine
from toolkit.runtime.errors import EngineFailureError, OverloadedError, PromptTooLongError
from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.scheduler import SchedulerConfig
from toolkit.runtime.types import GenerateRequest

GREEDY = dict(temperature=0, ignore_eos=True)
GRAPHS = ("optimum", "gqa")


async def collect(engine, request):
    """All token ids / text / finish reasons per choice of one request."""
    tokens, texts, reasons = {}, {}, {}
    async for out in await engine.generate(request):
        for c in out.choices:
            tokens.setdefault(c.index, []).extend(c.token_ids)
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return tokens, texts, reasons


async def started(engine_dir, **options):
    engine = load_engine(engine_dir, **options)
    await engine.start()
    return engine


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("recipe_name", [r.name for r in all_recipes()])
def test_batched_staggered_greedy_equals_reference(recipe_name, graph, tiny_engine):
    engine_dir = tiny_engine(get_recipe(recipe_name), "fp32", graph)
    reference = Reference.load(engine_dir)

    async def main():
        engine = await started(engine_dir, config=SchedulerConfig(max_batch_size=4, max_num_tokens=64))

        async def one(case, delay):
            await asyncio.sleep(delay)
            request = GenerateRequest(prompt_ids=case.prompt_ids, params=SamplingParams(max_tokens=32, **GREEDY))
            return (await collect(engine, request))[0][0]

        batched = await asyncio.gather(*[one(c, 0.005 * i) for i, c in enumerate(reference.cases)])
        alone = [await one(c, 0) for c in reference.cases[:2]]
        await engine.stop()
        return batched, alone

    batched, alone = asyncio.run(main())
    assert batched == [c.greedy_ids for c in reference.cases]
    assert alone == batched[:2]


def test_seed_reproducible_alone_and_in_busy_batch(tiny_engine):
    engine_dir = tiny_engine(get_recipe("qwen2-7b-instruct"), "fp32")
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)

    async def main():
        engine = await started(engine_dir)
        request = lambda: GenerateRequest(engine.prompts.encode(prompt="Tell me a joke"), params)  # noqa: E731
        alone = (await collect(engine, request()))[0][0]
        noise = [
            GenerateRequest(engine.prompts.encode(prompt=f"noise {i}"), params=SamplingParams(max_tokens=30, temperature=1.2, ignore_eos=True))
            for i in range(5)
        ]
        results = await asyncio.gather(*[collect(engine, r) for r in noise[:3]], collect(engine, request()), *[collect(engine, r) for r in noise[3:]])
        other_seed = (await collect(engine, GenerateRequest(engine.prompts.encode(prompt="Tell me a joke"), params=params.replace(seed=99))))[0][0]
        await engine.stop()
        return alone, results[3][0][0], other_seed

    alone, busy, other = asyncio.run(main())
    assert alone == busy
    assert alone != other


@pytest.mark.parametrize("graph", GRAPHS)
def test_n_choices_share_one_prefill(graph, tiny_engine):
    engine_dir = tiny_engine(get_recipe("gemma-7b-it"), "fp32", graph)

    async def main():
        engine = await started(engine_dir)
        calls = []
        original = engine.runner.prefill
        engine.runner.prefill = lambda ids, past, start, **kw: calls.append(len(ids)) or original(ids, past, start, **kw)
        params = SamplingParams(max_tokens=16, temperature=1.0, n=3, seed=7, ignore_eos=True)
        tokens, _, reasons = await collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hello there"), params=params))
        await engine.stop()
        return calls, tokens, reasons

    calls, tokens, reasons = asyncio.run(main())
    assert len(calls) == 1
    assert sorted(tokens) == [0, 1, 2] and all(len(t) == 16 for t in tokens.values())
    assert len({tuple(t) for t in tokens.values()}) > 1
    assert reasons == {0: "length", 1: "length", 2: "length"}


def test_stop_string_across_tokens_is_never_emitted(tiny_engine):
    engine_dir = tiny_engine(get_recipe("qwen2-7b-instruct"), "fp32")

    async def main():
        engine = await started(engine_dir)
        base = SamplingParams(max_tokens=32, **GREEDY)
        tokens, texts, _ = await collect(engine, GenerateRequest(engine.prompts.encode(prompt="What is the capital of France?"), params=base))
        full = texts[0]
        stop = full[10:14]
        pieces = []
        async for out in await engine.generate(
            GenerateRequest(engine.prompts.encode(prompt="What is the capital of France?"), params=base.replace(stop=(stop,)))
        ):
            pieces.extend((c.text, c.finish_reason) for c in out.choices)
        await engine.stop()
        return full, stop, pieces

    full, stop, pieces = asyncio.run(main())
    text = "".join(p for p, _ in pieces)
    assert text == full[: full.index(stop)]
    assert pieces[-1][1] == "stop"
    assert all(stop not in p for p, _ in pieces)


@pytest.mark.parametrize("graph", GRAPHS)
def test_chunked_prefill_keeps_decoding_and_matches(graph, tiny_engine):
    engine_dir = tiny_engine(get_recipe("codellama-70b-instruct"), "fp32", graph)
    reference = Reference.load(engine_dir)
    long_case = max(reference.cases, key=lambda c: len(c.prompt_ids))

    async def main():
        engine = await started(engine_dir, config=SchedulerConfig(max_batch_size=4, max_num_tokens=8))
        plans = []
        engine.fault_hook = plans.append
        prefill = engine.runner.prefill

        def recording(ids, past, start, logits=True, **lora):  # which chunks ask for their logits
            chunks.append((start + len(ids), logits))
            return prefill(ids, past, start, logits=logits, **lora)

        engine.runner.prefill = recording
        first_request = GenerateRequest(prompt_ids=reference.cases[0].prompt_ids, params=SamplingParams(max_tokens=400, **GREEDY))
        first = asyncio.create_task(collect(engine, first_request))
        await asyncio.sleep(0.01)
        second = await collect(engine, GenerateRequest(prompt_ids=long_case.prompt_ids, params=SamplingParams(max_tokens=32, **GREEDY)))
        await first
        await engine.stop()
        return plans, (await first)[0][0], second[0][0]

    chunks = []
    plans, first, second = asyncio.run(main())
    assert first[:32] == reference.cases[0].greedy_ids and second == long_case.greedy_ids
    ends = {len(reference.cases[0].prompt_ids), len(long_case.prompt_ids)}
    assert len(chunks) > 2 and all(wanted == (end in ends) for end, wanted in chunks), chunks  # only last chunks
    assert all(sum(stop - start for _, start, stop in p.prefill) <= 8 for p in plans)
    assert any(p.prefill and p.decode for p in plans), "prefill chunks never shared a step with decoding"


@pytest.mark.parametrize("graph", GRAPHS)
def test_abort_mid_generation_frees_cache(graph, tiny_engine):
    engine_dir = tiny_engine(get_recipe("gemma-7b-it"), "fp32", graph)

    async def main():
        engine = await started(engine_dir)
        stream = await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi"), params=SamplingParams(max_tokens=400, **GREEDY)))
        await stream.__anext__()
        busy = engine.stats()
        await stream.aclose()
        idle = await until_idle(engine)
        await engine.stop()
        return busy, idle

    busy, idle = asyncio.run(main())
    assert busy.running == 1 and busy.kv_cache_used_tokens > 0
    assert (idle.running, idle.waiting, idle.kv_cache_used_tokens) == (0, 0, 0)


@pytest.mark.parametrize("graph", GRAPHS)
def test_overload_raises_and_too_long_prompt_names_limits(graph, tiny_engine):
    engine_dir = tiny_engine(get_recipe("gemma-7b-it"), "fp32", graph)

    async def main():
        engine = await started(engine_dir, config=SchedulerConfig(max_batch_size=1, max_num_tokens=64, max_waiting=2))
        long = SamplingParams(max_tokens=300, **GREEDY)
        streams = [await engine.generate(GenerateRequest(engine.prompts.encode(prompt="a"), params=long))]
        await streams[0].__anext__()
        streams += [await engine.generate(GenerateRequest(engine.prompts.encode(prompt="b"), params=long)) for _ in range(2)]
        with pytest.raises(OverloadedError):
            await engine.generate(GenerateRequest(engine.prompts.encode(prompt="c"), params=long))
        with pytest.raises(PromptTooLongError, match="context window is 512"):
            await engine.generate(GenerateRequest(engine.prompts.encode(prompt="x " * 400), params=SamplingParams(max_tokens=200)))
        for s in streams:
            await s.aclose()
        idle = await until_idle(engine)
        await engine.stop()
        return idle

    assert asyncio.run(main()).kv_cache_used_tokens == 0


def test_failed_step_fails_only_its_requests(tiny_engine):
    engine_dir = tiny_engine(get_recipe("gemma-7b-it"), "fp32")

    async def main():
        engine = await started(engine_dir)
        fail_once = {"armed": True}

        def hook(plan):
            if fail_once["armed"] and plan.decode:
                fail_once["armed"] = False
                raise RuntimeError("injected")

        engine.fault_hook = hook
        with pytest.raises(EngineFailureError, match="injected"):
            await collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hi"), params=SamplingParams(max_tokens=8, **GREEDY)))
        ok = await collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hi"), params=SamplingParams(max_tokens=8, **GREEDY)))
        idle = await until_idle(engine)
        await engine.stop()
        return ok, idle

    ok, idle = asyncio.run(main())
    assert len(ok[0][0]) == 8 and idle.kv_cache_used_tokens == 0


def test_token_bytes_are_raw_bytes(tiny_engine):
    """Byte-level pieces map back to their raw bytes, so the bytes of split characters re-join into UTF-8."""
    from toolkit.runtime.prompting import PromptBuilder, load_tokenizer

    recipe = get_recipe("qwen2-7b-instruct")
    prompts = PromptBuilder(load_tokenizer(tiny_engine(recipe, "fp32")), recipe)
    text = "おはよう 😀 hello"
    ids = prompts.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(prompts.token_bytes(i) for i in ids).decode("utf-8") == text
