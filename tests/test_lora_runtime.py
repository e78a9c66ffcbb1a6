"""LoRA adapters per request in the ONNX engine: PyTorch + PEFT token for token, mixed batches, LRU, abort, errors."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import until_idle

from lora_fixtures import copy_engine, make_peft_adapter
from toolkit.export.golden import Reference
from toolkit.export.lora import export_lora
from toolkit.recipes import get_recipe
from toolkit.runtime import load_engine
from toolkit.runtime.errors import InvalidRequestError
from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.scheduler import SchedulerConfig
from toolkit.runtime.types import GenerateRequest

GEMMA = get_recipe("gemma-7b-it")
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def lora_engine(tiny_engine, tiny_checkpoint, tmp_path_factory):
    """Factory: graph -> (engine dir with adapters "a" (every projection) and "b" (q, v), their sources)."""
    built = {}

    def make(graph: str):
        if graph not in built:
            root = tmp_path_factory.mktemp(f"lora-{graph}")
            ckpt = tiny_checkpoint(GEMMA)
            engine = copy_engine(tiny_engine(GEMMA, "fp32", graph), root / "engine")
            export_lora(make_peft_adapter(ckpt, root / "peft-a", seed=1), engine, "a")
            export_lora(make_peft_adapter(ckpt, root / "peft-b", seed=2, targets=("q_proj", "v_proj"), b_std=0.2), engine, "b")
            built[graph] = engine
        return built[graph]

    return make


def _sources(engine_dir, names=("a", "b")):
    return {name: engine_dir / "adapters" / name for name in names}


async def _collect(engine, request):
    tokens = []
    async for out in await engine.generate(request):
        for choice in out.choices:
            tokens.extend(choice.token_ids)
    return tokens


def _request(case, adapter=None, max_tokens=32):
    return GenerateRequest(prompt_ids=case.prompt_ids, params=SamplingParams(max_tokens=max_tokens, **GREEDY), adapter=adapter)


@pytest.mark.parametrize("graph", ["optimum", "gqa"])
def test_mixed_batch_each_request_equals_its_reference(graph, lora_engine):
    """base / a / b requests in one running batch each produce exactly what they produce alone, which is
    the base reference for base rows and PyTorch fp32 + PEFT's greedy tokens for adapter rows."""
    engine_dir = lora_engine(graph)
    expected = {None: Reference.load(engine_dir)}
    for name in ("a", "b"):
        expected[name] = Reference.load(engine_dir / "adapters" / name)

    async def main():
        engine = load_engine(engine_dir, config=SchedulerConfig(max_batch_size=6, max_num_tokens=64),
                             adapters=_sources(engine_dir))
        await engine.start()
        alone = {name: await _collect(engine, _request(expected[name].cases[0], name)) for name in expected}

        async def one(name, case_index, delay):
            await asyncio.sleep(delay)
            return await _collect(engine, _request(expected[name].cases[case_index], name))

        jobs = [(name, i) for i in range(3) for name in expected]
        results = await asyncio.gather(*(one(name, i, 0.01 * k) for k, (name, i) in enumerate(jobs)))
        stats = await until_idle(engine)
        await engine.stop()
        return alone, dict(zip(jobs, results)), stats

    alone, batched, stats = asyncio.run(main())
    for name, reference in expected.items():
        assert alone[name] == reference.cases[0].greedy_ids, name
        for i in range(3):
            assert batched[(name, i)] == reference.cases[i].greedy_ids, (name, i)
    assert alone["a"] != alone[None] and alone["b"] != alone[None]  # the adapters change the output
    assert stats.kv_cache_used_tokens == 0


def test_lru_bound_abort_and_errors(lora_engine):
    engine_dir = lora_engine("optimum")
    case = Reference.load(engine_dir).cases[1]

    async def main():
        engine = load_engine(engine_dir, adapters=_sources(engine_dir), max_loras=1)
        await engine.start()
        first_a = await _collect(engine, _request(case, "a", 8))
        await _collect(engine, _request(case, "b", 8))
        assert engine.lora.loaded == ("b",)  # at most one stays loaded: "a" (least recently used) dropped
        again_a = await _collect(engine, _request(case, "a", 8))
        loads = engine.lora.loads
        # abort an adapter request mid-generation: its rows leave, its cache is freed
        stream = await engine.generate(_request(case, "b", 200))
        async for _ in stream:
            break
        await stream.aclose()
        stats = await until_idle(engine)
        with pytest.raises(InvalidRequestError, match="no LoRA adapter 'nope'"):
            await engine.generate(_request(case, "nope"))
        await engine.stop()

        base_engine = load_engine(engine_dir)  # started without adapters
        await base_engine.start()
        with pytest.raises(InvalidRequestError, match="served: none"):
            await base_engine.generate(_request(case, "a"))
        await base_engine.stop()
        return first_a, again_a, loads, stats

    first_a, again_a, loads, stats = asyncio.run(main())
    assert first_a == again_a and loads == 3
    assert stats.kv_cache_used_tokens == 0 and stats.running == 0


def test_adapter_exported_elsewhere_and_for_another_base(lora_engine, tiny_engine, tiny_checkpoint, tmp_path):
    from toolkit.artifact.lora import AdapterError

    engine_dir = lora_engine("optimum")
    ckpt = tiny_checkpoint(GEMMA)
    outside = export_lora(make_peft_adapter(ckpt, tmp_path / "peft", seed=5), engine_dir, "sql", out=tmp_path / "sql").adapter_dir
    case = Reference.load(outside).cases[0]

    async def main():
        engine = load_engine(engine_dir, adapters={"sql": outside})
        await engine.start()
        tokens = await _collect(engine, _request(case, "sql"))
        await engine.stop()
        return tokens

    assert asyncio.run(main()) == case.greedy_ids
    other = copy_engine(tiny_engine(get_recipe("default"), "fp32", "optimum"), tmp_path / "other-engine")
    export_lora(make_peft_adapter(tiny_checkpoint(get_recipe("default")), tmp_path / "peft3", seed=6), other, "x")
    engine = load_engine(engine_dir, adapters={"x": other / "adapters" / "x"})
    with pytest.raises(AdapterError, match="another base checkpoint"):
        asyncio.run(engine.start())


def test_tensorrt_llm_engine_refuses_an_adapter(fake_trtllm, tmp_path):
    """Engines that cannot serve adapters refuse a request naming one (TensorRT-LLM for now)."""
    import json

    from tiny_models import build_tokenizer
    from toolkit.artifact.manifest import Manifest
    from toolkit.runtime.engines.trtllm_engine import TrtLlmEngine

    recipe = get_recipe("qwen2-7b-instruct")
    engine_dir = tmp_path / "trt"
    build_tokenizer("chatml").save_pretrained(engine_dir)
    (engine_dir / "config.json").write_text(json.dumps({
        "build_config": {"max_seq_len": 96, "max_input_len": 95, "max_batch_size": 4, "max_num_tokens": 8192},
        "pretrained_config": {"vocab_size": 400}}))
    manifest = Manifest(recipe=recipe.name, source={}, architecture="qwen2", target="trtllm", precision="fp16",
                        context_length=96, kv_layout={}, build_key="test", export_options={"logprobs": True})
    engine = TrtLlmEngine(engine_dir, manifest, recipe)

    async def main():
        await engine.start()
        try:
            ids = engine.prompts.encode(prompt="Hi")
            with pytest.raises(InvalidRequestError, match="TensorRT-LLM engines cannot serve LoRA"):
                await engine.generate(GenerateRequest(ids, SamplingParams(max_tokens=4), adapter="a"))
        finally:
            await engine.stop()

    asyncio.run(main())
