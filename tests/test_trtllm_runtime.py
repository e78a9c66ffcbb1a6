"""TensorRT-LLM runtime: sampling mapping, streaming engine and validation runner against a fake
``tensorrt_llm``, plus a real build → validate → stream run on a GPU machine."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from fake_trtllm import FakeLogprob, FakeTrtLlm
from gpu_check import trtllm_gpu_skip_reason

from toolkit.artifact.manifest import Manifest
from toolkit.artifact.trtllm import TRTLLM_MISSING_MESSAGE, TrtLlmUnavailableError
from toolkit.export.trtllm_runner import TrtLlmRunner
from toolkit.recipes import all_recipes, get_recipe
from toolkit.recipes.chat_format import render_chat
from toolkit.runtime.engines import trtllm_sampling
from toolkit.runtime.engines.trtllm_engine import TrtLlmEngine
from toolkit.runtime.engines.trtllm_sampling import (
    SUPPORT_TABLE,
    build_trtllm_sampling_params,
    to_trtllm_sampling_kwargs,
)
from toolkit.runtime.errors import (
    EngineFailureError,
    EngineStoppedError,
    InvalidRequestError,
    OverloadedError,
    PromptTooLongError,
)
from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.types import GenerateRequest

FIXED = {"include_stop_str_in_output": True, "detokenize": False}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
MESSAGES = [{"role": "user", "content": "Hi!"}]
REPLY = "Hello! How can I help?"
VOCAB = 400  # tiny_models.build_tokenizer's vocabulary

# ---- the sampling mapping ------------------------------------------------------------------------

MAPPING_CASES = {
    "greedy": (
        SamplingParams(temperature=0.0, max_tokens=16),
        {"max_tokens": 16, "n": 1, "top_k": 1, "stop_token_ids": [1, 5], "ignore_eos": False},
    ),
    "greedy-n3-runs-once": (
        SamplingParams(temperature=0.0, n=3, max_tokens=4, repetition_penalty=1.2),
        {"max_tokens": 4, "n": 1, "top_k": 1, "repetition_penalty": 1.2, "stop_token_ids": [1, 5], "ignore_eos": False},
    ),
    "top_k-1-is-greedy": (
        SamplingParams(temperature=0.8, top_k=1, n=2),
        {"max_tokens": 256, "n": 1, "top_k": 1, "stop_token_ids": [1, 5], "ignore_eos": False},
    ),
    "default-sampling": (
        SamplingParams(),
        {"max_tokens": 256, "n": 1, "temperature": 1.0, "top_p": 1.0, "stop_token_ids": [1, 5], "ignore_eos": False},
    ),
    "full-sampling": (
        SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
                       presence_penalty=0.5, frequency_penalty=-0.25),
        {"max_tokens": 64, "n": 1, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
         "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.25,
         "stop_token_ids": [1, 5], "ignore_eos": False},
    ),
    "stop": (
        SamplingParams(stop=("\n\n", "END"), stop_token_ids=(7, 5)),
        {"max_tokens": 256, "n": 1, "temperature": 1.0, "top_p": 1.0, "stop": ["\n\n", "END"],
         "stop_token_ids": [7, 5, 1], "ignore_eos": False},
    ),
    "seed": (
        SamplingParams(seed=1234, temperature=0.5),
        {"max_tokens": 256, "n": 1, "temperature": 0.5, "top_p": 1.0, "seed": 1234, "stop_token_ids": [1, 5],
         "ignore_eos": False},
    ),
    "n2": (
        SamplingParams(n=2, temperature=0.9),
        {"max_tokens": 256, "n": 2, "temperature": 0.9, "top_p": 1.0, "stop_token_ids": [1, 5], "ignore_eos": False},
    ),
    "logprobs-top5": (
        SamplingParams(logprobs=True, top_logprobs=5),
        {"max_tokens": 256, "n": 1, "temperature": 1.0, "top_p": 1.0, "stop_token_ids": [1, 5], "ignore_eos": False,
         "logprobs": 5},
    ),
    "logprobs-only": (
        SamplingParams(logprobs=True, temperature=0.0),
        {"max_tokens": 256, "n": 1, "top_k": 1, "stop_token_ids": [1, 5], "ignore_eos": False, "logprobs": 1},
    ),
    "json_schema": (
        SamplingParams(json_schema=SCHEMA, temperature=0.0),
        {"max_tokens": 256, "n": 1, "top_k": 1, "stop_token_ids": [1, 5], "ignore_eos": False,
         "guided_decoding": {"json": SCHEMA}},
    ),
    "json_object": (
        SamplingParams(json_object=True),
        {"max_tokens": 256, "n": 1, "temperature": 1.0, "top_p": 1.0, "stop_token_ids": [1, 5], "ignore_eos": False,
         "guided_decoding": {"json_object": True}},
    ),
    "ignore_eos": (
        SamplingParams(ignore_eos=True, stop_token_ids=(9,), max_tokens=32),
        {"max_tokens": 32, "n": 1, "temperature": 1.0, "top_p": 1.0, "stop_token_ids": [9], "ignore_eos": True},
    ),
}


@pytest.mark.parametrize(("params", "expected"), list(MAPPING_CASES.values()), ids=list(MAPPING_CASES))
def test_exact_trtllm_sampling_kwargs(params: SamplingParams, expected: dict) -> None:
    assert to_trtllm_sampling_kwargs(params, eos_ids=[5, 1]) == {**expected, **FIXED}


class _Recorder:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _module(sampling_cls=None) -> types.SimpleNamespace:
    sampling_cls = sampling_cls or type("SamplingParams", (_Recorder,), {})
    return types.SimpleNamespace(SamplingParams=sampling_cls, GuidedDecodingParams=type("Guided", (_Recorder,), {}))


@pytest.mark.parametrize(("params", "expected"), list(MAPPING_CASES.values()), ids=list(MAPPING_CASES))
def test_build_passes_the_mapping_to_trtllm_classes(params: SamplingParams, expected: dict) -> None:
    built = build_trtllm_sampling_params(_module(), params, eos_ids=[5, 1], prompt_len=12)
    kwargs = dict(built.kwargs)
    guided = kwargs.pop("guided_decoding", None)
    expected = dict(expected)
    if "guided_decoding" in expected:
        assert type(guided).__name__ == "Guided" and guided.kwargs == expected.pop("guided_decoding")
    else:
        assert guided is None
    if "seed" not in expected and "top_k" not in expected or expected.get("top_k", 0) > 1 and "seed" not in expected:
        seed = kwargs.pop("seed")  # an unseeded sampled request gets a fresh random seed (TensorRT-LLM's unset seed is 0)
        assert isinstance(seed, int) and 0 <= seed < 2**63
    assert kwargs == {**expected, **FIXED}  # no prompt_ignore_length: this SamplingParams has no such field


def test_prompt_ignore_length_only_where_the_release_has_it() -> None:
    names = ["max_tokens", "n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "stop_token_ids",
             "ignore_eos", "include_stop_str_in_output", "detokenize", "prompt_ignore_length"]
    newer = dataclasses.make_dataclass("SamplingParams", [(n, object, None) for n in names], kw_only=True)
    penalised = SamplingParams(presence_penalty=0.5, frequency_penalty=0.1)
    assert build_trtllm_sampling_params(_module(newer), penalised, prompt_len=12).prompt_ignore_length == 12
    assert build_trtllm_sampling_params(_module(newer), SamplingParams(), prompt_len=12).prompt_ignore_length is None
    assert "prompt_ignore_length" not in build_trtllm_sampling_params(_module(), penalised, prompt_len=12).kwargs


def test_support_table_covers_every_sampling_field_once() -> None:
    ours = [row[0] for row in SUPPORT_TABLE]
    assert sorted(ours) == sorted(f.name for f in dataclasses.fields(SamplingParams))
    assert all(len(row) == 3 and all(isinstance(x, str) and x for x in row) for row in SUPPORT_TABLE)
    assert {row[0] for row in SUPPORT_TABLE if row[2].startswith("partial")} >= {"presence_penalty", "json_object"}
    assert trtllm_sampling.FIXED_KWARGS == FIXED


# ---- with a fake tensorrt_llm (tests/fake_trtllm.py, the ``fake_trtllm`` fixture) -------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tiny_models import build_tokenizer

    directory = tmp_path_factory.mktemp("trt-tokenizer")
    build_tokenizer("chatml").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from toolkit.runtime.prompting import load_tokenizer

    return load_tokenizer(tokenizer_dir)


RECIPE = get_recipe("qwen2-7b-instruct")


def _engine_dir(tmp_path: Path, tokenizer_dir: Path, max_seq_len: int = 96, max_batch_size: int = 4,
                max_num_tokens: int = 8192) -> Path:
    engine_dir = tmp_path / "engine"
    shutil.copytree(tokenizer_dir, engine_dir)
    config = {"build_config": {"max_seq_len": max_seq_len, "max_input_len": max_seq_len - 1,
                               "max_batch_size": max_batch_size, "max_num_tokens": max_num_tokens},
              "pretrained_config": {"vocab_size": VOCAB}}
    (engine_dir / "config.json").write_text(json.dumps(config))
    return engine_dir


def _manifest(context_length: int = 128, **options) -> Manifest:
    return Manifest(recipe=RECIPE.name, source={}, architecture="qwen2", target="trtllm", precision="fp16",
                    context_length=context_length, kv_layout={}, build_key="test",
                    export_options={"logprobs": True, **options})


def _engine(tmp_path: Path, tokenizer_dir: Path, options: dict | None = None, **kwargs) -> TrtLlmEngine:
    config = {k: kwargs.pop(k) for k in ("max_seq_len", "max_batch_size", "max_num_tokens") if k in kwargs}
    return TrtLlmEngine(_engine_dir(tmp_path, tokenizer_dir, **config), _manifest(**(options or {})), RECIPE, **kwargs)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _im_end(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


async def _collect(engine: TrtLlmEngine, request: GenerateRequest) -> list:
    return [output async for output in await engine.generate(request)]


def _run(coro):
    return asyncio.run(coro)


def _text(outputs: list, index: int = 0) -> str:
    return "".join(c.text for o in outputs for c in o.choices if c.index == index)


def _finish(outputs: list, index: int = 0) -> str | None:
    return next((c.finish_reason for o in outputs for c in o.choices if c.index == index and c.finish_reason), None)


# ---- engine: streaming ----------------------------------------------------------------------------


def test_streams_token_by_token_and_maps_everything(fake_trtllm: FakeTrtLlm, tmp_path: Path, tokenizer_dir, tokenizer):
    reply = _ids(tokenizer, REPLY)
    fake_trtllm.scripts.append([{0: ([t], None)} for t in reply] + [{0: ([_im_end(tokenizer)], "stop")}])
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        request = GenerateRequest(engine.prompts.encode(messages=MESSAGES), SamplingParams(max_tokens=40, temperature=0.7, seed=3))
        outputs = await _collect(engine, request)
        await engine.stop()
        return outputs

    outputs = _run(scenario())
    [llm] = fake_trtllm.llms
    kv = llm.kwargs.pop("kv_cache_config")
    assert llm.kwargs == {"model": str(engine.engine_dir), "gather_generation_logits": True,
                          "guided_decoding_backend": "xgrammar", "enable_chunked_prefill": True}
    assert kv.kwargs == {"enable_block_reuse": True} and llm.block_reuse  # TensorRT-LLM's prefix caching
    prompt_ids = _ids(tokenizer, render_chat("chatml", MESSAGES))
    [(inputs, sampling, streaming)] = llm.calls
    assert (inputs, streaming) == (prompt_ids, True)
    eos = sorted({_im_end(tokenizer), tokenizer.convert_tokens_to_ids("<|endoftext|>")})
    assert sampling.kwargs == {"max_tokens": 40, "n": 1, "temperature": 0.7, "top_p": 1.0, "seed": 3,
                               "stop_token_ids": eos, "ignore_eos": False, **FIXED}
    assert [c.token_ids for o in outputs for c in o.choices] == [[t] for t in reply] + [[_im_end(tokenizer)]]
    assert _text(outputs) == REPLY and _finish(outputs) == "stop"
    assert [o.finished for o in outputs] == [False] * len(reply) + [True]
    assert outputs[-1].prompt_tokens == len(prompt_ids) and outputs[-1].completion_tokens == len(reply) + 1
    assert llm.shutdowns == 1 and fake_trtllm.results[0].abort_calls == 0


@pytest.mark.parametrize(("trt_reason", "ours"), [("length", "length"), ("stop", "stop"), ("timeout", "length")])
def test_trtllm_finish_reasons_are_mapped(fake_trtllm, tmp_path, tokenizer_dir, tokenizer, trt_reason, ours):
    fake_trtllm.scripts.append([{0: (_ids(tokenizer, "Hello"), None)}, {0: (_ids(tokenizer, "!"), trt_reason)}])
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        return await _collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(max_tokens=30)))

    outputs = _run(scenario())
    assert _text(outputs) == "Hello!" and _finish(outputs) == ours and outputs[-1].finished


def test_max_tokens_ends_with_length_even_if_trtllm_keeps_going(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    reply = _ids(tokenizer, REPLY)
    fake_trtllm.scripts.append([{0: (reply, None)}])  # one burst of 13 tokens, then TensorRT-LLM goes on
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        return await _collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(max_tokens=3)))

    outputs = _run(scenario())
    assert [c.token_ids for o in outputs for c in o.choices] == [reply[:3]]
    assert _finish(outputs) == "length" and fake_trtllm.results[0].abort_calls == 1


def test_stop_string_is_cut_by_the_toolkit_and_aborts_trtllm(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    fake_trtllm.scripts.append([{0: ([t], None)} for t in _ids(tokenizer, REPLY)])
    engine = _engine(tmp_path, tokenizer_dir)
    params = SamplingParams(stop=("can I",), max_tokens=30)

    async def scenario():
        await engine.start()
        return await _collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hi"), params))

    outputs = _run(scenario())
    assert _text(outputs) == "Hello! How " and _finish(outputs) == "stop"
    assert fake_trtllm.llms[0].calls[0][1].kwargs["stop"] == ["can I"]
    assert fake_trtllm.results[0].abort_calls == 1  # TensorRT-LLM had not stopped: the toolkit cancelled it


def test_abort_reaches_trtllm_and_ends_the_stream(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    fake_trtllm.scripts.append([{0: (_ids(tokenizer, "Hello"), None)}])  # then waits until aborted
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        request = GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(max_tokens=30))
        stream = await engine.generate(request)
        first = await anext(stream)
        await engine.abort(request.request_id)
        return [first] + [o async for o in stream]

    outputs = _run(scenario())
    assert _text(outputs) == "Hello" and _finish(outputs) == "abort" and outputs[-1].finished
    assert fake_trtllm.results[0].abort_calls == 1


def test_closing_the_stream_early_aborts(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    fake_trtllm.scripts.append([{0: (_ids(tokenizer, "Hello"), None)}])
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        stream = await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(max_tokens=30)))
        await anext(stream)
        await stream.aclose()
        for _ in range(20):
            await asyncio.sleep(0)
        return engine.stats()

    stats = _run(scenario())
    assert fake_trtllm.results[0].abort_calls == 1 and stats.running == 0


def test_n2_sampling_streams_each_choice(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    a, b = _ids(tokenizer, "Hello"), _ids(tokenizer, "How")
    fake_trtllm.scripts.append([{0: (a, None), 1: (b[:1], None)}, {1: (b[1:], "length")}, {0: ([], "stop")}])
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        return await _collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(n=2, max_tokens=30)))

    outputs = _run(scenario())
    assert fake_trtllm.llms[0].calls[0][1].kwargs["n"] == 2
    assert (_text(outputs, 0), _finish(outputs, 0)) == ("Hello", "stop")
    assert (_text(outputs, 1), _finish(outputs, 1)) == ("How", "length")
    assert [o.finished for o in outputs] == [False, False, True]
    assert outputs[-1].completion_tokens == len(a) + len(b)


def test_greedy_n2_runs_once_and_copies_the_choice(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    fake_trtllm.scripts.append([{0: (_ids(tokenizer, "Hello"), None)}, {0: ([_im_end(tokenizer)], "stop")}])
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        return await _collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(n=2, temperature=0, max_tokens=30)))

    outputs = _run(scenario())
    assert fake_trtllm.llms[0].calls[0][1].kwargs["n"] == 1
    assert _text(outputs, 0) == _text(outputs, 1) == "Hello" and _finish(outputs, 1) == "stop"
    assert [c.index for c in outputs[0].choices] == [0, 1]
    assert outputs[-1].completion_tokens == 2 * (len(_ids(tokenizer, "Hello")) + 1)


def test_logprobs_and_top_logprobs(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    t1, t2 = _ids(tokenizer, "Hello")[:2]
    step1 = {t1: FakeLogprob(-0.1, 1), 7: FakeLogprob(-2.5, 2), 9: FakeLogprob(-3.0, 3)}
    step2 = {7: FakeLogprob(-0.5, 1), 9: FakeLogprob(-1.5, 2), 11: FakeLogprob(-2.0, 3), t2: FakeLogprob(-4.0, 9)}
    fake_trtllm.scripts.append([{0: ([t1, t2], None, [step1])}, {0: ([], "length", [step2])}])
    engine = _engine(tmp_path, tokenizer_dir)
    params = SamplingParams(max_tokens=30, logprobs=True, top_logprobs=2)

    async def scenario():
        await engine.start()
        return await _collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hi"), params))

    outputs = _run(scenario())
    assert fake_trtllm.llms[0].calls[0][1].kwargs["logprobs"] == 2
    deltas = [c for o in outputs for c in o.choices]
    assert [c.token_ids for c in deltas] == [[t1], [t2]]  # t2 waits for its logprob
    assert [c.finish_reason for c in deltas] == [None, "length"]
    lp1, lp2 = deltas[0].logprobs[0], deltas[1].logprobs[0]
    text = lambda t: tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    assert (lp1.token_id, lp1.token, lp1.logprob) == (t1, text(t1), -0.1)
    assert lp1.top == [(t1, text(t1), -0.1), (7, text(7), -2.5)]
    assert (lp2.token_id, lp2.logprob) == (t2, -4.0) and [t for t, _, _ in lp2.top] == [7, 9]
    assert _finish(outputs) == "length"


# ---- engine: admission, stats, failures ------------------------------------------------------------


def test_prompt_too_long_uses_the_engines_max_seq_len(fake_trtllm, tmp_path, tokenizer_dir):
    engine = _engine(tmp_path, tokenizer_dir, max_seq_len=20)
    assert engine.context_length == 20  # min(manifest 128, engine max_seq_len 20)

    async def scenario():
        await engine.start()
        prompt_len = len(engine.prompts.encode(prompt="Hi"))
        with pytest.raises(PromptTooLongError):
            await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(max_tokens=21 - prompt_len)))
        stream = await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(max_tokens=20 - prompt_len)))
        await stream.aclose()

    _run(scenario())
    assert len(fake_trtllm.llms[0].calls) == 1


def test_overload_and_stats(fake_trtllm, tmp_path, tokenizer_dir):
    fake_trtllm.stats = [{"iter": 1}, {"kvCacheStats": {"usedNumBlocks": 3, "maxNumBlocks": 10, "tokensPerBlock": 32}}]
    engine = _engine(tmp_path, tokenizer_dir, max_batch_size=1, max_waiting=1)

    async def scenario():
        await engine.start()
        assert engine.stats().kv_cache_total_tokens == 320
        streams = [await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(max_tokens=8))) for _ in range(2)]
        stats = engine.stats()
        with pytest.raises(OverloadedError):
            await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(max_tokens=8)))
        await engine.stop()
        endings = []
        for stream in streams:
            with pytest.raises(EngineStoppedError) as stopped:
                _ = [o async for o in stream]
            endings.append(type(stopped.value).__name__)
        return stats, endings

    stats, outputs = _run(scenario())
    assert (stats.running, stats.waiting, stats.kv_cache_used_tokens, stats.kv_cache_total_tokens) == (1, 1, 96, 320)
    assert stats.kv_cache_usage == pytest.approx(0.3)
    assert outputs == ["EngineStoppedError"] * 2  # stop() cancelled both: an error, never finish_reason "abort"
    assert [r.abort_calls for r in fake_trtllm.results] == [1, 1] and fake_trtllm.llms[0].shutdowns == 1


def test_rejected_request_is_invalid(fake_trtllm, tmp_path, tokenizer_dir):
    fake_trtllm.reject = ValueError("SamplingParams.n (4) should not exceed max_batch_size (2)")
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        with pytest.raises(InvalidRequestError, match="max_batch_size"):
            await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(n=4, max_tokens=8)))

    _run(scenario())


def test_failure_mid_stream_ends_with_engine_failure(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    fake_trtllm.fail_at = 1
    fake_trtllm.scripts.append([{0: (_ids(tokenizer, "Hello"), None)}, {0: ([1], None)}])
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        stream = await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(max_tokens=30)))
        assert (await anext(stream)).choices[0].text == "Hello"
        with pytest.raises(EngineFailureError, match="executor died"):
            await anext(stream)

    _run(scenario())


def test_not_started_or_stopped_engine_refuses(fake_trtllm, tmp_path, tokenizer_dir):
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        with pytest.raises(EngineStoppedError):
            await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi")))
        await engine.start()
        await engine.stop()
        with pytest.raises(EngineStoppedError):
            await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi")))

    _run(scenario())
    assert engine.stats().kv_cache_total_tokens == 0


# ---- TensorRT-LLM missing ----------------------------------------------------------------------


def test_missing_tensorrt_llm_raises_clear_error(no_trtllm, tmp_path, tokenizer_dir):
    engine = _engine(tmp_path, tokenizer_dir)
    with pytest.raises(TrtLlmUnavailableError) as info:
        _run(engine.start())
    assert str(info.value) == TRTLLM_MISSING_MESSAGE
    with pytest.raises(TrtLlmUnavailableError) as info:
        TrtLlmRunner(engine.engine_dir)
    assert str(info.value) == TRTLLM_MISSING_MESSAGE and isinstance(info.value.__cause__, ImportError)


# ---- validation runner ----------------------------------------------------------------------------


def _fake_logits(ids: list[int]) -> np.ndarray:
    """A deterministic "model": the next-token logits after ``ids`` (padded vocab of VOCAB + 16)."""
    rng = np.random.default_rng(sum((i + 1) * t for i, t in enumerate(ids)) % (2**32))
    return rng.normal(size=VOCAB + 16).astype(np.float32)


class _Out:
    def __init__(self, token_ids, generation_logits):
        self.token_ids, self.generation_logits = token_ids, generation_logits


def _fake_generate(fake: FakeTrtLlm):
    def generate(self, inputs, sampling_params=None, use_tqdm=True):
        fake.generate_calls.append((inputs, sampling_params.kwargs))
        batch = inputs if inputs and isinstance(inputs[0], list) else [inputs]
        results = []
        for ids in batch:
            tokens, rows = [], []
            for _ in range(sampling_params.kwargs["max_tokens"]):
                rows.append(_fake_logits(list(ids) + tokens))
                tokens.append(int(rows[-1][:VOCAB].argmax()))
            context = np.stack([_fake_logits(list(ids[: j + 1])) for j in range(len(ids))])
            result = types.SimpleNamespace(outputs=[_Out(tokens, np.stack(rows))], context_logits=context)
            results.append(result)
        return results if batch is inputs else results[0]

    return generate


@pytest.mark.parametrize("context_logits", [False, True])
def test_runner_greedy_and_teacher_forced(fake_trtllm, tmp_path, tokenizer_dir, context_logits):
    engine_dir = _engine_dir(tmp_path, tokenizer_dir)
    config = json.loads((engine_dir / "config.json").read_text())
    config["build_config"]["gather_context_logits"] = context_logits
    (engine_dir / "config.json").write_text(json.dumps(config))
    fake_trtllm.generate_calls = []
    fake_trtllm.LLM.generate = _fake_generate(fake_trtllm)
    prompt, continuation = [5, 6, 7], [8, 9, 10, 11]

    with TrtLlmRunner(engine_dir) as runner:
        tokens, first = runner.greedy(prompt, 4)
        forced = runner.teacher_forced(prompt, continuation)
    [llm] = fake_trtllm.llms
    assert set(llm.kwargs) == {"model", "gather_generation_logits", "kv_cache_config"}
    assert llm.kwargs["gather_generation_logits"] is True and llm.kwargs["kv_cache_config"].kwargs == {
        "enable_block_reuse": False}
    assert llm.shutdowns == 1
    greedy_kwargs = {"max_tokens": 4, "top_k": 1, "ignore_eos": True, "detokenize": False,
                     "return_generation_logits": True}
    assert fake_trtllm.generate_calls[0] == (prompt, greedy_kwargs)
    assert first.shape == (VOCAB,) and np.array_equal(first, _fake_logits(prompt)[:VOCAB])
    assert len(tokens) == 4 and tokens[0] == int(first.argmax())
    expected = np.stack([_fake_logits(prompt + continuation[:i])[:VOCAB] for i in range(len(continuation))])
    assert forced.shape == (4, VOCAB) and np.allclose(forced, expected)
    inputs, kwargs = fake_trtllm.generate_calls[1]
    if context_logits:
        assert inputs == prompt + continuation[:-1] and kwargs["return_context_logits"] is True
    else:
        assert inputs == [prompt + continuation[:i] for i in range(4)] and kwargs["max_tokens"] == 1


# ---- real TensorRT-LLM on a GPU machine -----------------------------------------------------------


def _tiny_trt_llama(directory: Path) -> Path:
    """A random 2-layer Llama with one 64-wide head (TensorRT-LLM has no head-size-16 kernels) and the
    tiny codellama70b tokenizer of ``tiny_models``, so the recipe's chat format renders real special tokens."""
    import torch
    from tiny_models import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer("codellama70b")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=512,
                         initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.gpu
def test_real_engine_exports_validates_and_streams(tmp_path: Path) -> None:
    reason = trtllm_gpu_skip_reason()
    if reason is not None:
        pytest.skip(f"needs TensorRT-LLM 1.2.x and an NVIDIA GPU: {reason}")
    from toolkit.export.pipeline import ExportRequest, run_export
    from toolkit.export.progress import StageReporter

    base = next(r for r in all_recipes() if r.architecture == "llama")
    trtllm = dataclasses.replace(base.trtllm, tensor_parallel_size={"fp16": 1, "int8": 1}, max_batch_size=4,
                                 max_num_tokens=512)
    recipe = dataclasses.replace(base, name="tiny-llama", context_window=256, trtllm=trtllm)
    checkpoint = _tiny_trt_llama(tmp_path / "ckpt")
    outcome = run_export(ExportRequest(recipe, "trtllm", "fp16", tmp_path / "engine", checkpoint), StageReporter(quiet=True))
    validation = outcome.manifest.validation
    assert validation["passed"], validation["failures"]

    engine = TrtLlmEngine(outcome.engine_dir, outcome.manifest, recipe)

    async def scenario():
        await engine.start()
        try:
            prompt_ids = engine.prompts.encode(messages=MESSAGES)
            greedy = await _collect(engine, GenerateRequest(prompt_ids, SamplingParams(max_tokens=12, temperature=0)))
            sampled = await _collect(engine, GenerateRequest(
                prompt_ids, SamplingParams(max_tokens=8, temperature=0.8, n=2, seed=1, logprobs=True, top_logprobs=3)))
            return greedy, sampled, engine.stats()
        finally:
            await engine.stop()

    greedy, sampled, stats = _run(scenario())
    tokens = [t for o in greedy for c in o.choices for t in c.token_ids]
    assert greedy[-1].finished and 1 <= len(tokens) <= 12 and _finish(greedy) in {"stop", "length"}
    assert greedy[-1].completion_tokens == len(tokens)
    for index in (0, 1):
        deltas = [c for o in sampled for c in o.choices if c.index == index]
        assert deltas[-1].finish_reason in {"stop", "length"}
        logprobs = [lp for c in deltas for lp in c.logprobs]
        assert len(logprobs) == sum(len(c.token_ids) for c in deltas)
        assert all(lp.logprob <= 0 and len(lp.top) == 3 for lp in logprobs)
    assert stats.running == 0


# ---- the Engine protocol and the offline bench ------------------------------------------------------


def test_trtllm_engine_is_an_engine(fake_trtllm, tmp_path, tokenizer_dir):
    from toolkit.runtime.types import Engine

    engine = _engine(tmp_path, tokenizer_dir)
    _run(engine.start())
    assert isinstance(engine, Engine) and engine.recipe is RECIPE and engine.prompts.vocab_size > 0
    assert engine.stats().step_timings is None  # TensorRT-LLM batches inside its own executor
    _run(engine.stop())


def test_offline_bench_runs_on_a_trtllm_engine_directory(fake_trtllm, tmp_path, tokenizer_dir):
    from toolkit.artifact.manifest import describe_files, write_manifest
    from toolkit.bench.offline import bench_offline

    engine_dir = _engine_dir(tmp_path, tokenizer_dir)
    write_manifest(engine_dir, dataclasses.replace(_manifest(), files=describe_files(engine_dir)))
    fake_trtllm.scripts.extend([[{0: ([5], None)} for _ in range(6)] for _ in range(4)])  # warm-up + 1 + 2
    results = _run(bench_offline(engine_dir, [1, 2], prompt_tokens=8, max_tokens=4, threads=None))
    assert [(r["concurrency"], r["output_tokens"], r["overhead_pct"]) for r in results] == [(1, 4, None), (2, 8, None)]
    assert [len(inputs) for inputs, _, _ in fake_trtllm.llms[0].calls] == [8, 8, 8, 8]


# ---- issue #10: the path checked against the recorded 1.2 API (tests/data/tensorrt_llm_api.json) ------


def test_unseeded_sampled_requests_differ_but_seeded_ones_repeat(fake_trtllm, tmp_path, tokenizer_dir):
    """TensorRT-LLM's unset seed is 0 (the fake reproduces it): without a drawn seed these would be equal."""
    fake_trtllm.invent_tokens = True
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        runs = {}
        for name, params in (("a", SamplingParams(max_tokens=12, temperature=1.0)),
                             ("b", SamplingParams(max_tokens=12, temperature=1.0)),
                             ("s1", SamplingParams(max_tokens=12, temperature=1.0, seed=7)),
                             ("s2", SamplingParams(max_tokens=12, temperature=1.0, seed=7))):
            outputs = await _collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hi"), params))
            runs[name] = [t for o in outputs for c in o.choices for t in c.token_ids]
        await engine.stop()
        return runs

    runs = _run(scenario())
    assert runs["a"] and runs["a"] != runs["b"]
    assert runs["s1"] == runs["s2"]
    seeds = [call[1].kwargs.get("seed") for call in fake_trtllm.llms[0].calls]
    assert seeds[2:] == [7, 7] and None not in seeds[:2] and seeds[0] != seeds[1]


def test_the_fake_reproduces_seed_zero_for_unseeded_requests(fake_trtllm):
    """The recorded behaviour itself: two SamplingParams without seed stream the same invented tokens."""
    fake_trtllm.invent_tokens = True
    llm = fake_trtllm.LLM(model="/nonexistent")
    params = lambda: fake_trtllm.SamplingParams(max_tokens=8, temperature=1.0, top_p=1.0)  # noqa: E731
    first, second = llm.generate_async([1, 2, 3], params()), llm.generate_async([1, 2, 3], params())
    assert first.steps == second.steps


def test_long_prompt_runs_with_chunked_prefill(fake_trtllm, tmp_path, tokenizer_dir):
    """max_num_tokens 16 < prompt: the runtime rejects it unless LLM(enable_chunked_prefill=True)."""
    fake_trtllm.invent_tokens = True
    engine = _engine(tmp_path, tokenizer_dir, max_num_tokens=16)
    prompt = list(range(40, 80))  # 40 tokens

    async def scenario():
        await engine.start()
        outputs = await _collect(engine, GenerateRequest(prompt, SamplingParams(max_tokens=4, temperature=0.0)))
        await engine.stop()
        return outputs

    outputs = _run(scenario())
    assert fake_trtllm.llms[0].kwargs["enable_chunked_prefill"] is True
    assert outputs[-1].finished and outputs[-1].prompt_tokens == 40 and outputs[-1].completion_tokens == 4
    assert engine.input_limit == 95  # max_input_len


def test_long_prompt_without_chunked_prefill_is_refused_naming_the_limit(fake_trtllm, tmp_path, tokenizer_dir):
    fake_trtllm.invent_tokens = True
    engine = _engine(tmp_path, tokenizer_dir, options={"enable_chunked_prefill": False}, max_num_tokens=16)

    async def scenario():
        await engine.start()
        with pytest.raises(PromptTooLongError, match="16 tokens") as refused:
            await engine.generate(GenerateRequest(list(range(40, 80)), SamplingParams(max_tokens=4)))
        ok = await _collect(engine, GenerateRequest(list(range(40, 56)), SamplingParams(max_tokens=2, temperature=0.0)))
        await engine.stop()
        return refused.value, ok

    refused, ok = _run(scenario())
    assert refused.limit == 16 and "max_num_tokens" in str(refused)
    assert "enable_chunked_prefill" not in fake_trtllm.llms[0].kwargs or not fake_trtllm.llms[0].kwargs["enable_chunked_prefill"]
    assert len(fake_trtllm.llms[0].calls) == 1  # only the 16-token prompt reached TensorRT-LLM
    assert ok[-1].finished and ok[-1].completion_tokens == 2


def test_the_fake_runtime_rejects_a_prompt_over_max_num_tokens_without_chunked_prefill(fake_trtllm, tmp_path, tokenizer_dir):
    llm = fake_trtllm.LLM(model=str(_engine_dir(tmp_path, tokenizer_dir, max_num_tokens=16)))
    result = llm.generate_async(list(range(40, 80)), fake_trtllm.SamplingParams(max_tokens=2, top_k=1), streaming=True)

    async def read():
        return [r async for r in result]

    with pytest.raises(RuntimeError, match="exceeds maximum input length"):
        _run(read())


def test_sliding_window_reaches_kv_cache_config(fake_trtllm, tmp_path, tokenizer_dir):
    windows = [512, 512, 512, 512, 512, 96]
    engine = _engine(tmp_path, tokenizer_dir, options={"max_attention_window": windows})
    _run(engine.start())
    kv = fake_trtllm.llms[0].kwargs["kv_cache_config"]
    assert isinstance(kv, fake_trtllm.KvCacheConfig) and kv.max_attention_window == windows
    _run(engine.stop())


def test_sliding_window_from_an_older_manifest_comes_from_the_engine_config(fake_trtllm, tmp_path, tokenizer_dir):
    engine_dir = _engine_dir(tmp_path, tokenizer_dir)
    config = json.loads((engine_dir / "config.json").read_text())
    config["pretrained_config"].update(num_hidden_layers=4, sliding_window=32, sliding_window_pattern=2)
    (engine_dir / "config.json").write_text(json.dumps(config))
    manifest = dataclasses.replace(_manifest(), export_options={})
    engine = TrtLlmEngine(engine_dir, manifest, RECIPE)
    _run(engine.start())
    assert fake_trtllm.llms[0].kwargs["kv_cache_config"].max_attention_window == [32, 96, 32, 96]
    _run(engine.stop())


def test_attention_windows_follow_the_checkpoint_config():
    from toolkit.artifact.trtllm import attention_windows

    gemma3 = {"num_hidden_layers": 6, "sliding_window": 512,
              "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}
    assert attention_windows(gemma3, 32768) == [512] * 5 + [32768]
    pattern = {"num_hidden_layers": 4, "sliding_window": 100, "sliding_window_pattern": 2}
    assert attention_windows(pattern, 1000) == [100, 1000, 100, 1000]
    assert attention_windows({"num_hidden_layers": 4, "sliding_window": 4096, "use_sliding_window": False}, 1000) is None
    assert attention_windows({"num_hidden_layers": 4, "sliding_window": None}, 1000) is None
    assert attention_windows({"num_hidden_layers": 2, "sliding_window": 2000, "layer_types": ["sliding_attention"] * 2}, 1000) is None


def test_engine_without_logprobs_export_refuses_logprobs(fake_trtllm, tmp_path, tokenizer_dir):
    engine = _engine(tmp_path, tokenizer_dir, options={"logprobs": False})

    async def scenario():
        await engine.start()
        errors = []
        for params in (SamplingParams(max_tokens=4, logprobs=True), SamplingParams(max_tokens=4, logprobs=True, top_logprobs=3)):
            with pytest.raises(InvalidRequestError, match="--logprobs") as refused:
                await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi"), params))
            errors.append((refused.value.param, refused.value.status))
        await engine.stop()
        return errors

    assert _run(scenario()) == [("logprobs", 400), ("top_logprobs", 400)]
    assert "gather_generation_logits" not in fake_trtllm.llms[0].kwargs and fake_trtllm.llms[0].calls == []


def test_stats_never_call_get_stats_on_the_event_loop(fake_trtllm, tmp_path, tokenizer_dir, monkeypatch):
    import threading
    import time

    from toolkit.runtime.engines import trtllm_engine

    monkeypatch.setattr(trtllm_engine, "STATS_INTERVAL_S", 0.05)
    fake_trtllm.stats = [{"kvCacheStats": {"usedNumBlocks": 1, "maxNumBlocks": 10, "tokensPerBlock": 32}}]
    fake_trtllm.stats_delay_s = 0.2  # a slow get_stats would stall every request if called on the loop
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        loop_thread = threading.get_ident()
        fake_trtllm.stats = [{"kvCacheStats": {"usedNumBlocks": 4, "maxNumBlocks": 10, "tokensPerBlock": 32}}]
        started = time.perf_counter()
        first = engine.stats()
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.6)
        later = engine.stats()
        await engine.stop()
        return loop_thread, elapsed, first, later

    loop_thread, elapsed, first, later = _run(scenario())
    assert elapsed < 0.05 and first.kv_cache_used_tokens == 32  # the cached snapshot, at once
    assert later.kv_cache_used_tokens == 128  # refreshed in the background
    assert fake_trtllm.stats_threads and loop_thread not in fake_trtllm.stats_threads


def test_trtllm_cancelling_on_its_own_is_an_engine_failure_not_abort(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    fake_trtllm.scripts.append([{0: (_ids(tokenizer, "Hello"), None)}, {0: ([], "cancelled")}])
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        stream = await engine.generate(GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(max_tokens=30)))
        first = await anext(stream)
        with pytest.raises(EngineFailureError, match="cancelled"):
            await anext(stream)
        await engine.stop()
        return first

    first = _run(scenario())
    assert first.choices[0].finish_reason is None


def test_the_fake_refuses_what_the_record_does_not_list(fake_trtllm):
    with pytest.raises(TypeError, match="unexpected keyword argument 'prompt_ignore_length'"):
        fake_trtllm.SamplingParams(max_tokens=4, prompt_ignore_length=3)
    with pytest.raises(ValueError, match="unexpected keyword argument 'enable_chunked_context'"):
        fake_trtllm.LLM(model="m", enable_chunked_context=True)
    with pytest.raises(ValueError, match="xgrammar"):
        fake_trtllm.LLM(model="m", guided_decoding_backend="outlines")
    with pytest.raises(ValueError, match="positive"):
        fake_trtllm.KvCacheConfig(max_attention_window=[512, 0])
    with pytest.raises(ValueError, match="Greedy decoding"):
        fake_trtllm.SamplingParams(n=2, top_k=1)
    with pytest.raises(ValueError, match="gather_generation_logits"):
        fake_trtllm.LLM(model="m").generate_async([1], fake_trtllm.SamplingParams(logprobs=1, top_k=1))


def test_the_stop_token_counts_but_is_not_a_logprob(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    t1, end = _ids(tokenizer, "Hello")[0], _im_end(tokenizer)
    fake_trtllm.scripts.append([{0: ([t1], None, [{t1: FakeLogprob(-0.1, 1)}])},
                                {0: ([end], "stop", [{end: FakeLogprob(-0.2, 1)}])}])
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        return await _collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hi"),
                                                      SamplingParams(max_tokens=30, logprobs=True)))

    outputs = _run(scenario())
    assert [lp.token_id for o in outputs for c in o.choices for lp in c.logprobs] == [t1]
    assert outputs[-1].completion_tokens == 2 and _finish(outputs) == "stop"


def test_logit_bias_reaches_trtllm_as_embedding_bias(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    fake_trtllm.scripts.append([{0: ([_im_end(tokenizer)], "stop")}])
    engine = _engine(tmp_path, tokenizer_dir)

    async def scenario():
        await engine.start()
        return await _collect(engine, GenerateRequest(engine.prompts.encode(prompt="Hi"),
                                                      SamplingParams(max_tokens=4, logit_bias={5: 100.0, 9: -100.0})))

    _run(scenario())
    bias = fake_trtllm.llms[0].calls[0][1].kwargs["embedding_bias"]
    assert len(bias) == engine.prompts.vocab_size and float(bias[5]) == 100.0 and float(bias[9]) == -100.0
    assert sum(float(b) != 0.0 for b in bias) == 2


def _without_paged_context_fmha(engine_dir: Path) -> None:
    config = json.loads((engine_dir / "config.json").read_text())
    config["build_config"]["plugin_config"] = {"use_paged_context_fmha": False}
    (engine_dir / "config.json").write_text(json.dumps(config))


def test_engine_built_without_paged_context_fmha_runs_without_chunked_prefill_and_reuse(fake_trtllm, tmp_path, tokenizer_dir):
    """The executor refuses chunked prefill on such an engine (and drops block reuse): serve it without both,
    with the shorter input limit, instead of failing at start."""
    engine_dir = _engine_dir(tmp_path, tokenizer_dir, max_seq_len=96, max_num_tokens=40)
    _without_paged_context_fmha(engine_dir)
    engine = TrtLlmEngine(engine_dir, _manifest(), RECIPE)
    _run(engine.start())
    [llm] = fake_trtllm.llms
    assert llm.kwargs["enable_chunked_prefill"] is False and llm.kwargs["kv_cache_config"].enable_block_reuse is False
    assert engine.input_limit == 40
    with pytest.raises(PromptTooLongError, match="max_num_tokens, no chunked prefill"):
        _run(engine.generate(GenerateRequest(list(range(41)), SamplingParams(max_tokens=4))))
    _run(engine.stop())


def test_no_prefix_cache_turns_trtllm_block_reuse_off(fake_trtllm, tmp_path, tokenizer_dir):
    engine = TrtLlmEngine(_engine_dir(tmp_path, tokenizer_dir), _manifest(), RECIPE, prefix_cache=False)
    _run(engine.start())
    [llm] = fake_trtllm.llms
    assert llm.kwargs["kv_cache_config"].enable_block_reuse is False and not llm.block_reuse
    assert llm.kwargs["enable_chunked_prefill"] is True
    _run(engine.stop())


def test_prediction_leaves_the_output_alone_and_usage_without_prediction_counts(fake_trtllm, tmp_path, tokenizer_dir, tokenizer):
    """TensorRT-LLM decodes without OpenAI's ``prediction``: the reply is the one without it, and usage has no
    ``completion_tokens_details`` instead of 0 / 0 accepted / rejected tokens (false by OpenAI's definitions,
    here where the prediction is the reply itself: all of it appeared in the completion)."""
    import httpx
    from fake_engine import LiveServer

    from toolkit.server.app import create_app

    reply = _ids(tokenizer, REPLY)
    for _ in range(2):
        fake_trtllm.scripts.append([{0: ([t], None)} for t in reply] + [{0: ([_im_end(tokenizer)], "stop")}])
    engine = _engine(tmp_path, tokenizer_dir)
    body = {"model": RECIPE.model_names[0], "messages": MESSAGES, "max_tokens": 40, "temperature": 0}
    with LiveServer(create_app({RECIPE.name: engine}, ["k"])) as live:
        answers = [httpx.post(live.base_url + "/v1/chat/completions", json={**body, **extra}, timeout=30,
                              headers={"Authorization": "Bearer k"})
                   for extra in ({}, {"prediction": {"type": "content", "content": REPLY}})]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    plain, predicted = (a.json() for a in answers)
    assert predicted["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"] == REPLY
    assert predicted["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"] == len(reply) + 1
    assert "completion_tokens_details" not in predicted["usage"]
    [llm] = fake_trtllm.llms
    assert len(llm.calls) == 2 and llm.calls[0][0] == llm.calls[1][0]  # the same inputs reached TensorRT-LLM
