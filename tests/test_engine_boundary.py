"""The engine boundary: both engines are ``Engine``s, and a request is rendered and tokenized once.

The API adapters build one immutable ``GenerateRequest`` holding the prompt ids, the resolved
``max_tokens``, the HTTP request's id and arrival time; engines take the ids as given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time

import pytest
from toolkit.recipes import get_recipe
from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.types import Engine, GenerateRequest

PROTOCOL_METHODS = ("generate", "abort", "start", "stop", "stats")


@pytest.mark.parametrize("module, name", [("toolkit.runtime.engines.onnx_engine", "OnnxEngine"),
                                          ("toolkit.runtime.engines.trtllm_engine", "TrtLlmEngine")])
def test_engine_classes_have_the_protocols_methods_and_signatures(module, name):
    import importlib

    cls = getattr(importlib.import_module(module), name)
    for method in PROTOCOL_METHODS:
        ours, protocol = getattr(cls, method), getattr(Engine, method)
        assert inspect.signature(ours) == inspect.signature(protocol), f"{name}.{method}"
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(protocol), f"{name}.{method}"
    assert isinstance(inspect.getattr_static(cls, "prompts"), property)
    assert not hasattr(cls, "count_tokens") and not hasattr(cls, "timings")


def test_generate_request_is_immutable_and_holds_ids():
    request = GenerateRequest([1, 2, 3], SamplingParams(max_tokens=4))
    assert request.prompt_ids == (1, 2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.arrival_time = 0.0  # type: ignore[misc]


def _count_encodes(monkeypatch, engine) -> list[int]:
    calls: list[int] = []
    original = engine.prompts.encode

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.prompts, "encode", counting)
    return calls


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "gemma-7b-it", "messages": [{"role": "user", "content": "once only"}]}),
    ("/v1/completions", {"model": "gemma-7b-it", "prompt": "once only"}),
    ("/client/v4/accounts/a/ai/run/@hf/google/gemma-7b-it", {"prompt": "once only"}),
    ("/client/v4/accounts/a/ai/run/@hf/google/gemma-7b-it", {"messages": [{"role": "user", "content": "once only"}]}),
])
def test_each_request_is_tokenized_once_and_stamped_at_arrival(served, monkeypatch, path, body):
    calls = _count_encodes(monkeypatch, served.gemma)
    before = time.monotonic()
    reply = served.post(path, json=body)
    assert reply.status_code == 200, reply.text
    assert len(calls) == 1  # no probe: max_tokens is derived from the same ids the engine gets
    request = served.gemma.requests_for("once only")[-1]
    assert request.request_id == reply.headers["x-request-id"]
    assert before <= request.arrival_time <= time.monotonic()


def test_default_max_tokens_is_what_the_context_leaves(served):
    """codegemma's fake has a 64-token context: without max_tokens the default shrinks to fit the prompt."""
    served.post("/v1/completions", json={"model": "codegemma-7b-it", "prompt": "one two three four five"})
    request = served.small.requests_for("one two three four five")[-1]
    assert len(request.prompt_ids) == 6 and request.params.max_tokens == 64 - 6


def test_onnx_engine_takes_ids_and_never_renders(tiny_engine):
    from toolkit.runtime import load_engine

    engine = load_engine(tiny_engine(get_recipe("gemma-7b-it"), "fp32"))

    async def main():
        await engine.start()
        assert isinstance(engine, Engine)
        request = GenerateRequest(engine.prompts.encode(prompt="Hi"), SamplingParams(max_tokens=3, temperature=0))

        def refuse(*args, **kwargs):
            raise AssertionError("the engine rendered or tokenized a prompt")

        engine.prompts.encode = engine.prompts.render = refuse  # type: ignore[method-assign]
        async with await engine.generate(request) as stream:
            outputs = [o async for o in stream]
        stats = engine.stats()
        await engine.stop()
        return outputs, stats

    outputs, stats = asyncio.run(main())
    assert outputs[-1].finished
    assert sum(len(c.token_ids) for o in outputs for c in o.choices) == 3
    assert stats.step_timings is not None and stats.step_timings.steps >= 2 and stats.step_timings.model_s > 0
