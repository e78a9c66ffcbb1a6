"""A fake ``tensorrt_llm`` built from the record of the real 1.2.x API (``tests/data/tensorrt_llm_api.json``).

Every class the toolkit touches (``LLM``, ``BuildConfig``, ``QuantConfig``, ``QuantAlgo``, ``KvCacheConfig``,
``SamplingParams``, ``GuidedDecodingParams``) accepts exactly the keywords the record lists, and refuses any
other keyword (``TypeError`` for the dataclasses, a ``ValueError`` like pydantic's for the ``extra='forbid'``
models), a positional argument, a value of the wrong type, or a value the real class validates away. So a
toolkit call written against a wrong idea of the API fails a test here, not on a GPU.

It also reproduces the recorded behaviours the toolkit depends on:

* ``seed`` unset means seed 0: with ``invent_tokens`` and no script queued, ``generate_async`` invents tokens from
  ``random.Random(seed or 0)``, so two unseeded sampled requests stream identical tokens;
* the input-length limit: without ``LLM(enable_chunked_prefill=True)`` a prompt longer than
  ``min(max_input_len, max_num_tokens)`` (the engine's ``config.json`` build_config) is rejected by the
  runtime: the stream raises, as the C++ executor's error does;
* logprobs need ``LLM(gather_generation_logits=True)`` (``generate_async`` raises ``ValueError``);
* a streamed result's ``finish_reason`` is one of the recorded four;
* paged context FMHA (``paged_context_fmha`` behaviour): serving an engine whose ``config.json`` says
  ``plugin_config.use_paged_context_fmha`` is False with ``enable_chunked_prefill=True`` raises at
  ``LLM(...)``, as the executor's check does; KV block reuse is then silently off (``LLM.block_reuse``),
  as it is with ``gather_context_logits``. ``LLM.save`` writes the engine's ``config.json`` from its
  ``BuildConfig`` (plugin_config as a dict).

LoRA (recorded ``LoraConfig`` in ``tensorrt_llm.lora_helper``, ``LoRARequest`` in ``tensorrt_llm.executor``):
``LoraConfig`` refuses target modules outside the recorded TensorRT-LLM module names; ``LoRARequest`` refuses a
``lora_path`` that does not exist; ``generate_async(..., lora_request=...)`` refuses a request with an adapter
when the LLM was not given ``enable_lora=True`` + a ``lora_config`` (an engine without the LoRA plugin), a
``lora_path`` without a PEFT ``adapter_config.json``, or an adapter above ``max_lora_rank`` / on modules the
engine was not built for; each LLM keeps the ``lora_requests`` of its calls (None for a base request).

Builder side: ``llms`` (each with ``kwargs``, ``saved``, ``shutdowns``), ``build_configs``, ``quant_configs``.
Runtime side: each ``LLM.calls`` holds ``(inputs, sampling_params, streaming)`` of ``generate_async``;
``scripts`` are popped, one per request, into ``results``; ``stats`` is what ``get_stats`` returns
(``stats_delay_s`` makes it block, ``stats_threads`` records which thread called it); ``reject`` makes
``generate_async`` raise; ``fail_at`` makes a result's stream raise at that step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import random
import sys
import threading
import time
import types
from collections import deque
from pathlib import Path
from typing import Any

import pytest

RECORD_PATH = Path(__file__).parent / "data" / "tensorrt_llm_api.json"
RECORD: dict = json.loads(RECORD_PATH.read_text())
CLASSES: dict = RECORD["classes"]
VERSION = "1.2.1"

FakeQuantAlgo = enum.Enum("QuantAlgo", {m: m for m in CLASSES["QuantAlgo"]["members"]}, type=str)
"""``QuantAlgo`` with exactly the recorded members (a ``str`` enum, as the real ``StrEnum``)."""

FINISH_REASONS = frozenset(CLASSES["CompletionOutput"]["finish_reasons"])


class PydanticLikeError(ValueError):
    """What a pydantic model with ``extra='forbid'`` raises (``ValidationError`` is a ``ValueError``)."""


def _is_pydantic(spec: dict) -> bool:
    return "pydantic" in spec.get("kind", "")


def _check_type(cls_name: str, name: str, type_name: str, value: Any, error: type[Exception]) -> None:
    """Light type check for the scalar field types the record spells out."""
    if value is None:
        if type_name.startswith("Optional") or type_name.startswith("Union"):
            return
        if type_name in ("int", "str", "KVCacheType") or type_name.endswith("]"):
            return  # dataclass fields typed int/str whose default is None (max_seq_len, visualize_network)
        raise error(f"{cls_name}.{name}: None is not a valid {type_name}")
    base = type_name.removeprefix("Optional[").removesuffix("]") if type_name.startswith("Optional[") else type_name
    if base == "bool" and not isinstance(value, bool):
        raise error(f"{cls_name}.{name} must be a bool, got {value!r}")
    if base == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise error(f"{cls_name}.{name} must be an int, got {value!r}")
    if base == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise error(f"{cls_name}.{name} must be a float, got {value!r}")
    if base == "str" and not isinstance(value, str):
        raise error(f"{cls_name}.{name} must be a str, got {value!r}")
    if base.startswith("List[int]") and not (isinstance(value, list) and all(isinstance(v, int) for v in value)):
        raise error(f"{cls_name}.{name} must be a list of ints, got {value!r}")


def _default(value: Any) -> Any:
    return None if value == "required" else value


class Recorded:
    """Base of the recorded classes: keyword arguments only, each one listed in the record."""

    SPEC: dict = {}
    NAME = ""

    def __init__(self, *args, **kwargs):
        spec, error = self.SPEC, (PydanticLikeError if _is_pydantic(self.SPEC) else TypeError)
        if args:
            raise TypeError(f"{self.NAME}() takes keyword arguments only ({len(args)} positional given)")
        fields = spec["fields"]
        for name, value in kwargs.items():
            if name not in fields:
                raise error(f"{self.NAME}.__init__() got an unexpected keyword argument '{name}' "
                            f"(not in the recorded {VERSION} API: {RECORD_PATH.name})")
            _check_type(self.NAME, name, fields[name][0], value, error)
            allowed = RECORD["classes"].get(self.NAME, {}).get("literals", {}).get(name)
            if allowed is not None and value not in allowed:
                raise error(f"{self.NAME}.{name}={value!r} is not one of {allowed}")
        missing = [n for n, (_, d) in fields.items() if d == "required" and n not in kwargs]
        if missing:
            raise TypeError(f"{self.NAME}() missing required keyword argument(s): {', '.join(missing)}")
        self.kwargs = dict(kwargs)
        for name, (_, default) in fields.items():
            setattr(self, name, kwargs.get(name, _default(default)))
        self.validate()

    def validate(self) -> None:
        """The value checks the real class makes (overridden per class)."""


class SamplingParamsBase(Recorded):
    NAME, SPEC = "SamplingParams", CLASSES["SamplingParams"]

    def validate(self) -> None:
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")
        self.best_of = self.best_of or self.n
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if self.best_of > 1 and self.greedy:
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns.")
        if self.guided_decoding is not None and not isinstance(self.guided_decoding, GuidedDecodingParams):
            raise TypeError("guided_decoding must be a GuidedDecodingParams")

    @property
    def greedy(self) -> bool:
        """The real ``params_imply_greedy_decoding``."""
        t, p, k = self.temperature, self.top_p, self.top_k
        return (t is None and p is None and k is None) or k == 1 or p == 0.0 or t == 0


class GuidedDecodingParams(Recorded):
    NAME, SPEC = "GuidedDecodingParams", CLASSES["GuidedDecodingParams"]

    def validate(self) -> None:
        if sum(bool(getattr(self, f)) for f in self.SPEC["fields"]) > 1:
            raise ValueError("Only one guide can be used for a request")


LORA_MODULES: dict = CLASSES["LoraConfig"]["trtllm_modules_to_hf_modules"]


class LoraConfig(Recorded):
    NAME, SPEC = "LoraConfig", CLASSES["LoraConfig"]

    def validate(self) -> None:
        unknown = [m for m in self.lora_target_modules or [] if m not in LORA_MODULES]
        if unknown:
            raise ValueError(f"LoraConfig.lora_target_modules {unknown} are not TensorRT-LLM LoRA modules {sorted(LORA_MODULES)}")
        if self.max_lora_rank <= 0:
            raise ValueError("LoraConfig.max_lora_rank must be positive")


class LoRARequest(Recorded):
    NAME, SPEC = "LoRARequest", CLASSES["LoRARequest"]

    def validate(self) -> None:
        import os

        if self.lora_path is not None and not os.path.exists(self.lora_path):
            raise ValueError(f"lora_path ({self.lora_path}) does not exist.")


def _check_lora_request(llm: Any, request: Any) -> None:
    """What the executor checks of a request's adapter (the PEFT directory at lora_path, loaded by id)."""
    if not isinstance(request, LoRARequest):
        raise TypeError(f"lora_request must be a tensorrt_llm.executor.LoRARequest, got {type(request).__name__}")
    config = llm.kwargs.get("lora_config")
    if not llm.kwargs.get("enable_lora") or config is None:
        raise ValueError("this engine was built without the LoRA plugin (LLM(enable_lora=True, lora_config=...)); "
                         f"it cannot apply LoRA adapter {request.lora_name!r}")
    peft = Path(request.lora_path) / "adapter_config.json"
    if not peft.is_file():
        raise ValueError(f"LoRA {request.lora_name!r}: {peft} is missing (a Hugging Face PEFT directory is expected)")
    adapter = json.loads(peft.read_text())
    if int(adapter.get("r", 0)) > config.max_lora_rank:
        raise ValueError(f"LoRA rank {adapter.get('r')} exceeds max_lora_rank {config.max_lora_rank}")
    allowed = {LORA_MODULES[m] for m in config.lora_target_modules}
    targets = adapter.get("target_modules") or []
    if config.lora_target_modules and not set(targets) <= allowed:
        raise ValueError(f"LoRA {request.lora_name!r} targets {sorted(set(targets) - allowed)}, not built into the engine")


class PluginConfig(Recorded):
    """``BuildConfig().plugin_config``: a pydantic model with ``validate_assignment=True``, so assigning a
    name that is not a recorded field, or a value of the wrong type, raises."""

    NAME, SPEC = "PluginConfig", CLASSES["PluginConfig"]

    def __setattr__(self, name: str, value: Any) -> None:
        fields = self.SPEC["fields"]
        if name in fields:
            _check_type(self.NAME, name, fields[name][0], value, PydanticLikeError)
        elif name != "kwargs":
            raise PydanticLikeError(f'"PluginConfig" object has no field "{name}" (not in the recorded {VERSION} API)')
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.SPEC["fields"]}


def paged_context_fmha(engine_config: dict) -> bool:
    """What the runtime reads from a saved engine: ``build_config.plugin_config.use_paged_context_fmha``
    (the recorded default when the engine's config does not spell it out)."""
    plugin = (engine_config.get("build_config") or {}).get("plugin_config") or {}
    return bool(plugin.get("use_paged_context_fmha", CLASSES["PluginConfig"]["fields"]["use_paged_context_fmha"][1]))


class KvCacheConfig(Recorded):
    NAME, SPEC = "KvCacheConfig", CLASSES["KvCacheConfig"]

    def validate(self) -> None:
        window = self.max_attention_window
        if window is not None and (not window or any(not isinstance(w, int) or w <= 0 for w in window)):
            raise PydanticLikeError(f"max_attention_window must be a non-empty list of positive ints, got {window!r}")
        if self.free_gpu_memory_fraction is not None and not 0 <= self.free_gpu_memory_fraction <= 1:
            raise PydanticLikeError("free_gpu_memory_fraction must be in [0, 1]")


@dataclasses.dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None


class FakeCompletion:
    """A ``CompletionOutput`` with the recorded attributes (cumulative token_ids / logprobs)."""

    def __init__(self, index: int):
        for name, (_, default) in CLASSES["CompletionOutput"]["fields"].items():
            setattr(self, name, list(default) if isinstance(default, list) else _default(default))
        self.index = index

    @property
    def length(self) -> int:
        return len(self.token_ids)


class FakeResult:
    """A streaming ``RequestOutput``: each scripted step extends the cumulative outputs; when the script
    runs out before every output finished, it waits for ``abort()`` and then reports 'cancelled'."""

    def __init__(self, steps: list, n: int, fail_at: int | None = None, error: str | None = None,
                 prompt_ids: list[int] | None = None):
        self.steps, self.fail_at, self.error, self.seen = deque(steps), fail_at, error, 0
        self.outputs = [FakeCompletion(i) for i in range(n)]
        self.prompt_token_ids = list(prompt_ids or [])
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
        if self.error is not None:
            raise RuntimeError(self.error)
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
            if finish is not None and finish not in FINISH_REASONS:
                raise AssertionError(f"script uses finish_reason {finish!r}, not one of the recorded {sorted(FINISH_REASONS)}")
            output = self.outputs[index]
            output.token_ids.extend(tokens)
            output.logprobs.extend(logprobs[0] if logprobs else [])
            output.finish_reason = finish
        self.finished = all(o.finish_reason is not None for o in self.outputs)


def _invented_steps(prompt_ids: list[int], params: SamplingParamsBase, vocab: int) -> list[dict]:
    """Tokens TensorRT-LLM would produce without a script: greedy ones depend on the prompt only; sampled
    ones on the seed, which is 0 when unset (the recorded ``seed_default``)."""
    seed = 0 if params.seed is None else params.seed
    if params.greedy:
        rng = random.Random(sum(prompt_ids))
    else:
        rng = random.Random(seed)
    count = min(int(params.max_tokens), 16)
    low = min(32, vocab - 1)
    steps = []
    for i in range(count):
        step = {j: ([rng.randrange(low, vocab)], "length" if i == count - 1 else None) for j in range(params.n)}
        steps.append(step)
    return steps


class FakeTrtLlm:
    """Installs ``tensorrt_llm`` modules whose recorded classes check and keep every call."""

    def __init__(self) -> None:
        self.llms: list = []
        self.build_configs: list = []
        self.quant_configs: list = []
        self.results: list[FakeResult] = []
        self.scripts: list[list] = []
        self.stats: list = []
        self.stats_delay_s = 0.0
        self.stats_threads: list[int] = []
        self.reject: Exception | None = None
        self.fail_at: int | None = None
        self.invent_tokens = False
        fake = self

        class BuildConfig(Recorded):
            NAME, SPEC = "BuildConfig", CLASSES["BuildConfig"]

            def validate(self):
                if "plugin_config" not in self.kwargs:  # the recorded default: a fresh PluginConfig()
                    self.plugin_config = PluginConfig()
                elif not isinstance(self.plugin_config, PluginConfig):
                    raise TypeError("BuildConfig.plugin_config must be a tensorrt_llm PluginConfig")
                if self.kwargs.get("lora_config") is not None and not isinstance(self.lora_config, LoraConfig):
                    raise TypeError("BuildConfig.lora_config must be a tensorrt_llm LoraConfig")
                if self.max_seq_len is not None and self.max_input_len > self.max_seq_len:
                    raise ValueError("max_input_len should not exceed max_seq_len")
                fake.build_configs.append(self)

        class QuantConfig(Recorded):
            NAME, SPEC = "QuantConfig", CLASSES["QuantConfig"]

            def validate(self):
                for name in ("quant_algo", "kv_cache_quant_algo"):
                    value = getattr(self, name)
                    if value is not None and not isinstance(value, FakeQuantAlgo):
                        raise PydanticLikeError(f"QuantConfig.{name} must be a QuantAlgo, got {value!r}")
                fake.quant_configs.append(self)

        class SamplingParams(SamplingParamsBase):
            pass

        class LLM(Recorded):
            NAME, SPEC = "LLM", CLASSES["LLM"]

            def validate(self):
                for name, cls in (("build_config", BuildConfig), ("quant_config", QuantConfig),
                                  ("kv_cache_config", KvCacheConfig), ("lora_config", LoraConfig)):
                    value = self.kwargs.get(name)
                    if value is not None and not isinstance(value, cls):
                        raise PydanticLikeError(f"LLM {name} must be a {cls.NAME}, got {type(value).__name__}")
                self.calls, self.saved, self.shutdowns, self.lora_requests = [], [], 0, []
                self.engine_config = fake.engine_config(self.kwargs["model"])
                paged = paged_context_fmha(self.engine_config)
                if self.engine_config and self.enable_chunked_prefill and not paged:
                    raise RuntimeError("[TensorRT-LLM][ERROR] Chunked context requires context FMHA, paged kv_cache "
                                       "and paged context FMHA all enabled at the same time.")
                kv = self.kwargs.get("kv_cache_config")  # the recorded default: KvCacheConfig()
                context_logits = bool((self.engine_config.get("build_config") or {}).get("gather_context_logits"))
                # the executor's fixExecutorConfig: reuse silently off without paged context FMHA / with context logits
                self.block_reuse = (kv.enable_block_reuse if kv is not None else True) and paged and not context_logits
                fake.llms.append(self)

            def input_limit(self) -> int:
                """The runtime's prompt limit for this engine (the recorded ``input_length_limit``)."""
                build = self.engine_config.get("build_config") or {}
                max_input = int(build.get("max_input_len") or CLASSES["BuildConfig"]["fields"]["max_input_len"][1])
                max_num_tokens = int(build.get("max_num_tokens") or CLASSES["BuildConfig"]["fields"]["max_num_tokens"][1])
                return max_input if self.enable_chunked_prefill else min(max_input, max_num_tokens)

            def save(self, engine_dir):
                """Writes the engine's ``config.json`` (its build_config, plugin_config as a dict), as the real save does."""
                self.saved.append(engine_dir)
                build = self.kwargs.get("build_config")
                if build is not None and Path(engine_dir).is_dir():
                    config = {k: v for k, v in build.kwargs.items() if k not in ("plugin_config", "lora_config")}
                    config["plugin_config"] = build.plugin_config.to_dict()
                    (Path(engine_dir) / "config.json").write_text(json.dumps({"version": VERSION, "build_config": config}))

            def generate_async(self, inputs, sampling_params=None, lora_request=None, streaming=False):
                if fake.reject is not None:
                    raise fake.reject
                if not isinstance(sampling_params, SamplingParams):
                    raise TypeError("sampling_params must be a tensorrt_llm SamplingParams")
                if lora_request is not None:
                    _check_lora_request(self, lora_request)
                self.lora_requests.append(lora_request)
                if sampling_params.logprobs and not self.gather_generation_logits:
                    raise ValueError("`sampling_params.logprobs` requires `gather_generation_logits=True` "
                                     "to be passed explicitly to the `LLM()` constructor.")
                self.calls.append((inputs, sampling_params, streaming))
                error = None
                if len(inputs) > self.input_limit():
                    error = (f"Prompt length ({len(inputs)}) exceeds maximum input length ({self.input_limit()}); "
                             "set enable_chunked_prefill to allow longer prompts")
                vocab = int((self.engine_config.get("pretrained_config") or {}).get("vocab_size") or 1000)
                if fake.scripts:
                    script = fake.scripts.pop(0)
                elif fake.invent_tokens:
                    script = _invented_steps(list(inputs), sampling_params, vocab)
                else:
                    script = []  # streams nothing until aborted

                result = FakeResult(script, sampling_params.n, fake.fail_at, error, list(inputs))
                fake.results.append(result)
                return result

            def get_stats(self, timeout=2):
                fake.stats_threads.append(threading.get_ident())
                if fake.stats_delay_s:
                    time.sleep(fake.stats_delay_s)
                return fake.stats

            def shutdown(self):
                self.shutdowns += 1

        self.BuildConfig, self.QuantConfig, self.LLM, self.SamplingParams = BuildConfig, QuantConfig, LLM, SamplingParams
        self.GuidedDecodingParams = GuidedDecodingParams
        self.KvCacheConfig, self.PluginConfig = KvCacheConfig, PluginConfig
        self.LoraConfig, self.LoRARequest = LoraConfig, LoRARequest

    @staticmethod
    def engine_config(model: Any) -> dict:
        """The engine directory's ``config.json`` (an engine dir), else {} (a checkpoint being built)."""
        try:
            config = json.loads((Path(str(model)) / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) and "build_config" in config else {}

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
        plugin = types.ModuleType("tensorrt_llm.plugin")
        plugin.PluginConfig = PluginConfig
        lora_helper = types.ModuleType("tensorrt_llm.lora_helper")
        lora_helper.LoraConfig = LoraConfig
        executor = types.ModuleType("tensorrt_llm.executor")
        executor.LoRARequest = LoRARequest
        root._tensorrt_engine, root.llmapi, root.quantization = engine, llmapi, quantization
        root.lora_helper, root.executor, root.plugin = lora_helper, executor, plugin
        for module in (root, engine, llmapi, quantization, lora_helper, executor, plugin):
            monkeypatch.setitem(sys.modules, module.__name__, module)
