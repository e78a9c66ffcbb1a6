"""``TrtLlmEngine``: the Engine protocol over a TensorRT-LLM 1.2.x engine directory.

TensorRT-LLM's LLM API (``tensorrt_llm._tensorrt_engine.LLM``, the TensorRT backend) does the
batching, KV cache and sampling on the GPU. The toolkit renders and tokenizes prompts itself
(recipe chat format, the engine directory's tokenizer), submits token ids with
``LLM.generate_async(prompt_ids, sampling_params=..., streaming=True)``, and turns each streamed
``RequestOutput`` (cumulative ``outputs[i].token_ids`` / ``logprobs`` / ``finish_reason``) into
deltas with its own ``IncrementalDetokenizer``, so stop strings and UTF-8 behave exactly as in the
ONNX engine. ``RequestOutput.abort()`` cancels a request; TensorRT-LLM then ends its stream with
``finish_reason='cancelled'`` (reported as ``"abort"``).

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

from toolkit.artifact.manifest import Manifest
from toolkit.artifact.trtllm import import_tensorrt_llm, read_engine_config
from toolkit.recipes import Recipe
from toolkit.runtime.detokenizer import PREFIX_TOKENS, IncrementalDetokenizer
from toolkit.runtime.engines.common import ThroughputMeter
from toolkit.runtime.engines.trtllm_sampling import build_trtllm_sampling_params, is_greedy
from toolkit.runtime.errors import (EngineFailureError, EngineStoppedError, InvalidRequestError,
                                    OverloadedError, PromptTooLongError)
from toolkit.runtime.types import ChoiceDelta, EngineStats, GenerateRequest, OutputStream, RequestOutput, TokenLogprob

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}
STATS_TIMEOUT_S = 0.01
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
        if logprobs is not None:
            delta.logprobs.append(self._logprob(int(token), logprobs[pos] if pos < len(logprobs) else None))
        if token in self.stop_ids:
            return "stop"
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


def _abort_quietly(result: Any) -> None:
    try:
        result.abort()
    except Exception:  # noqa: BLE001 - the request may already be gone from the executor
        pass


class TrtLlmEngine:
    """The Engine protocol over ``tensorrt_llm._tensorrt_engine.LLM(model=engine_dir)`` (needs a GPU)."""

    def __init__(self, engine_dir: Path, manifest: Manifest, recipe: Recipe, max_waiting: int = 256):
        self.engine_dir, self.manifest, self.recipe = Path(engine_dir), manifest, recipe
        self.max_waiting = max_waiting
        self.model_names = recipe.model_names
        build = read_engine_config(self.engine_dir).get("build_config") or {}
        self.context_length = min(manifest.context_length, int(build.get("max_seq_len") or manifest.context_length))
        self.max_batch_size = int(build.get("max_batch_size") or recipe.trtllm.max_batch_size)
        self.llm: Any = None
        self._prompts: Any = None
        self._llmapi: Any = None
        self._active: dict[str, _Active] = {}
        self._accepting = False
        self.throughput = ThroughputMeter()
        self._kv = (0, 0)

    def llm_kwargs(self) -> dict[str, Any]:
        """``LLM`` arguments: the engine dir (TP size comes from its config), logits for logprobs, xgrammar."""
        return {"model": str(self.engine_dir), "gather_generation_logits": True, "guided_decoding_backend": "xgrammar"}

    async def start(self) -> None:
        """Load the tokenizer and TensorRT-LLM's executor in a worker thread (``TrtLlmUnavailableError`` without it)."""
        if self.llm is None:
            await asyncio.to_thread(self._load)
        self._accepting = True

    def _load(self) -> None:
        from toolkit.runtime.prompting import PromptBuilder, load_tokenizer

        api = import_tensorrt_llm()
        self._llmapi = importlib.import_module("tensorrt_llm.llmapi")
        self._prompts = PromptBuilder(load_tokenizer(self.engine_dir), self.recipe)
        self.llm = api.LLM(**self.llm_kwargs())

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting, let requests run for ``grace_s``, abort the rest, then shut TensorRT-LLM down."""
        self._accepting = False
        await self._wait_idle(grace_s)
        for request_id in list(self._active):
            await self.abort(request_id)
        await self._wait_idle(STOP_DRAIN_S)  # TensorRT-LLM answers an abort with a 'cancelled' result
        for active in list(self._active.values()):
            active.queue.put_nowait(EngineStoppedError("the engine is shutting down"))
            if active.task is not None:
                active.task.cancel()
        self._active.clear()
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
        if request.adapter is not None:  # LoRA: served by the ONNX engine only for now (README, "LoRA adapters")
            raise InvalidRequestError(f"LoRA adapter {request.adapter!r}: TensorRT-LLM engines cannot serve LoRA "
                                      "adapters yet; serve the adapter from an ONNX engine", param="lora")
        if len(prompt_ids) + request.params.max_tokens > self.context_length:
            raise PromptTooLongError(len(prompt_ids), request.params.max_tokens, self.context_length)
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
            sampling = build_trtllm_sampling_params(self._llmapi, request.params, self._prompts.eos_ids, len(prompt_ids))
            return self.llm.generate_async(prompt_ids, sampling_params=sampling, streaming=True)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"TensorRT-LLM rejected the request: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - executor errors become a 500 for this request only
            raise EngineFailureError(f"TensorRT-LLM could not accept the request: {type(exc).__name__}: {exc}") from exc

    async def _pump(self, request_id: str, active: _Active) -> None:
        converter = active.converter
        try:
            async for result in active.result:
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

    def _poll_kv(self) -> tuple[int, int]:
        """(used, total) KV cache tokens from the latest ``LLM.get_stats()`` snapshot (kept when none arrives)."""
        if self.llm is None:
            return self._kv
        try:
            for snap in reversed(list(self.llm.get_stats(timeout=STATS_TIMEOUT_S) or [])):
                snap = json.loads(snap) if isinstance(snap, (str, bytes)) else snap
                if kv := snap.get("kvCacheStats"):
                    per_block = int(kv.get("tokensPerBlock") or 0)
                    self._kv = (int(kv.get("usedNumBlocks") or 0) * per_block, int(kv.get("maxNumBlocks") or 0) * per_block)
                    break
        except Exception:  # noqa: BLE001 - stats are best effort
            pass
        return self._kv

    def stats(self) -> EngineStats:
        """Live counters for /metrics."""
        running, waiting = self._counts()
        used, total = self._poll_kv()
        return EngineStats(running, waiting, used, total, self.throughput.total, self.throughput.rate())
