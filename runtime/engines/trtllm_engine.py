"""``TrtLlmEngine``: the Engine protocol over a TensorRT-LLM 1.2.x engine directory.

TensorRT-LLM's LLM API (``tensorrt_llm._tensorrt_engine.LLM``, the TensorRT backend) does the
batching, KV cache and sampling on the GPU. The toolkit renders and tokenizes prompts itself
(recipe chat format, the engine directory's tokenizer), submits token ids with
``LLM.generate_async(prompt_ids, sampling_params=..., streaming=True)``, and turns each streamed
``RequestOutput`` (cumulative ``outputs[i].token_ids`` / ``logprobs`` / ``finish_reason``) into
deltas with its own ``IncrementalDetokenizer``, so stop strings and UTF-8 behave exactly as in the
ONNX engine. ``RequestOutput.abort()`` cancels a request; TensorRT-LLM then ends its stream with
``finish_reason='cancelled'``.

Finish reasons: TensorRT-LLM's ``stop``/``length`` pass through; its ``timeout`` (the runtime's
time budget ended the sequence) becomes ``"length"``: the text is valid but cut short, as by
max_tokens. ``cancelled`` is ``"abort"`` only for a request the toolkit aborted because its client
closed the stream (nobody reads it); a request cancelled by the engine's ``stop()`` ends with
``EngineStoppedError`` and one TensorRT-LLM cancelled by itself with ``EngineFailureError``, so a
client never receives ``"abort"`` as an OpenAI finish_reason.

Run-time options read from the manifest's export options (``export/trtllm_export.py``):
``logprobs`` (only then ``LLM(gather_generation_logits=True)``; otherwise a request for logprobs
is an ``InvalidRequestError``), ``max_attention_window`` (the per-layer sliding windows, given as
``KvCacheConfig(max_attention_window=...)``) and ``enable_chunked_prefill`` (on unless the manifest
says otherwise). Chunked prefill and KV block reuse (TensorRT-LLM's prefix caching,
``KvCacheConfig(enable_block_reuse=True)``; off with ``--no-prefix-cache``) both need an engine built with
``plugin_config.use_paged_context_fmha``: the executor refuses the first and silently drops the second
without it, so an engine whose ``config.json`` says it lacks it is served without both. A prompt longer than the runtime's input limit (``max_input_len``, and
``max_num_tokens`` too without chunked prefill) is refused with ``PromptTooLongError`` before
TensorRT-LLM would reject it mid-stream.

LoRA (issue #12): an engine exported with ``--lora-rank`` serves the adapters it is started with, each
request naming one submitted with its ``LoRARequest``; the checks, ``LoraConfig`` and requests are in
``trtllm_lora.py``. The streamed results become deltas in ``StreamConverter`` (``trtllm_stream.py``).

KV cache statistics come from ``LLM.get_stats()``, which blocks: a background task calls it in a
worker thread every ``STATS_INTERVAL_S`` and ``stats()`` returns the cached snapshot.

One asyncio task per request reads TensorRT-LLM's stream and feeds a queue that ``generate``'s
iterator drains, so ``stop()`` can end every stream even if TensorRT-LLM goes quiet.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.artifact.manifest import Manifest
from toolkit.artifact.trtllm import attention_windows, import_tensorrt_llm, read_engine_config
from toolkit.recipes import Recipe
from toolkit.runtime.engines.common import ThroughputMeter
from toolkit.runtime.engines.trtllm_lora import (adapter_ids, check_adapters, check_request_adapter, lora_config,
                                                 lora_requests)
from toolkit.runtime.engines.trtllm_sampling import build_trtllm_sampling_params
from toolkit.runtime.engines.trtllm_stream import StreamConverter
from toolkit.runtime.errors import (EngineFailureError, EngineStoppedError, InvalidRequestError,
                                    OverloadedError, PromptTooLongError)
from toolkit.runtime.types import EngineStats, GenerateRequest, OutputStream, RequestOutput

STATS_TIMEOUT_S = 0.01
STATS_INTERVAL_S = 0.5
STOP_DRAIN_S = 2.0


@dataclass
class _Active:
    converter: StreamConverter
    result: Any
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None
    aborted: bool = False
    shutdown: bool = False


def _abort_quietly(result: Any) -> None:
    try:
        result.abort()
    except Exception:  # noqa: BLE001 - the request may already be gone from the executor
        pass


def built_with_paged_context_fmha(build_config: dict) -> bool:
    """Whether the engine's ``config.json`` build_config says paged context FMHA is built in.

    Engines exported by the toolkit set it (``export.trtllm_export.PLUGIN_CONFIG``); an engine that does not
    spell it out gets the recorded pydantic PluginConfig's default, True (``tests/data/tensorrt_llm_api.json``;
    the older dataclass defaulted to False, which only an explicit False in config.json shows here).
    """
    plugins = build_config.get("plugin_config") or {}
    return bool(plugins.get("use_paged_context_fmha", True))


class TrtLlmEngine:
    """The Engine protocol over ``tensorrt_llm._tensorrt_engine.LLM(model=engine_dir)`` (needs a GPU)."""

    speculator = None
    """No drafts: OpenAI's ``prediction`` is not used (TensorRT-LLM takes external draft tokens only from
    an engine built for speculative decoding, which the export does not build). The output is the same
    either way; usage carries no prediction counts (``server.openai.routes.counts_prediction``)."""

    def __init__(self, engine_dir: Path, manifest: Manifest, recipe: Recipe, max_waiting: int = 256,
                 adapters: dict[str, Path] | None = None, max_loras: int | None = None, prefix_cache: bool = True):
        self.engine_dir, self.manifest, self.recipe = Path(engine_dir), manifest, recipe
        self.max_waiting = max_waiting
        self.model_names = recipe.model_names
        engine_config = read_engine_config(self.engine_dir)
        build = engine_config.get("build_config") or {}
        options = manifest.export_options or {}
        self.context_length = min(manifest.context_length, int(build.get("max_seq_len") or manifest.context_length))
        self.max_batch_size = int(build.get("max_batch_size") or recipe.trtllm.max_batch_size)
        self.logprobs = bool(options.get("logprobs", False))
        # both need an engine built with paged context FMHA (the executor refuses chunked prefill without it and
        # turns block reuse off): an engine whose config says it was built without runs without them
        self.paged_context_fmha = built_with_paged_context_fmha(build)
        self.chunked_prefill = bool(options.get("enable_chunked_prefill", True)) and self.paged_context_fmha
        self.block_reuse = prefix_cache and self.paged_context_fmha and not build.get("gather_context_logits")
        self.input_limit = self._input_limit(build)
        window = options.get("max_attention_window")
        if window is None:  # an older manifest: derive it from TensorRT-LLM's copy of the model config
            window = attention_windows(engine_config.get("pretrained_config") or {}, self.context_length)
        self.max_attention_window = [int(w) for w in window] if window else None
        self.lora = options.get("lora") or None  # the LoRA build options, or None: built without LoRA
        self.max_loras = max_loras
        self.adapter_sources = check_adapters(self.engine_dir, manifest, self.lora, adapters or {})
        self.adapter_ids = adapter_ids(self.adapter_sources)
        self._lora_requests: dict[str, Any] = {}
        self._stats_task: asyncio.Task | None = None
        self.llm: Any = None
        self._prompts: Any = None
        self._llmapi: Any = None
        self._active: dict[str, _Active] = {}
        self._accepting = False
        self.throughput = ThroughputMeter()
        self._kv = (0, 0)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA adapters this engine serves (``GenerateRequest.adapter``)."""
        return tuple(self.adapter_sources)

    def _input_limit(self, build: dict) -> int:
        """Longest prompt the runtime accepts: max_input_len, and max_num_tokens without chunked prefill."""
        limit = int(build.get("max_input_len") or self.context_length - 1)
        if not self.chunked_prefill:
            limit = min(limit, int(build.get("max_num_tokens") or self.recipe.trtllm.max_num_tokens))
        return limit

    def llm_kwargs(self) -> dict[str, Any]:
        """``LLM`` arguments: the engine dir (TP size comes from its config), xgrammar, chunked prefill,
        generation logits only for an engine exported with ``--logprobs``, KV block reuse (prefix caching; off
        with ``--no-prefix-cache``) and the per-layer attention windows."""
        kwargs: dict[str, Any] = {"model": str(self.engine_dir), "guided_decoding_backend": "xgrammar",
                                  "enable_chunked_prefill": self.chunked_prefill}
        if self.logprobs:
            kwargs["gather_generation_logits"] = True
        kv: dict[str, Any] = {"enable_block_reuse": self.block_reuse}  # TensorRT-LLM's prefix caching
        if self.max_attention_window:
            kv["max_attention_window"] = list(self.max_attention_window)
        kwargs["kv_cache_config"] = self._llmapi.KvCacheConfig(**kv)
        if self.lora:
            config = lora_config(self.lora, self.max_loras, len(self.adapter_sources))
            kwargs.update(enable_lora=True, lora_config=config)
        return kwargs

    async def start(self) -> None:
        """Load the tokenizer and TensorRT-LLM's executor in a worker thread (``TrtLlmUnavailableError`` without it)."""
        if self.llm is None:
            await asyncio.to_thread(self._load)
            await asyncio.to_thread(self._fetch_kv)
        self._accepting = True
        if self._stats_task is None:
            self._stats_task = asyncio.create_task(self._refresh_stats())

    def _load(self) -> None:
        from toolkit.runtime.prompting import PromptBuilder, load_tokenizer

        api = import_tensorrt_llm()
        self._llmapi = importlib.import_module("tensorrt_llm.llmapi")
        self._prompts = PromptBuilder(load_tokenizer(self.engine_dir), self.recipe)
        if self.adapter_sources:
            self._lora_requests = lora_requests(self.adapter_sources, self.adapter_ids)
        self.llm = api.LLM(**self.llm_kwargs())

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting, let requests run for ``grace_s``, abort the rest, then shut TensorRT-LLM down."""
        self._accepting = False
        await self._wait_idle(grace_s)
        for request_id, active in list(self._active.items()):
            active.shutdown = True
            await self.abort(request_id)
        await self._wait_idle(STOP_DRAIN_S)  # TensorRT-LLM answers an abort with a 'cancelled' result
        for active in list(self._active.values()):
            active.queue.put_nowait(EngineStoppedError("the engine is shutting down"))
            if active.task is not None:
                active.task.cancel()
        self._active.clear()
        if self._stats_task is not None:
            self._stats_task.cancel()
            self._stats_task = None
        if self.llm is not None:
            llm, self.llm = self.llm, None
            await asyncio.to_thread(llm.shutdown)

    async def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    @property
    def prompts(self) -> Any:
        """The recipe's chat format over this engine's tokenizer (after ``start()``)."""
        if self._prompts is None:
            raise EngineStoppedError("the engine is not started")
        return self._prompts

    async def generate(self, request: GenerateRequest) -> OutputStream:
        """Submit ``request`` and return its output stream; closing the stream early aborts it."""
        if not self._accepting or self.llm is None:
            raise EngineStoppedError("the engine is not running")
        prompt_ids = request.prompt_ids
        self._prompts.check_ids(prompt_ids)
        check_request_adapter(request.adapter, self.lora, self.adapter_sources)
        if len(prompt_ids) + request.params.max_tokens > self.context_length:
            raise PromptTooLongError(len(prompt_ids), request.params.max_tokens, self.context_length)
        if len(prompt_ids) > self.input_limit:
            what = "input limit (max_input_len)" if self.chunked_prefill else "input limit (max_num_tokens, no chunked prefill)"
            raise PromptTooLongError(len(prompt_ids), request.params.max_tokens, self.input_limit, what)
        if request.params.logprobs and not self.logprobs:
            param = "top_logprobs" if request.params.top_logprobs else "logprobs"
            raise InvalidRequestError(
                "this TensorRT-LLM engine was exported without logprobs; re-export it with "
                "`toolkit export --target trtllm --logprobs` to serve logprobs/top_logprobs", param=param)
        waiting = self._counts()[1]
        if waiting >= self.max_waiting:
            raise OverloadedError(waiting, self.max_waiting)
        result = self._submit(request)
        active = _Active(StreamConverter(request, self._prompts, self.context_length), result)
        self._active[request.request_id] = active
        active.task = asyncio.create_task(self._pump(request.request_id, active))
        return OutputStream(active.queue, lambda: self.abort(request.request_id))

    def _submit(self, request: GenerateRequest) -> Any:
        prompt_ids = list(request.prompt_ids)
        try:
            sampling = build_trtllm_sampling_params(self._llmapi, request.params, self._prompts.eos_ids, len(prompt_ids),
                                                   self._prompts.vocab_size)
            if request.adapter is not None:
                return self.llm.generate_async(prompt_ids, sampling_params=sampling,
                                               lora_request=self._lora_requests[request.adapter], streaming=True)
            return self.llm.generate_async(prompt_ids, sampling_params=sampling, streaming=True)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"TensorRT-LLM rejected the request: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - executor errors become a 500 for this request only
            raise EngineFailureError(f"TensorRT-LLM could not accept the request: {type(exc).__name__}: {exc}") from exc

    async def _pump(self, request_id: str, active: _Active) -> None:
        converter = active.converter
        try:
            async for result in active.result:
                if any(o.finish_reason == "cancelled" for o in result.outputs) and (active.shutdown or not active.aborted):
                    error = (EngineStoppedError("the engine is shutting down") if active.shutdown else
                             EngineFailureError("TensorRT-LLM cancelled the request"))
                    active.queue.put_nowait(error)
                    return
                if (output := converter.update(result)) is not None:
                    self._deliver(active, output)
                if converter.finished:
                    break
            if not converter.finished:
                self._deliver(active, converter.close("abort" if active.aborted else "stop"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed request ends its own stream only
            active.queue.put_nowait(EngineFailureError(f"TensorRT-LLM generation failed: {type(exc).__name__}: {exc}"))
        finally:
            self._active.pop(request_id, None)
            if not getattr(active.result, "finished", True):
                _abort_quietly(active.result)  # the toolkit stopped it (stop string) before TensorRT-LLM did

    def _deliver(self, active: _Active, output: RequestOutput | None) -> None:
        if output is None:
            return
        self.throughput.record(sum(len(c.token_ids) for c in output.choices))
        active.queue.put_nowait(output)

    async def abort(self, request_id: str) -> None:
        """Cancel a request: ``RequestOutput.abort()``; its stream ends with finish_reason "abort"."""
        active = self._active.get(request_id)
        if active is not None and not active.aborted:
            active.aborted = True
            _abort_quietly(active.result)

    def _counts(self) -> tuple[int, int]:
        """(running, waiting): in-flight requests beyond the engine's max_batch_size are counted as waiting."""
        inflight = len(self._active)
        running = min(inflight, self.max_batch_size)
        return running, inflight - running

    async def _refresh_stats(self) -> None:
        """Refresh the KV snapshot every STATS_INTERVAL_S, ``get_stats`` running in a worker thread."""
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            await asyncio.to_thread(self._fetch_kv)

    def _fetch_kv(self) -> tuple[int, int]:
        """(used, total) KV cache tokens from the latest ``LLM.get_stats()`` snapshot (kept when none arrives).

        Blocking: runs in a worker thread, never on the event loop."""
        llm = self.llm
        if llm is None:
            return self._kv
        try:
            for snap in reversed(list(llm.get_stats(timeout=STATS_TIMEOUT_S) or [])):
                snap = json.loads(snap) if isinstance(snap, (str, bytes)) else snap
                if kv := snap.get("kvCacheStats"):
                    per_block = int(kv.get("tokensPerBlock") or 0)
                    self._kv = (int(kv.get("usedNumBlocks") or 0) * per_block, int(kv.get("maxNumBlocks") or 0) * per_block)
                    break
        except Exception:  # noqa: BLE001 - stats are best effort
            pass
        return self._kv

    def stats(self) -> EngineStats:
        """Live counters for /metrics (KV numbers from the cached snapshot; no TensorRT-LLM call)."""
        running, waiting = self._counts()
        used, total = self._kv
        return EngineStats(running, waiting, used, total, self.throughput.total, self.throughput.rate())
