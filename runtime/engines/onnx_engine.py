"""``OnnxEngine``: in-flight batching over an exported ONNX model in onnxruntime.

The asyncio side (``generate``/``abort``) hands requests to one background thread that loops
*schedule → run → postprocess*; onnxruntime releases the GIL while it computes, so the event loop
keeps serving. Outputs travel back through a per-request asyncio queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from toolkit.artifact.manifest import Manifest
from toolkit.recipes import Recipe
from toolkit.runtime.errors import (EngineFailureError, EngineStoppedError, InvalidRequestError, OverloadedError,
                                    PromptTooLongError)
from toolkit.runtime.engines.common import ThroughputMeter
from toolkit.runtime.kv_cache import KVCacheManager, KvGeometry, default_kv_budget_bytes
from toolkit.runtime.model_runner import create_runner
from toolkit.runtime.native_memory import Trimmer
from toolkit.runtime.postprocess import TokenProcessor, collect_output
from toolkit.runtime.scheduler import Scheduler, SchedulerConfig, StepPlan
from toolkit.runtime.sequence import SequenceFactory, SequenceGroup
from toolkit.runtime.speculative import SpeculativeConfig, Speculator
from toolkit.runtime.types import EngineStats, GenerateRequest, OutputStream, StepTimings


class OnnxEngine:
    """The Engine protocol over onnxruntime (CPU here; CUDA where onnxruntime-gpu finds a GPU)."""

    def __init__(
        self,
        engine_dir: Path,
        manifest: Manifest,
        recipe: Recipe,
        config: SchedulerConfig | None = None,
        kv_budget_bytes: int | None = None,
        threads: int | None = None,
        adapters: dict[str, Path] | None = None,
        max_loras: int | None = None,
        prefix_cache_share: float = 1.0,
        malloc_trim_s: float = 10.0,
        reserve_prefix_cache: bool = False,
        speculative: SpeculativeConfig | None = None,
        kv_cache_dtype: str | None = None,
    ):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.recipe = recipe
        self.model_names = recipe.model_names
        self.context_length = manifest.context_length
        self.config = config or SchedulerConfig()
        self.graph = manifest.export_options.get("graph", "optimum")
        # GQA graphs run on our attention operator where it can (toolkit.artifact.native_attention), over a
        # float16 cache on quantized engines: the cache's size and the speculation defaults follow
        self.kv_cache_dtype = self._native_cache(manifest.precision, kv_cache_dtype)
        geometry = KvGeometry.of_layout(manifest.kv_layout)
        if self.kv_cache_dtype is not None:
            geometry = dataclasses.replace(geometry, dtype=self.kv_cache_dtype)
        if kv_budget_bytes is None:  # toolkit serve --kv-cache-gib; default: a tenth of the machine's memory
            kv_budget_bytes = default_kv_budget_bytes(geometry.bytes_per_token, self.context_length)
        self.kv = KVCacheManager(geometry, kv_budget_bytes, rectangular=self.graph == "gqa",
                                 prefix_cache_share=prefix_cache_share, reserve_prefix_cache=reserve_prefix_cache)
        self.weights_bytes = 0  # the model files' size, once loaded (stats().memory)
        self.trimmer = Trimmer(malloc_trim_s)  # hands glibc's freed heap back (runtime/native_memory.py)
        self.threads = threads
        self.scheduler = Scheduler(self.config, self.kv)
        if not self.kv.reservable_tokens:  # a reserved prefix cache took the whole budget
            raise ValueError(f"prefix_cache_share={prefix_cache_share} sets the whole KV budget aside for the prefix "
                             "cache and leaves requests no room; give it less than the whole budget")
        self.fault_hook: Callable[[StepPlan], None] | None = None  # test hook: raise to fail a step
        self._submissions: queue.SimpleQueue[SequenceGroup] = queue.SimpleQueue()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self.throughput = ThroughputMeter()
        self.timings = StepTimings()  # cumulative loop time, reported by stats() for the bench
        self._prompts = None
        self.adapter_sources = {name: Path(path) for name, path in (adapters or {}).items()}  # LoRA: name -> dir
        self.max_loras = max_loras
        self.lora = None  # toolkit.runtime.lora.LoraAdapters once started with adapters
        self._adapter_wait: list[SequenceGroup] = []  # requests whose adapter is loading
        # verify runs on our operator reproduce plain decoding bitwise (SpeculativeConfig's doc)
        self.speculative = (speculative or SpeculativeConfig()).for_precision(manifest.precision, self.kv_cache_dtype is not None)
        self.speculator: Speculator | None = None  # drafts for verify steps (runtime/speculative.py); None with LoRA
        self._drafts: list[list[int]] | None = None  # this step's drafts, one per running row

    def _native_cache(self, precision: str, requested: str | None) -> str | None:
        """The cache's element type where this engine's attention will run on our operator, else None;
        ``requested`` (``toolkit serve --kv-cache-dtype``) over ``native_attention.cache_dtype``'s choice."""
        if requested not in (None, "float16", "float32"):
            raise ValueError(f"kv_cache_dtype {requested!r}: use float16 or float32")
        if self.graph != "gqa":
            return None
        from toolkit.artifact import native_attention

        cache = requested or native_attention.cache_dtype(precision)
        return cache if native_attention.serves(self.engine_dir / "model.onnx", cache) else None

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA adapters this engine serves (``GenerateRequest.adapter``)."""
        return tuple(self.adapter_sources)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model and tokenizer (in a worker thread) and start the engine loop."""
        if self._thread is not None:
            return
        await asyncio.to_thread(self._load)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.recipe.name}", daemon=True)
        self._thread.start()
        self._accepting = True

    def _load(self) -> None:
        from toolkit.runtime.prompting import PromptBuilder, load_tokenizer

        model = self.engine_dir / "model.onnx"
        if self.adapter_sources:
            from toolkit.artifact.lora import LORA_MODEL_FILE, graph_modules
            from toolkit.runtime.lora import DEFAULT_MAX_LORAS, LoraAdapters

            model = self.engine_dir / LORA_MODEL_FILE
            if LORA_MODEL_FILE not in self.manifest.files:
                raise EngineStoppedError(f"{self.engine_dir} has no LoRA graph; add an adapter with `toolkit export-lora`")
        self.weights_bytes = sum(f.stat().st_size for f in (model, model.with_name(model.name + ".data")) if f.exists())
        self.runner = create_runner(self.graph, model, self.threads, self.context_length, verify=self.speculative.speculates and not self.adapter_sources,
                                    kv_cache=self.kv_cache_dtype or "float32")
        if getattr(self.runner, "native_attention", False) != (self.kv_cache_dtype is not None):
            # the KV budget and the speculation defaults were decided on the attention this graph did not get
            raise EngineStoppedError(f"{model}: its attention did not take the operator planned for it "
                                     "(toolkit.artifact.native_attention); serve with TOOLKIT_NATIVE_ATTENTION=0")
        if self.adapter_sources:
            self.lora = LoraAdapters(self.adapter_sources, graph_modules(self.runner.session),
                                     self.manifest.source.get("sha256", ""), self.max_loras or DEFAULT_MAX_LORAS,
                                     notify=self._wake.set)
        self._prompts = PromptBuilder(load_tokenizer(self.engine_dir), self.recipe)
        self.sequences = SequenceFactory(self._prompts, vocab_size=self.runner.vocab_size)
        self.processor = TokenProcessor(self._prompts, self.context_length)
        self.speculator = Speculator(self.speculative) if self.runner.can_verify else None
        self.batch = self.runner.new_batch()
        self.trimmer.start()

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting, let running requests finish for up to ``grace_s``, abort the rest, stop the loop."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._thread is not None and self._busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._fail_all(EngineStoppedError("the engine is shutting down"))
        self.trimmer.stop()
        if self.lora is not None:
            self.lora.close()

    def _busy(self) -> bool:
        s = self.scheduler
        return bool(s.running or s.prefilling or s.waiting or self._adapter_wait or not self._submissions.empty())

    @property
    def prompts(self):
        """The recipe's chat format over this engine's tokenizer (after ``start()``)."""
        if self._prompts is None:
            raise EngineStoppedError("the engine is not started")
        return self._prompts

    # ---- requests ----------------------------------------------------------------------------
    def _check_fits(self, request: GenerateRequest) -> None:
        params, prompt_len = request.params, len(request.prompt_ids)
        if request.adapter is not None and request.adapter not in self.adapter_sources:
            served = ", ".join(self.adapter_sources) or "none"
            raise InvalidRequestError(f"this engine has no LoRA adapter {request.adapter!r} (served: {served})", param="lora")
        self._prompts.check_ids(request.prompt_ids)
        if prompt_len + params.max_tokens > self.context_length:
            raise PromptTooLongError(prompt_len, params.max_tokens, self.context_length)
        if not self.kv.can_ever_fit(params.n * (prompt_len + params.max_tokens)):
            raise PromptTooLongError(prompt_len, params.max_tokens, self.kv.reservable_tokens // params.n, "KV cache budget")

    async def generate(self, request: GenerateRequest) -> OutputStream:
        """Queue ``request`` and return its output stream; closing the stream early aborts it and frees its cache."""
        if not self._accepting:
            raise EngineStoppedError("the engine is not running")
        self._check_fits(request)
        waiting = len(self.scheduler.waiting) + len(self._adapter_wait) + self._submissions.qsize()
        if waiting >= self.config.max_waiting:
            raise OverloadedError(waiting, self.config.max_waiting)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        deliver = lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item)  # noqa: E731
        self._submissions.put(self.sequences.create(request, deliver))
        self._wake.set()
        return OutputStream(outputs, lambda: self.abort(request.request_id))

    async def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; its rows leave the batch and its cache is freed."""
        with self._lock:
            self._aborts.add(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        """Live counters for /metrics."""
        scheduler = self.scheduler
        return EngineStats(
            running=len(scheduler.running) + len(scheduler.prefilling),
            waiting=len(scheduler.waiting) + len(self._adapter_wait) + self._submissions.qsize(),
            kv_cache_used_tokens=self.kv.used_tokens,
            kv_cache_total_tokens=self.kv.total_tokens,
            kv_cache_cached_tokens=self.kv.cached_tokens,
            generated_tokens_total=self.throughput.total,
            tokens_per_second=self.throughput.rate(),
            step_timings=dataclasses.replace(self.timings),
            memory=self._memory(),
        )

    def _memory(self) -> dict[str, int]:
        """Bytes of what holds KV (read from the event loop while the engine thread runs: a snapshot)."""
        batch = getattr(self, "batch", None)
        arrays = getattr(batch, "past", None) or {}  # the optimum graph's BatchKV; SharedKV counts its arena
        prefilling = [g.prefill_past for g in list(self.scheduler.prefilling) if g.prefill_past]
        cache = self.scheduler.prefix_cache
        return {"kv_budget": self.kv.budget_bytes, "weights": self.weights_bytes,
                "kv_decode": getattr(batch, "nbytes", None) or sum(a.nbytes for a in list(arrays.values())),
                "kv_prefill": sum(a.nbytes for past in prefilling for a in past.values()),
                "prefix_cache": cache.held_bytes if cache is not None else 0}

    # ---- the engine loop (background thread) -----------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            started = time.perf_counter()
            self._drain_submissions()
            self._apply_aborts()
            plan = self.scheduler.schedule()
            self.timings.schedule_s += time.perf_counter() - started
            if plan.empty:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.step(plan)

    def step(self, plan: StepPlan) -> None:
        """One engine iteration: run the planned prefill chunks and decode, then postprocess."""
        started = time.perf_counter()
        try:
            if self.fault_hook is not None:
                self.fault_hook(plan)
            prefilled = self._run_prefill(plan)
            decode_started = time.perf_counter()
            logits = self._run_decode() if plan.decode else None
        except Exception as exc:  # a failed step fails only the requests in it
            self._fail_step(plan, EngineFailureError(f"model step failed: {type(exc).__name__}: {exc}"))
            return
        model_done = time.perf_counter()
        fed = 1 + max(map(len, self._drafts)) if plan.decode and self._drafts else 1  # a verify step feeds drafts
        self.scheduler.observe_step(plan, decode_started - started, model_done - decode_started, fed)  # step time budget
        self._postprocess(prefilled, logits)
        self.timings.steps += 1
        self.timings.model_s += model_done - started
        self.timings.step_s += time.perf_counter() - started

    def _run_prefill(self, plan: StepPlan) -> list[SequenceGroup]:
        done = []
        for group, start, stop in plan.prefill:
            lora = {"lora": self.lora.single_feeds(group.request.adapter)} if self.lora is not None else {}
            last = stop >= len(group.prompt_ids)  # only the prompt's last chunk needs its logits
            logits, group.prefill_past = self.runner.prefill(group.prompt_ids[start:stop], group.prefill_past, start,
                                                             logits=last, **lora)
            group.prefilled = stop
            if group.prefill_remaining == 0:
                group.prefill_logits = logits
                done.append(group)
        return done

    def _run_decode(self) -> np.ndarray:
        running = self.scheduler.running
        last = [seq.output_ids[-1] for seq in running]
        positions = [len(seq.group.prompt_ids) + len(seq.output_ids) - 1 for seq in running]
        lora = {"lora": self.lora.row_feeds(tuple(seq.group.request.adapter for seq in running))} if self.lora is not None else {}
        self._drafts = drafts = self._speculate(running, positions)
        if drafts is None:
            return self.runner.decode(self.batch, last, positions, **lora)
        fed = 1 + max(map(len, drafts))  # rows with shorter drafts are padded, then rolled back
        tokens = [[t, *d, *[t] * (fed - 1 - len(d))] for t, d in zip(last, drafts)]
        return self.runner.verify(self.batch, tokens, positions, **lora)

    def _speculate(self, running, positions: list[int]) -> list[list[int]] | None:
        """Each row's draft for a verify step, or None for a plain decode step (``runtime/speculative.py``).

        Every row feeds as many tokens as the longest draft (padding), so drafts are cut to what the
        row closest to the context's end can hold.
        """
        if self.speculator is None:
            return None
        drafts = self.speculator.drafts(running, [self.processor.remaining(seq.group, seq) for seq in running])
        room = self.context_length - max(positions) - 1
        if drafts is not None and room < max(map(len, drafts)):
            drafts = [d[:max(room, 0)] for d in drafts]
            drafts = drafts if any(drafts) else None
        return drafts

    def _postprocess(self, prefilled: list[SequenceGroup], logits: np.ndarray | None) -> None:
        touched: dict[str, SequenceGroup] = {}
        running = self.scheduler.running
        if logits is not None and self._drafts is not None:
            kept = []  # per row: fed tokens whose KV stays (the last token and the accepted drafts)
            for row, seq in enumerate(running):
                emitted = self.processor.advance_drafted(seq.group, seq, logits[row], self._drafts[row])
                self.speculator.record(seq, self._drafts[row], emitted)
                kept.append(len(emitted))
                touched[seq.group.request_id] = seq.group
            self.batch.rollback(kept, logits.shape[1])
        elif logits is not None:
            argmax = getattr(self.runner, "argmax", None)  # found by the LM head kernel, where it ran
            for row, seq in enumerate(running):
                hint = int(argmax[row]) if argmax is not None and argmax[row] >= 0 else None
                self.processor.advance(seq.group, seq, logits[row], argmax=hint)
                touched[seq.group.request_id] = seq.group
        self._retire_finished_rows()
        for group in prefilled:
            for seq in group.sequences:
                self.processor.advance(group, seq, group.prefill_logits)
            self._join_batch(group)
            touched[group.request_id] = group
        self._count_tokens(touched.values())
        for group in touched.values():
            if (output := collect_output(group)) is not None:
                output.cached_tokens = group.cached_tokens
                if group.request.prediction_ids and self.speculator is not None and self.speculator.config.predicted_outputs:
                    counts = [self.speculator.prediction_counts(seq) for seq in group.sequences]
                    output.accepted_prediction_tokens = sum(a for a, _ in counts)
                    output.rejected_prediction_tokens = sum(r for _, r in counts)
                group.deliver(output)

    def _retire_finished_rows(self) -> None:
        running = self.scheduler.running
        keep = [i for i, seq in enumerate(running) if not seq.finished]
        if len(keep) == len(running):
            return
        for seq in running:
            if seq.finished:
                self.scheduler.release(seq)
        order = self.batch.keep_rows(keep)
        self.scheduler.running = [running[i] for i in order]

    def _join_batch(self, group: SequenceGroup) -> None:
        """Move a prefilled request's unfinished sequences into the decode batch (sharing its prefill)."""
        joining = [seq for seq in group.sequences if not seq.finished]
        for seq in group.sequences:
            if seq.finished:
                self.scheduler.release(seq)
        if joining:
            self.batch.add_rows(group.prefill_past, [len(group.prompt_ids)] * len(joining))
            self.scheduler.running.extend(joining)
        self.scheduler.prefill_done(group)  # the prompt's full blocks join the prefix cache
        self.scheduler.prefilling.remove(group)  # after joining, so stats() never sees it nowhere
        group.prefill_past = group.prefill_logits = None

    def _count_tokens(self, groups) -> None:
        produced = sum(len(s.pending.token_ids) for g in groups for s in g.sequences if s.pending is not None)
        self.throughput.record(produced)

    def _drain_submissions(self) -> None:
        while True:
            try:
                self._adapter_wait.append(self._submissions.get_nowait())
            except queue.Empty:
                break
        if self._adapter_wait:
            self._admit_adapters()

    def _admit_adapters(self) -> None:
        """Queue the requests whose adapter is loaded (base requests at once); the others wait for theirs.

        Loading runs in a worker thread, so a request for an unloaded adapter never holds up the batch.
        """
        in_use = None
        still = []
        for group in self._adapter_wait:
            name = group.request.adapter
            if name is None or self.lora is None:
                self.scheduler.waiting.append(group)
                continue
            if in_use is None:
                in_use = self._adapters_in_use()
            state = self.lora.poll(name, in_use)
            if state is True:
                self.scheduler.waiting.append(group)
            elif state is False:
                still.append(group)
            else:
                group.deliver(EngineFailureError(f"LoRA adapter {name!r} could not be loaded: {state}"))
        self._adapter_wait = still

    def _adapters_in_use(self) -> set[str]:
        s = self.scheduler
        groups = [*s.waiting, *s.prefilling, *(seq.group for seq in s.running)]
        return {g.request.adapter for g in groups if g.request.adapter is not None}

    def _apply_aborts(self) -> None:
        with self._lock:
            aborted, self._aborts = self._aborts, set()
        if not aborted:
            return
        for group in [g for g in (*self.scheduler.waiting, *self.scheduler.prefilling) if g.request_id in aborted]:
            self.scheduler.drop_group(group)
        self._adapter_wait = [g for g in self._adapter_wait if g.request_id not in aborted]
        for seq in self.scheduler.running:
            if seq.group.request_id in aborted and not seq.finished:
                TokenProcessor.finish(seq, "abort")
        self._retire_finished_rows()

    def _fail_step(self, plan: StepPlan, error: Exception) -> None:
        self._fail_groups([g for g, _, _ in plan.prefill], error)

    def _fail_all(self, error: Exception) -> None:
        if self._prompts is None:  # never loaded: nothing was ever accepted
            return
        self._drain_submissions()
        self._fail_groups([*self.scheduler.waiting, *self.scheduler.prefilling, *self._adapter_wait], error)
        self._adapter_wait = []

    def _fail_groups(self, groups: list[SequenceGroup], error: Exception) -> None:
        """Fail ``groups`` and every running request (the batch cache is gone with them)."""
        failing = {g.request_id: g for g in groups}
        failing.update({seq.group.request_id: seq.group for seq in self.scheduler.running})
        for group in failing.values():
            self.scheduler.drop_group(group)
            group.deliver(error)
        self.scheduler.running = []
        self.batch = self.runner.new_batch()

