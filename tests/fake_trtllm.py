"""A fake ``tensorrt_llm`` (1.2.x API surface) whose classes record how the toolkit calls them.

One fake serves both the engine builder (``LLM(**kwargs).save(dir)``, ``BuildConfig``,
``QuantConfig``, ``QuantAlgo``) and the runtime (``LLM.generate_async`` streaming scripted
``RequestOutput``-like results, ``get_stats``, ``SamplingParams``, ``GuidedDecodingParams``,
``KvCacheConfig``). Tests get an installed one through the ``fake_trtllm`` fixture (conftest.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import sys
import types
from collections import deque

import pytest

VERSION = "1.2.1"


class Recorder:
    """A stand-in class that keeps its constructor's keyword arguments."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeQuantAlgo(str, enum.Enum):
    W8A16 = "W8A16"
    W4A16 = "W4A16"


@dataclasses.dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None


class FakeCompletion:
    def __init__(self, index: int):
        self.index, self.token_ids, self.logprobs, self.finish_reason = index, [], [], None


class FakeResult:
    """A streaming ``RequestOutput``: each scripted step extends the cumulative outputs; when the script
    runs out before every output finished, it waits for ``abort()`` and then reports 'cancelled'."""

    def __init__(self, steps: list, n: int, fail_at: int | None = None):
        self.steps, self.fail_at, self.seen = deque(steps), fail_at, 0
        self.outputs = [FakeCompletion(i) for i in range(n)]
        self.finished = False
        self.abort_calls = 0
        self._aborted = asyncio.Event()

    def abort(self) -> None:
        self.abort_calls += 1
        self._aborted.set()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        if self.fail_at is not None and self.seen == self.fail_at:
            raise RuntimeError("executor died")
        if self.steps and not self.abort_calls:
            self._apply(self.steps.popleft())
        else:
            await self._aborted.wait()
            self._apply({i: ([], "cancelled") for i, o in enumerate(self.outputs) if o.finish_reason is None})
        self.seen += 1
        return self

    def _apply(self, step: dict) -> None:
        for index, (tokens, finish, *logprobs) in step.items():
            output = self.outputs[index]
            output.token_ids.extend(tokens)
            output.logprobs.extend(logprobs[0] if logprobs else [])
            output.finish_reason = finish
        self.finished = all(o.finish_reason is not None for o in self.outputs)


class FakeTrtLlm:
    """Installs ``tensorrt_llm`` modules whose classes record every call.

    Builder side: ``llms`` (each with ``kwargs``, ``saved`` and ``shutdowns``), ``build_configs``,
    ``quant_configs``. Runtime side: each ``LLM.calls`` holds ``(inputs, sampling_params, streaming)``
    of ``generate_async``; ``scripts`` are popped, one per request, into ``results``; ``stats`` is
    what ``get_stats`` returns; ``reject`` makes ``generate_async`` raise; ``fail_at`` makes a
    result's stream raise at that step.
    """

    def __init__(self) -> None:
        self.llms: list = []
        self.build_configs: list = []
        self.quant_configs: list = []
        self.results: list[FakeResult] = []
        self.scripts: list[list] = []
        self.stats: list = []
        self.reject: Exception | None = None
        self.fail_at: int | None = None
        fake = self

        class BuildConfig(Recorder):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                fake.build_configs.append(self)

        class QuantConfig(Recorder):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                fake.quant_configs.append(self)

        class LLM:
            def __init__(self, **kwargs):
                self.kwargs, self.calls, self.saved, self.shutdowns = kwargs, [], [], 0
                fake.llms.append(self)

            def save(self, engine_dir):
                self.saved.append(engine_dir)

            def generate_async(self, inputs, sampling_params=None, streaming=False):
                if fake.reject is not None:
                    raise fake.reject
                self.calls.append((inputs, sampling_params, streaming))
                script = fake.scripts.pop(0) if fake.scripts else []
                result = FakeResult(script, sampling_params.kwargs["n"], fake.fail_at)
                fake.results.append(result)
                return result

            def get_stats(self, timeout=2):
                return fake.stats

            def shutdown(self):
                self.shutdowns += 1

        self.BuildConfig, self.QuantConfig, self.LLM = BuildConfig, QuantConfig, LLM
        self.SamplingParams = type("SamplingParams", (Recorder,), {})
        self.GuidedDecodingParams = type("GuidedDecodingParams", (Recorder,), {})
        self.KvCacheConfig = type("KvCacheConfig", (Recorder,), {})

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        root = types.ModuleType("tensorrt_llm")
        root.__path__ = []  # a package, so submodule imports resolve through sys.modules
        root.__version__ = VERSION
        engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
        engine.LLM = self.LLM
        llmapi = types.ModuleType("tensorrt_llm.llmapi")
        for name in ("BuildConfig", "QuantConfig", "SamplingParams", "GuidedDecodingParams", "KvCacheConfig"):
            setattr(llmapi, name, getattr(self, name))
        llmapi.QuantAlgo = FakeQuantAlgo
        quantization = types.ModuleType("tensorrt_llm.quantization")
        quantization.QuantAlgo = FakeQuantAlgo
        root._tensorrt_engine, root.llmapi, root.quantization = engine, llmapi, quantization
        for module in (root, engine, llmapi, quantization):
            monkeypatch.setitem(sys.modules, module.__name__, module)
