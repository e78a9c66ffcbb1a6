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
says otherwise). A prompt longer than the runtime's input limit (``max_input_len``, and
``max_num_tokens`` too without chunked prefill) is refused with ``PromptTooLongError`` before
TensorRT-LLM would reject it mid-stream.

LoRA (issue #12): an engine exported with ``--lora-rank`` (manifest ``export_options.lora``) runs with
``LLM(enable_lora=True, lora_config=LoraConfig(max_lora_rank, lora_target_modules, max_loras,
max_cpu_loras))`` and serves the adapters it is started with (``adapters``: name -> the Hugging Face PEFT
directory ``toolkit export-lora`` put in ``ENGINE/adapters/NAME``): a request naming one is submitted
with ``generate_async(..., lora_request=LoRARequest(lora_name, lora_int_id, lora_path))``, the int id
fixed per adapter for the engine's life (1.. in name order), so TensorRT-LLM loads each adapter once and
caches it under that id; a base request carries no ``lora_request``. TensorRT-LLM batches requests with
different adapters (and none) together. An engine built without LoRA answers a request with an adapter
with ``InvalidRequestError`` (400, param ``lora``) and refuses to start with adapters.

KV cache statistics come from ``LLM.get_stats()``, which blocks: a background task calls it in a
worker thread every ``STATS_INTERVAL_S`` and ``stats()`` returns the cached snapshot.

One asyncio task per request reads TensorRT-LLM's stream and feeds a queue that ``generate``'s
iterator drains, so ``stop()`` can end every stream even if TensorRT-LLM goes quiet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.artifact.lora import PEFT_CONFIG, AdapterError, AdapterInfo
from toolkit.artifact.manifest import Manifest
from toolkit.artifact.trtllm import attention_windows, import_tensorrt_llm, read_engine_config
from toolkit.recipes import Recipe
from toolkit.runtime.detokenizer import PREFIX_TOKENS, IncrementalDetokenizer
from toolkit.runtime.engines.common import ThroughputMeter
from toolkit.runtime.engines.trtllm_sampling import build_trtllm_sampling_params, is_greedy
from toolkit.runtime.errors import (EngineFailureError, EngineStoppedError, InvalidRequestError,
                                    OverloadedError, PromptTooLongError)
from toolkit.runtime.types import ChoiceDelta, EngineStats, GenerateRequest, OutputStream, RequestOutput, TokenLogprob

FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "abort"}
"""TensorRT-LLM finish reason -> ours; a 'cancelled' the toolkit did not ask for never gets here (see _pump)."""
STATS_TIMEOUT_S = 0.01
STATS_INTERVAL_S = 0.5
STOP_DRAIN_S = 2.0


def _logprob_value(entry: Any) -> float:
    return float(getattr(entry, "logprob", entry))


def _rank(entry: Any) -> float:
    rank = getattr(entry, "rank", None)
    return float(rank) if rank is not None else math.inf


@dataclass
class _Choice:
    index: int
    detok: IncrementalDetokenizer
    seen: int = 0
    finish_reason: str | None = None


class StreamConverter:
    """Turns TensorRT-LLM's cumulative streamed results into the toolkit's ``RequestOutput`` deltas.

    Applies the toolkit's stop rules per token (EOS / stop token ids, stop strings, max_tokens,
    context length); a greedy request with ``n > 1`` runs as one sequence copied ``n`` times.
    """

    def __init__(self, request: GenerateRequest, prompts: Any, context_length: int):
        self.request, self.params = request, request.params
        self.prompt_ids, self.prompts, self.context_length = request.prompt_ids, prompts, context_length
        self.copies = self.params.n if is_greedy(self.params) else 1
        backend = prompts.tokenizer.backend_tokenizer
        self.choices = [
            _Choice(i, IncrementalDetokenizer(backend, stop=self.params.stop, prefix_ids=self.prompt_ids[-PREFIX_TOKENS:]))
            for i in range(self.params.n // self.copies)
        ]
        stops = set(self.params.stop_token_ids)
        self.stop_ids = frozenset(stops if self.params.ignore_eos else stops | set(prompts.eos_ids))
        self.completion_tokens = 0

    @property
    def finished(self) -> bool:
        """True once every choice has a finish reason."""
        return all(c.finish_reason is not None for c in self.choices)

    def update(self, result: Any) -> RequestOutput | None:
        """The deltas since the previous call for TensorRT-LLM's (mutated) ``RequestOutput``."""
        deltas = []
        for choice, output in zip(self.choices, result.outputs):
            if choice.finish_reason is None and (delta := self._advance(choice, output)) is not None:
                deltas.append(delta)
        return self._package(deltas)

    def close(self, reason: str) -> RequestOutput | None:
        """Finish every open choice with ``reason`` (the stream ended without saying why)."""
        deltas = []
        for choice in (c for c in self.choices if c.finish_reason is None):
            delta = ChoiceDelta(choice.index, "", [], None)
            self._finish(choice, delta, reason)
            deltas.append(delta)
        return self._package(deltas)

    def _advance(self, choice: _Choice, output: Any) -> ChoiceDelta | None:
        tokens = output.token_ids or []  # cumulative; read by position, never copied
        logprobs = (output.logprobs or []) if self.params.logprobs else None
        upstream_done = output.finish_reason is not None
        end = len(tokens) if logprobs is None or upstream_done else min(len(tokens), len(logprobs))
        delta = ChoiceDelta(choice.index, "", [], [] if self.params.logprobs else None)
        for pos in range(choice.seen, end):
            choice.seen = pos + 1
            if (reason := self._push(choice, delta, tokens[pos], logprobs, pos)) is not None:
                self._finish(choice, delta, reason)
                return delta
        if upstream_done and choice.seen >= len(tokens):
            self._finish(choice, delta, FINISH_REASONS.get(output.finish_reason, "stop"))
        return delta if delta.token_ids or delta.finish_reason else None

    def _push(self, choice: _Choice, delta: ChoiceDelta, token: int, logprobs: list | None, pos: int) -> str | None:
        delta.token_ids.append(int(token))
        self.completion_tokens += self.copies
        if token in self.stop_ids:  # counted, but neither text nor a logprob (as the ONNX engine)
            return "stop"
        if logprobs is not None:
            delta.logprobs.append(self._logprob(int(token), logprobs[pos] if pos < len(logprobs) else None))
        out = choice.detok.push(token)
        delta.text += out.text_delta
        if out.stopped:
            return "stop"
        if choice.seen >= self.params.max_tokens or len(self.prompt_ids) + choice.seen >= self.context_length:
            return "length"
        return None

    def _logprob(self, token: int, entry: Any) -> TokenLogprob:
        """``entry``: TensorRT-LLM's ``{token_id: Logprob(logprob, rank)}`` (top-K + sampled) or a float."""
        text = self.prompts.token_text
        if entry is None or not isinstance(entry, dict):
            return TokenLogprob(token, text(token), math.nan if entry is None else float(entry))
        value = _logprob_value(entry[token]) if token in entry else math.nan
        ranked = sorted(entry.items(), key=lambda kv: (_rank(kv[1]), -_logprob_value(kv[1])))
        top = [(int(t), text(int(t)), _logprob_value(lp)) for t, lp in ranked[: self.params.top_logprobs]]
        return TokenLogprob(token, text(token), value, top)

    @staticmethod
    def _finish(choice: _Choice, delta: ChoiceDelta, reason: str) -> None:
        delta.text += choice.detok.flush().text_delta
        delta.finish_reason = choice.finish_reason = reason

    def _package(self, deltas: list[ChoiceDelta]) -> RequestOutput | None:
        if not deltas:
            return None
        if self.copies > 1:
            deltas = [dataclasses.replace(d, index=i, token_ids=list(d.token_ids),
                                          logprobs=None if d.logprobs is None else list(d.logprobs))
                      for d in deltas for i in range(self.copies)]
        return RequestOutput(self.request.request_id, deltas, len(self.prompt_ids), self.completion_tokens,
                             finished=self.finished)


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


class TrtLlmEngine:
    """The Engine protocol over ``tensorrt_llm._tensorrt_engine.LLM(model=engine_dir)`` (needs a GPU)."""

    def __init__(self, engine_dir: Path, manifest: Manifest, recipe: Recipe, max_waiting: int = 256,
                 adapters: dict[str, Path] | None = None, max_loras: int | None = None):
        self.engine_dir, self.manifest, self.recipe = Path(engine_dir), manifest, recipe
        self.max_waiting = max_waiting
        self.model_names = recipe.model_names
        engine_config = read_engine_config(self.engine_dir)
        build = engine_config.get("build_config") or {}
        options = manifest.export_options or {}
        self.context_length = min(manifest.context_length, int(build.get("max_seq_len") or manifest.context_length))
        self.max_batch_size = int(build.get("max_batch_size") or recipe.trtllm.max_batch_size)
        self.logprobs = bool(options.get("logprobs", False))
        self.chunked_prefill = bool(options.get("enable_chunked_prefill", True))
        self.input_limit = self._input_limit(build)
        window = options.get("max_attention_window")
        if window is None:  # an older manifest: derive it from TensorRT-LLM's copy of the model config
            window = attention_windows(engine_config.get("pretrained_config") or {}, self.context_length)
        self.max_attention_window = [int(w) for w in window] if window else None
        self.lora = options.get("lora") or None  # the LoRA build options, or None: built without LoRA
        self.max_loras = max_loras
        self.adapter_sources = self._check_adapters(adapters or {})
        self.adapter_ids = {name: i for i, name in enumerate(sorted(self.adapter_sources), start=1)}
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

    def _check_adapters(self, adapters: dict[str, Path]) -> dict[str, Path]:
        """Each adapter: a PEFT directory exported for this engine's base checkpoint, within its LoRA build."""
        if adapters and not self.lora:
            raise AdapterError(f"{self.engine_dir} is a TensorRT-LLM engine built without LoRA; re-export it with "
                               "`toolkit export --target trtllm --lora-rank R` to serve adapters")
        checked = {}
        for name, path in adapters.items():
            path = Path(path)
            info = AdapterInfo.load(path)
            if not (path / PEFT_CONFIG).is_file():
                raise AdapterError(f"adapter {name!r} at {path} has no {PEFT_CONFIG}: it was not exported for a "
                                   "TensorRT-LLM engine (run `toolkit export-lora` on this engine)")
            if info.base_sha256 != self.manifest.source.get("sha256"):
                raise AdapterError(f"adapter {name!r} was exported for another base checkpoint than {self.engine_dir}")
            if info.rank > int(self.lora["max_lora_rank"]) or not set(info.target_modules) <= set(self.lora["target_modules"]):
                raise AdapterError(f"adapter {name!r} (rank {info.rank}, {', '.join(info.target_modules)}) does not fit "
                                   f"the engine's LoRA build (max rank {self.lora['max_lora_rank']}, "
                                   f"{', '.join(self.lora['target_modules'])})")
            checked[name] = path
        return checked

    def _lora_config(self) -> Any:
        """TensorRT-LLM's ``LoraConfig`` for serving: the build's rank and modules, ``--max-loras`` on the GPU."""
        lora = self.lora
        max_loras = int(self.max_loras or lora.get("max_loras") or 1)
        max_cpu_loras = max(max_loras, int(lora.get("max_cpu_loras") or 0), len(self.adapter_sources))
        cls = importlib.import_module("tensorrt_llm.lora_helper").LoraConfig
        return cls(max_lora_rank=int(lora["max_lora_rank"]), lora_target_modules=list(lora["trtllm_target_modules"]),
                   max_loras=max_loras, max_cpu_loras=max_cpu_loras)

    def _input_limit(self, build: dict) -> int:
        """Longest prompt the runtime accepts: max_input_len, and max_num_tokens without chunked prefill."""
        limit = int(build.get("max_input_len") or self.context_length - 1)
        if not self.chunked_prefill:
            limit = min(limit, int(build.get("max_num_tokens") or self.recipe.trtllm.max_num_tokens))
        return limit

    def llm_kwargs(self) -> dict[str, Any]:
        """``LLM`` arguments: the engine dir (TP size comes from its config), xgrammar, chunked prefill,
        generation logits only for an engine exported with ``--logprobs``, the per-layer attention windows."""
        kwargs: dict[str, Any] = {"model": str(self.engine_dir), "guided_decoding_backend": "xgrammar",
                                  "enable_chunked_prefill": self.chunked_prefill}
        if self.logprobs:
            kwargs["gather_generation_logits"] = True
        if self.max_attention_window:
            kwargs["kv_cache_config"] = self._llmapi.KvCacheConfig(max_attention_window=list(self.max_attention_window))
        if self.lora:
            kwargs.update(enable_lora=True, lora_config=self._lora_config())
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
            request_cls = importlib.import_module("tensorrt_llm.executor").LoRARequest
            self._lora_requests = {name: request_cls(lora_name=name, lora_int_id=self.adapter_ids[name],
                                                     lora_path=str(path.resolve()))
                                   for name, path in self.adapter_sources.items()}
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
        if request.adapter is not None and not self.lora:
            raise InvalidRequestError(f"LoRA adapter {request.adapter!r}: this TensorRT-LLM engine was exported without "
                                      "LoRA (TensorRT-LLM engines cannot serve LoRA adapters unless built with them); "
                                      "re-export it with `toolkit export --target trtllm --lora-rank R`", param="lora")
        if request.adapter is not None and request.adapter not in self.adapter_sources:
            served = ", ".join(self.adapter_sources) or "none"
            raise InvalidRequestError(f"this engine has no LoRA adapter {request.adapter!r} (served: {served})", param="lora")
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
